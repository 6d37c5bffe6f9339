"""Stream, group and key names: the only place the wire layout is spelled out.

Every key of a partition carries the hash tag ``{<p>}`` so that one Lua script can
touch a workflow instance, its streams, its timers and the XACK atomically, on a
single Redis or on a Redis Cluster.  A participant's own business state lives
under the tag ``{pt:<participant>}``.
"""

from __future__ import annotations

import re
import zlib

PREFIX = "ss"
DEFAULT_PARTITIONS = 16
CONTROLLER_GROUP = "controller"

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

# Fields of every stream entry.  ``type`` and ``correlation_id`` stand on their own
# so a reader can route an entry without decoding the envelope.
FIELD_TYPE = "type"
FIELD_CORRELATION_ID = "correlation_id"
FIELD_MESSAGE_ID = "message_id"
FIELD_ENVELOPE = "envelope"


def partition_of(correlation_id: str, partitions: int) -> int:
    """The partition of a workflow: CRC-32 (IEEE) of the UTF-8 id, modulo P."""
    return zlib.crc32(correlation_id.encode()) % partitions


def is_valid_name(name: str) -> bool:
    """Whether ``name`` may be used as a message type, participant or step name."""
    return bool(_NAME.match(name))


def _tag(partition: int) -> str:
    return f"{PREFIX}:{{{partition}}}"


def message_stream(partition: int, message_type: str) -> str:
    """The stream carrying every message of one type in one partition."""
    return f"{_tag(partition)}:msg:{message_type}"


def type_of_stream(stream: str) -> str:
    """The message type a message stream carries (inverse of :func:`message_stream`)."""
    return stream.rsplit(":msg:", 1)[1]


def partition_of_key(key: str) -> int:
    """The partition of any partition-tagged key."""
    return int(key[key.index("{") + 1 : key.index("}")])


def key_kind(key: str) -> str:
    """What a key named here is, by the word after its partition tag: ``wf``, ``hist``,
    ``seen``, ``status``, ``timers``, ``progress``, ``dlq``, ``done`` or ``msg``; ``pt``
    for a participant's own state, ``heartbeats``, or "" for a key not named here."""
    if key == heartbeat_key():
        return "heartbeats"
    if not key.startswith(f"{PREFIX}:{{"):
        return ""
    tag, _, rest = key.partition("}:")
    return "pt" if tag.startswith(f"{PREFIX}:{{pt:") else rest.split(":", 1)[0]


def instance_key(partition: int, workflow_id: str) -> str:
    """Hash holding a workflow instance: ``v`` (version), ``c`` (the token of the commit
    that wrote it) and ``s`` (state JSON)."""
    return f"{_tag(partition)}:wf:{workflow_id}"


def seen_key(partition: int, workflow_id: str) -> str:
    """Set of message ids already applied to a workflow (dedupe)."""
    return f"{_tag(partition)}:seen:{workflow_id}"


def history_key(partition: int, workflow_id: str) -> str:
    """List of a workflow's history entries (JSON), oldest first."""
    return f"{_tag(partition)}:hist:{workflow_id}"


def status_index_key(partition: int, status: str) -> str:
    """Sorted set of workflow ids in one status, scored by last update (ms)."""
    return f"{_tag(partition)}:status:{status}"


def timers_key(partition: int) -> str:
    """Sorted set of deadlines of a partition, scored by due time (ms)."""
    return f"{_tag(partition)}:timers"


def progress_stream(partition: int) -> str:
    """Stream of progress records of a partition, for live views."""
    return f"{_tag(partition)}:progress"


def dead_letter_stream(partition: int) -> str:
    """Stream of messages a consumer could not handle, with the reason."""
    return f"{_tag(partition)}:dlq"


def outcome_key(partition: int, participant: str, message_id: str) -> str:
    """A participant's record that it has handled one message (idempotency)."""
    return f"{_tag(partition)}:done:{participant}:{message_id}"


def participant_key(participant: str, name: str) -> str:
    """A key of a participant's own business state (one hash slot per participant)."""
    return f"{PREFIX}:{{pt:{participant}}}:{name}"


def participant_group(participant: str) -> str:
    """The consumer group of a participant on every stream it subscribes to."""
    return participant


def heartbeat_key() -> str:
    """Hash of live consumers: field = participant/consumer, value = JSON beat."""
    return f"{PREFIX}:heartbeats"
