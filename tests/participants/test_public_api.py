"""The SDK's public names are a deliberate list."""

from __future__ import annotations

import participants.sdk


def test_the_sdk_exports_exactly_its_public_names() -> None:
    assert participants.sdk.__all__ == [
        "Handler",
        "HandlerResult",
        "Message",
        "Participant",
        "ParticipantError",
        "Reject",
        "Reply",
        "Retry",
        "Runner",
        "RunnerSettings",
        "RunnerStats",
        "Subscription",
        "run_participant",
    ]
    for name in participants.sdk.__all__:
        assert getattr(participants.sdk, name) is not None
