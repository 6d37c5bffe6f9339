"""The memory report's key families match the names contracts.naming gives keys."""

from __future__ import annotations

import pytest

from bench.memory import LEDGERS, OTHER, family_of
from contracts import naming


@pytest.mark.parametrize(
    ("key", "family"),
    [
        (naming.instance_key(3, "wf-1"), "instance"),
        (naming.history_key(3, "wf-1"), "history"),
        (naming.seen_key(3, "wf-1"), "seen message ids"),
        (naming.status_index_key(3, "running"), "status index"),
        (naming.timers_key(3), "timers"),
        (naming.progress_stream(3), "progress stream"),
        (naming.dead_letter_stream(3), "dead letters"),
        (naming.outcome_key(3, "payment", "m-1"), "outcome records"),
        (naming.message_stream(3, "PaymentCaptured"), "message streams"),
        (naming.participant_key("payment", "captures"), LEDGERS),
        (naming.heartbeat_key(), "heartbeats"),
        ("bench:{3}:msg:PaymentCaptured", OTHER),
    ],
)
def test_every_key_streamsaga_names_has_its_family(key: str, family: str) -> None:
    assert family_of(key) == family
