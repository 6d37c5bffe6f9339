"""The controller process's configuration: one typed object, built at the entry point."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from contracts.naming import DEFAULT_PARTITIONS
from controller import instance_cache
from controller.store import PROGRESS_MAXLEN
from participants.sdk.connection import DEFAULT_BLOCK_MS, MAX_BLOCK_MS
from participants.sdk.runner import default_consumer

REDIS_URL_ENV = "STREAMSAGA_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class ControllerSettings:
    """Everything a controller process needs; pass it to :func:`controller.app.create_app`."""

    redis_url: str = DEFAULT_REDIS_URL
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    partitions: int = DEFAULT_PARTITIONS
    consumer: str = field(default_factory=default_consumer)
    batch: int = 200
    block_ms: int = DEFAULT_BLOCK_MS
    retention_s: int = 7 * 86_400
    definitions_path: Path | None = None
    order_saga: bool = True
    """Run the built-in order saga besides the definitions file's workflows (``POST /v1/orders``)."""
    claim_idle_ms: int = 5_000
    max_deliveries: int = 5
    timer_interval_s: float = 0.05
    """How often due timers are fired (deadline precision)."""
    retention_interval_s: float = 30.0
    """How often streams are trimmed and expired workflows leave the status indexes."""
    stream_min_age_s: float = 3_600.0
    """Stream entries younger than this are never trimmed, even once every group has them."""
    liveness_grace_s: float = 15.0
    """After start-up, wait this long for workers' heartbeats, then warn about every
    step no live worker subscribes to (three of the SDK's default heartbeat intervals)."""
    liveness_forget_s: float = 3_600.0
    """A heartbeat this old (its worker died without stopping) is deleted by ``GET /v1/participants``."""
    progress_maxlen: int = PROGRESS_MAXLEN
    """Progress records kept per partition (about: trimmed by whole stream nodes), for
    live views to resume from; ~380 bytes each."""
    sse_keepalive_s: float = 15.0
    """An SSE stream with nothing to send this long gets a ``: keep-alive`` comment."""
    sse_buffer_events: int = 1_000
    """Events an SSE client may fall behind before it is disconnected with an ``overflow`` event."""
    instance_cache_size: int = instance_cache.DEFAULT_SIZE
    """Workflow instances kept in memory after this controller committed them, so the
    correlator decides a workflow's next event without reading it back (0: always read)."""
    access_log: bool = False
    """Log a line per HTTP request (aiohttp's access log, logger ``aiohttp.access``, at INFO)."""

    def __post_init__(self) -> None:
        if not self.order_saga and self.definitions_path is None:
            raise ValueError("without the order saga, give the workflows to run with --definitions FILE")
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {self.partitions}")
        if not 0 <= self.port <= 65_535:
            raise ValueError(f"port must be within 0..65535, not {self.port}")
        for name in ("batch", "block_ms", "retention_s", "claim_idle_ms", "max_deliveries", "progress_maxlen"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.block_ms > MAX_BLOCK_MS:
            raise ValueError(f"block_ms must be at most {MAX_BLOCK_MS}, not {self.block_ms}")
        if not 0 < self.timer_interval_s <= 1:
            raise ValueError(f"timer_interval_s must be within (0, 1], not {self.timer_interval_s}")
        for name in ("liveness_grace_s", "liveness_forget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, not {getattr(self, name)}")
        if not self.sse_keepalive_s > 0:
            raise ValueError(f"sse_keepalive_s must be positive, not {self.sse_keepalive_s}")
        if self.instance_cache_size < 0:
            raise ValueError(f"instance_cache_size must not be negative, not {self.instance_cache_size}")
        if self.sse_buffer_events < 1:
            raise ValueError(f"sse_buffer_events must be positive, not {self.sse_buffer_events}")
        if not self.consumer:
            raise ValueError("consumer must not be empty")
