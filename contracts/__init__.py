"""streamsaga's wire contract: envelopes, payloads, definitions and stream naming.

Importable with neither redis nor aiohttp.  Everything else is imported by module path.
"""

from contracts.definitions import ORDER_SAGA, CompensationDefinition, Role, StepDefinition, WorkflowDefinition
from contracts.envelope import SCHEMA_VERSION, DecodeError, Envelope, WorkflowRef, decode, encode
from contracts.messages import PAYLOADS, Order, OrderIn, PayloadError, validate_payload
from contracts.naming import CONTROLLER_GROUP, DEFAULT_PARTITIONS, partition_of

__all__ = [
    "CONTROLLER_GROUP",
    "DEFAULT_PARTITIONS",
    "ORDER_SAGA",
    "PAYLOADS",
    "SCHEMA_VERSION",
    "CompensationDefinition",
    "DecodeError",
    "Envelope",
    "Order",
    "OrderIn",
    "PayloadError",
    "Role",
    "StepDefinition",
    "WorkflowDefinition",
    "WorkflowRef",
    "decode",
    "encode",
    "partition_of",
    "validate_payload",
]
