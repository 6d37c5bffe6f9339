"""The envelope every stream entry carries, and its encoding as stream fields."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from contracts import naming

SCHEMA_VERSION = 1


class WorkflowRef(BaseModel):
    """The definition a message belongs to."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    version: int = 1


class Envelope(BaseModel):
    """One message on the wire.  Readers ignore fields they do not know."""

    model_config = ConfigDict(extra="ignore")

    message_id: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=64)
    schema_version: int = SCHEMA_VERSION
    correlation_id: str = Field(min_length=1, max_length=200)
    causation_id: str | None = None
    workflow: WorkflowRef
    producer: str
    # RFC 3339 with an offset: "format" alone is skipped by most validators, and says nothing of the offset
    occurred_at: AwareDatetime = Field(json_schema_extra={"pattern": r"^\d{4}-\d{2}-\d{2}T.*(Z|z|[+-]\d{2}:\d{2})$"})
    attempt: int = Field(default=1, ge=1)
    traceparent: str | None = None
    payload: dict[str, Any] = Field(default_factory=dict)


class DecodeError(Exception):
    """A stream entry that is not a valid envelope; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_message_id() -> str:
    return uuid.uuid4().hex


_URL_NAMESPACE = uuid.NAMESPACE_URL.bytes


def derived_message_id(causation_id: str, *parts: str) -> str:
    """A message id determined by the message it reacts to: re-running the same
    reaction yields the same id, so a consumer's dedupe catches the repeat."""
    # the hex of uuid.uuid5(uuid.NAMESPACE_URL, name), without building a UUID (under a third of the time)
    name = "/".join((causation_id, *parts)).encode()
    digest = bytearray(hashlib.sha1(_URL_NAMESPACE + name, usedforsecurity=False).digest()[:16])
    digest[6] = digest[6] & 0x0F | 0x50  # version 5
    digest[8] = digest[8] & 0x3F | 0x80  # the RFC 4122 variant
    return digest.hex()


def utcnow() -> datetime:
    return datetime.now(UTC)


def encode(envelope: Envelope) -> dict[str, bytes | str]:
    """The stream fields of an envelope."""
    return {
        naming.FIELD_TYPE: envelope.type,
        naming.FIELD_CORRELATION_ID: envelope.correlation_id,
        naming.FIELD_MESSAGE_ID: envelope.message_id,
        # straight to JSON in pydantic-core: the bytes orjson.dumps(model_dump(mode="json")) gave
        # (which refused integers beyond 64 bits), without the intermediate dicts: half the time
        naming.FIELD_ENVELOPE: envelope.__pydantic_serializer__.to_json(envelope, exclude_none=True),
    }


def _text(fields: dict[bytes, bytes], name: str) -> str:
    raw = fields.get(name.encode())
    if raw is None:
        raise DecodeError(f"missing stream field {name!r}")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"stream field {name!r} is not UTF-8") from exc


def decode(fields: dict[bytes, bytes]) -> Envelope:
    """Decode a stream entry's fields into an envelope, or raise :class:`DecodeError`.

    The routing fields must agree with the envelope they travel with.
    """
    message_type = _text(fields, naming.FIELD_TYPE)
    correlation_id = _text(fields, naming.FIELD_CORRELATION_ID)
    message_id = _text(fields, naming.FIELD_MESSAGE_ID)
    raw = fields.get(naming.FIELD_ENVELOPE.encode())
    if raw is None:
        raise DecodeError(f"missing stream field {naming.FIELD_ENVELOPE!r}")
    try:
        envelope = Envelope.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise DecodeError(f"invalid envelope at {where}: {first['msg']}") from exc
    if envelope.type != message_type:
        raise DecodeError(f"stream field type={message_type!r} disagrees with envelope type={envelope.type!r}")
    if envelope.correlation_id != correlation_id:
        raise DecodeError("stream field correlation_id disagrees with the envelope")
    if envelope.message_id != message_id:
        raise DecodeError("stream field message_id disagrees with the envelope")
    return envelope
