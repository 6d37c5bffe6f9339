"""The example workers of the order saga, by name, and how to run one.

``streamsaga worker NAME`` reads :class:`WorkerSettings` at its entry point and
calls :func:`run_worker`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from decimal import Decimal

from contracts import naming
from participants import inventory, notification, payment, shipping
from participants.sdk import Participant, RunnerSettings, run_participant
from participants.sdk.runner import default_consumer

WORKER_NAMES = ("payment", "inventory", "shipping", "notification")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything an example worker process is configured with."""

    redis_url: str
    partitions: int = naming.DEFAULT_PARTITIONS
    consumer: str = field(default_factory=default_consumer)
    concurrency: int = 64
    """Handlers in flight at once."""
    batch: int = 200
    """XREADGROUP COUNT."""
    max_deliveries: int = 5
    claim_idle_ms: int = 5000
    """Take over a dead peer's pending entries after this idle time."""
    payment_limit: Decimal = payment.DEFAULT_LIMIT
    default_stock: int = inventory.DEFAULT_STOCK
    countries: tuple[str, ...] = shipping.DEFAULT_COUNTRIES
    notify_fail_customers: tuple[str, ...] = ()
    """Customers whose notification fails (for demos and tests)."""
    refund_fail_customers: tuple[str, ...] = ()
    """Customers whose refund fails (for demos and tests of a compensation that needs attention)."""
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
            metrics_port=self.metrics_port,
            metrics_host=self.metrics_host,
        )


def build(name: str, settings: WorkerSettings) -> Participant:
    """The participant of the example worker ``name``."""
    if name == "payment":
        return payment.build(limit=settings.payment_limit, refund_fail_customers=settings.refund_fail_customers)
    if name == "inventory":
        return inventory.build(default_stock=settings.default_stock)
    if name == "shipping":
        return shipping.build(countries=settings.countries)
    if name == "notification":
        return notification.build(fail_customers=settings.notify_fail_customers)
    raise ValueError(f"unknown worker {name!r}; expected one of {', '.join(WORKER_NAMES)}")


async def run_worker(name: str, settings: WorkerSettings, stop: asyncio.Event) -> None:
    """Run the example worker ``name`` until ``stop`` is set, then drain."""
    await run_participant(build(name, settings), settings.runner_settings(), stop)
