"""The app's recent messages, as a value: what the message area shows. No Tk here.

Not one banner that the next message replaces: the board keeps the last few messages,
newest first. Each has a ``key`` (its topic): a new message with the same key replaces
the old one in place of stacking, and ``resolve(key)`` removes it when the problem is
gone (a "Cannot reach ..." under the key ``connection`` goes when a connection
succeeds). Infos expire after ``INFO_TTL_S``; errors stay until dismissed or resolved.
Every operation is a pure function of the board and returns a new board.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum

MAX_MESSAGES = 5
INFO_TTL_S = 6.0


class Level(Enum):
    INFO = "info"
    ERROR = "error"
    NOTICE = "notice"  # not a problem, but stays until acted on (an offer to resume)


@dataclass(frozen=True)
class Message:
    id: int
    level: Level
    text: str
    key: str  # the topic; the text itself when none was given
    posted_at: float
    action: str | None = None  # the label of the message's button, if it has one

    def expires_at(self, ttl_s: float = INFO_TTL_S) -> float | None:
        return self.posted_at + ttl_s if self.level is Level.INFO else None


@dataclass(frozen=True)
class MessageBoard:
    messages: tuple[Message, ...] = ()  # newest first
    next_id: int = 1
    limit: int = MAX_MESSAGES
    ttl_s: float = field(default=INFO_TTL_S)

    def post(self, level: Level, text: str, now: float, key: str | None = None,
             action: str | None = None) -> tuple[MessageBoard, Message]:
        """Add a message on top; one with the same key goes. Over the limit the oldest
        info falls off, or the oldest error when all are errors: a burst of infos does
        not push an unresolved error out of sight."""
        message = Message(self.next_id, level, text, key or text, now, action)
        kept = [message, *(m for m in self.messages if m.key != message.key)]
        while len(kept) > self.limit:
            infos = [i for i, m in enumerate(kept) if m.level is Level.INFO]
            del kept[infos[-1] if infos else -1]
        return replace(self, messages=tuple(kept), next_id=self.next_id + 1), message

    def dismiss(self, message_id: int) -> MessageBoard:
        return replace(self, messages=tuple(m for m in self.messages if m.id != message_id))

    def resolve(self, key: str) -> MessageBoard:
        """The problem under ``key`` is gone: its message too."""
        return replace(self, messages=tuple(m for m in self.messages if m.key != key))

    def clear(self) -> MessageBoard:
        return replace(self, messages=())

    def expire(self, now: float) -> MessageBoard:
        return replace(self, messages=tuple(
            m for m in self.messages
            if (at := m.expires_at(self.ttl_s)) is None or at > now))

    def next_expiry(self) -> float | None:
        """When the next info expires (to schedule one timer), or None."""
        times = [at for m in self.messages if (at := m.expires_at(self.ttl_s)) is not None]
        return min(times) if times else None

    def get(self, message_id: int) -> Message | None:
        return next((m for m in self.messages if m.id == message_id), None)
