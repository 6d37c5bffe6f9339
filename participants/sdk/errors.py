"""What a handler raises to say what should happen to its message.

Any other exception is retried with exponential backoff and dead-lettered once
the message has been delivered ``max_deliveries`` times.
"""

from __future__ import annotations


class ParticipantError(Exception):
    """Base of the exceptions a handler raises on purpose."""


class Retry(ParticipantError):
    """Try the message again after ``delay`` seconds.

    The try counts toward the delivery limit; once that is reached the message is
    dead-lettered with ``reason``.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float = 1.0) -> None:
        if delay < 0:
            raise ValueError(f"Retry delay must not be negative, got {delay!r}")
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(ParticipantError):
    """The message can never be handled: dead-letter it at once with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
