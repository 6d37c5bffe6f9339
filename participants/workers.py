"""The example workers of the order saga, by name, and how to run one.

``streamsaga worker NAME`` reads :class:`WorkerSettings` at its entry point and
calls :func:`run_worker`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from contracts import naming
from participants import inventory, ledger, notification, payment, shipping
from participants.sdk import Participant, RunnerSettings, run_participant
from participants.sdk.runner import default_consumer


@dataclass(frozen=True)
class WorkerSettings:
    """Everything an example worker process is configured with."""

    redis_url: str
    partitions: int = naming.DEFAULT_PARTITIONS
    consumer: str = field(default_factory=default_consumer)
    # the runner's own defaults (a dataclass field's default is its class attribute)
    concurrency: int = RunnerSettings.concurrency
    """Handlers in flight at once."""
    batch: int = RunnerSettings.batch
    """Entries per read, shared by the busy streams."""
    max_deliveries: int = RunnerSettings.max_deliveries
    claim_idle_ms: int = RunnerSettings.claim_idle_ms
    """Take over a dead peer's pending entries after this idle time."""
    payment_limit: Decimal = payment.DEFAULT_LIMIT
    default_stock: int = inventory.DEFAULT_STOCK
    countries: tuple[str, ...] = shipping.DEFAULT_COUNTRIES
    notify_fail_customers: tuple[str, ...] = ()
    """Customers whose notification fails (for demos and tests)."""
    refund_fail_customers: tuple[str, ...] = ()
    """Customers whose refund fails (for demos and tests of a compensation that needs attention)."""
    outcome_ttl_s: int = RunnerSettings.outcome_ttl_s
    """How long the record of a handled message (its idempotency key) is kept."""
    metrics_port: int = 0
    """Serve Prometheus metrics at ``GET /metrics`` on this port; 0: do not."""
    metrics_host: str = "127.0.0.1"

    def runner_settings(self) -> RunnerSettings:
        return RunnerSettings(
            redis_url=self.redis_url,
            partitions=self.partitions,
            consumer=self.consumer,
            concurrency=self.concurrency,
            batch=self.batch,
            max_deliveries=self.max_deliveries,
            claim_idle_ms=self.claim_idle_ms,
            # in-flight entries are refreshed every interval: well within claim_idle_ms
            pending_interval_s=min(0.5, self.claim_idle_ms / 4000),
            outcome_ttl_s=self.outcome_ttl_s,
            metrics_port=self.metrics_port,
            metrics_host=self.metrics_host,
        )


_BUILDERS: dict[str, Callable[[WorkerSettings], Participant]] = {
    ledger.PAYMENT: lambda s: payment.build(limit=s.payment_limit, refund_fail_customers=s.refund_fail_customers),
    ledger.INVENTORY: lambda s: inventory.build(default_stock=s.default_stock),
    ledger.SHIPPING: lambda s: shipping.build(countries=s.countries),
    ledger.NOTIFICATION: lambda s: notification.build(fail_customers=s.notify_fail_customers),
}
WORKER_NAMES = tuple(_BUILDERS)


def build(name: str, settings: WorkerSettings) -> Participant:
    """The participant of the example worker ``name``."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown worker {name!r}; expected one of {', '.join(WORKER_NAMES)}")
    return builder(settings)


async def run_worker(name: str, settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Run the example worker ``name`` until ``stop`` is set, then drain."""
    await run_participant(build(name, settings), settings.runner_settings(), stop)
