"""The one constant-time check of an ``Authorization: Bearer`` header."""

from __future__ import annotations

import pytest

from fleet.admin import authorized
from server.tokens import StaticTokens, TokenGate, TokenSet, bearer_accepts, token_matches

ACCEPTED = ("current-token", "previous-token")


@pytest.mark.parametrize("header", ["Bearer current-token", "Bearer previous-token",
                                    "bearer current-token", "BEARER previous-token"])
def test_accepts_any_accepted_token_and_any_case_of_the_scheme(header: str) -> None:
    assert bearer_accepts(header, ACCEPTED)


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "current-token", "Basic current-token",
    "Bearer current-token ", "Bearer  current-token", "Bearer current-tokenX",
    "Bearer jeton-é", "Bearer \udcff\udcfe", "Bearer 令牌", "Bearer\tcurrent-token",
])
def test_refuses_missing_wrong_and_non_ascii_headers_without_raising(
        header: str | None) -> None:
    assert not bearer_accepts(header, ACCEPTED)


def test_non_ascii_token_is_compared_too() -> None:
    assert bearer_accepts("Bearer jeton-é", ("jeton-é",))
    assert not bearer_accepts("Bearer jeton-e", ("jeton-é",))


def test_no_accepted_token_refuses_everything() -> None:
    assert not bearer_accepts("Bearer ", ())
    assert not bearer_accepts("Bearer anything", ())


def test_token_matches_takes_bytes_or_str() -> None:
    assert token_matches("abc", (b"abc",))
    assert token_matches(b"abc", ("x", "abc"))
    assert not token_matches("\udcff", (b"abc",))


def test_the_server_gate_and_the_fleet_admin_agree() -> None:
    gate = TokenGate(StaticTokens(TokenSet("current-token")))
    for header in ("Bearer current-token", "bearer current-token", "Bearer wrong", "",
                   None, "Bearer \udcff"):
        assert gate.accepts(header) == authorized(header, "current-token"), header
    assert authorized(None, None)
    assert TokenGate(StaticTokens(None)).accepts(None)
