"""The desktop app's services as pure logic, with no Tk and no display: the message board,
when to restart a dead embedded fleet, the fleet process's command line and readiness
file, and the command line's paths."""

from __future__ import annotations

import json
import signal

import pytest

from gui.__main__ import parse_args
from gui.connection import restart_allowed
from gui.fleet_process import describe_exit, fleet_command, parse_ready
from gui.messages import INFO_TTL_S, Level, MessageBoard
from gui.views.process import empty_hint_text


def texts(board: MessageBoard) -> list[str]:
    return [m.text for m in board.messages]


def test_messages_are_kept_newest_first_up_to_the_limit() -> None:
    board = MessageBoard(limit=3)
    for n in range(4):
        board, _ = board.post(Level.ERROR, f"error {n}", now=float(n))
    assert texts(board) == ["error 3", "error 2", "error 1"]


def test_infos_make_room_before_errors() -> None:
    board = MessageBoard(limit=3)
    board, _ = board.post(Level.ERROR, "Skipped 1: a.png: no such file or folder", 0.0)
    for n in range(5):
        board, _ = board.post(Level.INFO, f"info {n}", 1.0 + n)
    assert texts(board) == ["info 4", "info 3", "Skipped 1: a.png: no such file or folder"]


def test_a_key_replaces_its_message_and_resolve_removes_it() -> None:
    board = MessageBoard()
    board, first = board.post(Level.ERROR, "Cannot reach http://a (connection refused)", 0.0,
                              key="connection")
    board, _ = board.post(Level.ERROR, "Skipped 1: x", 1.0)
    board, second = board.post(Level.ERROR, "Cannot reach http://a (timed out)", 2.0,
                               key="connection")
    assert texts(board) == ["Cannot reach http://a (timed out)", "Skipped 1: x"]
    assert board.get(first.id) is None and board.get(second.id) is second
    board = board.resolve("connection")
    assert texts(board) == ["Skipped 1: x"]


def test_the_same_text_twice_is_one_message() -> None:
    board = MessageBoard()
    board, _ = board.post(Level.ERROR, "Not connected.", 0.0)
    board, _ = board.post(Level.ERROR, "Not connected.", 1.0)
    assert texts(board) == ["Not connected."]


def test_infos_expire_and_errors_stay_until_dismissed() -> None:
    board = MessageBoard()
    board, error = board.post(Level.ERROR, "disk full", 0.0)
    board, _ = board.post(Level.INFO, "Saved 2 files", 1.0)
    assert board.next_expiry() == pytest.approx(1.0 + INFO_TTL_S)
    assert texts(board.expire(1.0 + INFO_TTL_S - 0.01)) == ["Saved 2 files", "disk full"]
    board = board.expire(1.0 + INFO_TTL_S)
    assert texts(board) == ["disk full"] and board.next_expiry() is None
    assert texts(board.expire(10_000.0)) == ["disk full"]
    assert texts(board.dismiss(error.id)) == []


def test_messages_carry_their_action_label() -> None:
    _, message = MessageBoard().post(Level.ERROR, "No web browser", 0.0, key="browser",
                                     action="Copy link")
    assert message.action == "Copy link" and message.key == "browser"


def test_a_dead_fleet_is_restarted_unless_it_keeps_dying() -> None:
    assert restart_allowed([100.0], now=100.0)
    assert restart_allowed([10.0, 50.0, 100.0], now=100.0, allowed=3)
    assert not restart_allowed([10.0, 50.0, 90.0, 100.0], now=100.0, allowed=3,
                               window_s=120.0)
    # deaths long ago do not count
    assert restart_allowed([1.0, 2.0, 3.0, 500.0], now=500.0, allowed=3, window_s=120.0)


def test_fleet_command_is_the_user_command_with_the_child_options(tmp_path) -> None:
    command = fleet_command(3, tmp_path / "storage", tmp_path / "ready.json", port=0,
                            python="python3")
    assert command[:4] == ["python3", "-m", "fleet", "local"]
    assert command[command.index("--workers") + 1] == "3"
    assert command[command.index("--port") + 1] == "0"
    assert command[command.index("--ready-file") + 1] == str(tmp_path / "ready.json")
    assert "--stop-on-stdin-eof" in command
    assert not any("token" in part for part in command)  # never a secret in argv


def test_parse_ready_reads_the_fleet_readiness_file() -> None:
    ready = parse_ready(json.dumps({"endpoint": "http://127.0.0.1:4321", "pid": 77,
                                    "admin_token_file": "/x/.fleet/admin-token"}))
    assert (ready.endpoint, ready.pid, ready.admin_token_file) == (
        "http://127.0.0.1:4321", 77, "/x/.fleet/admin-token")
    assert parse_ready(json.dumps({"endpoint": "http://h:1", "pid": 1,
                                   "admin_token_file": None})).admin_token_file is None
    with pytest.raises(ValueError, match="no endpoint"):
        parse_ready(json.dumps({"pid": 1}))
    with pytest.raises(ValueError):
        parse_ready("{half a fi")


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(2) == "exit status 2"


def test_the_empty_list_promises_dropping_only_when_it_works() -> None:
    assert "drop" in empty_hint_text(drop=True)
    assert "drop" not in empty_hint_text(drop=False).lower()


def test_python_m_gui_takes_files_and_folders() -> None:
    args = parse_args(["--endpoint", "http://h:1", "a.png", "photos/"])
    assert args.paths == ["a.png", "photos/"] and args.endpoint == "http://h:1"
    assert parse_args([]).paths == []
