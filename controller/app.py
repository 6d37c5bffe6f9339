"""The controller process: the aiohttp application, its lifecycles, and serving it.

``create_app(settings)`` builds the application; its ``cleanup_ctx`` opens the
Redis clients and runs the correlator as a background task, and on shutdown sets
the correlator's ``stop``, awaits the task and closes every client.  A one-shot
task warns, a grace period after start-up, about every step no live worker
subscribes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web
from aiohttp.log import access_logger
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts.schema import schemas
from controller import api, liveness, metrics
from controller.correlator import Correlator
from controller.definitions import Definitions
from controller.instance_cache import InstanceCache
from controller.progress import ProgressHub
from controller.retention import Retention
from controller.settings import ControllerSettings
from controller.store import WorkflowStore
from controller.timers import TimerPoller
from participants.sdk.connection import connect
from participants.sdk.consumer import RetryPolicy
from participants.sdk.logs import Outage
from participants.sdk.waiting import wait_until

log = logging.getLogger(__name__)

SETTINGS = api.SETTINGS
RECONNECT_S = 1.0
STOP_GRACE_S = 5.0


def create_app(settings: ControllerSettings) -> web.Application:
    """The controller's HTTP application; the correlator runs while the app does.

    Raises ``OSError`` or ``pydantic.ValidationError`` if ``settings.definitions_path``
    cannot be read or holds invalid definitions.
    """
    app = web.Application(client_max_size=api.MAX_BODY_BYTES, middlewares=[api.problems])
    app[SETTINGS] = settings
    app[api.DEFINITIONS] = Definitions.load(settings.definitions_path, settings.order_saga)
    app[api.CONTRACTS] = orjson.dumps(schemas())
    app[api.CORRELATOR_READY] = asyncio.Event()
    app[api.REDIS_OUTAGE] = Outage(logging.getLogger(api.__name__), "the API's Redis requests")
    app[api.REDIS_REFUSING] = Outage(logging.getLogger(api.__name__), "the API's Redis writes (refused)")
    app[metrics.METRICS] = metrics.ControllerMetrics(app[api.DEFINITIONS])
    app.add_routes(api.routes)
    app.add_routes(metrics.routes)
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_correlator)
    app.cleanup_ctx.append(_timers)
    app.cleanup_ctx.append(_retention)
    app.cleanup_ctx.append(_liveness)
    app.cleanup_ctx.append(_progress)
    app.on_shutdown.append(_end_progress_streams)  # before the server waits for open handlers
    return app


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = connect(settings.redis_url, name=f"streamsaga-controller-{settings.consumer}")
    app[api.REDIS] = client
    store = WorkflowStore(
        client,
        settings.partitions,
        retention_s=settings.retention_s,
        progress_maxlen=settings.progress_maxlen,
        observer=app[metrics.METRICS].observe,
        cache=InstanceCache(settings.instance_cache_size),
    )
    app[api.STORE] = store
    try:
        yield
    finally:
        await store.aclose()
        await client.aclose()


async def _correlator(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # Blocking XREADGROUP gets a client of its own so it never holds up the API's commands.
    reader = connect(settings.redis_url, name=f"streamsaga-correlator-{settings.consumer}")
    correlator = Correlator(
        reader,
        app[api.STORE],
        app[api.DEFINITIONS],
        settings.consumer,
        batch=settings.batch,
        block_ms=settings.block_ms,
        policy=RetryPolicy(max_deliveries=settings.max_deliveries, claim_idle_ms=settings.claim_idle_ms),
        metrics=app[metrics.METRICS],
    )
    ready = app[api.CORRELATOR_READY]
    try:
        # a blocked read returns within block_ms; give it that and a margin
        async with _running("correlator", lambda stop: _run_correlator(correlator, stop, ready), settings.block_ms):
            yield
    finally:
        await reader.aclose()


@contextlib.asynccontextmanager
async def _running(
    name: str,
    loop: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    block_ms: int = 0,
    *,
    on_stop: Callable[[], None] | None = None,
) -> AsyncIterator[None]:
    """Run ``loop(stop)`` as a background task; on exit set ``stop`` (and call ``on_stop``,
    for a loop stopped by other means) and await it — cancelling it only if it has not
    stopped within ``block_ms`` plus a grace period."""
    stop = asyncio.Event()
    task = asyncio.create_task(loop(stop), name=name)
    try:
        yield
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), block_ms / 1000 + STOP_GRACE_S)
        except TimeoutError:
            log.warning("%s did not stop in time; cancelling it", name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _retention(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    retention = Retention(
        app[api.REDIS],
        app[api.DEFINITIONS],
        settings.partitions,
        settings.retention_s,
        interval_s=settings.retention_interval_s,
        min_age_s=settings.stream_min_age_s,
    )
    async with _running("retention", retention.run):
        yield


async def _timers(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    poller = TimerPoller(app[api.REDIS], settings.partitions, interval_s=settings.timer_interval_s)
    async with _running("timers", poller.run):
        yield


async def _liveness(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(
        _warn_uncovered(app[api.REDIS], app[api.DEFINITIONS], app[SETTINGS], app[api.CORRELATOR_READY]),
        name="liveness check",
    )
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _progress(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # the hub blocks in XREAD: a client of its own, so the API's commands never wait behind it
    reader = connect(settings.redis_url, name=f"streamsaga-progress-{settings.consumer}")
    hub = ProgressHub(
        reader,
        settings.partitions,
        block_ms=settings.block_ms,
        buffer_events=settings.sse_buffer_events,
        keepalive_s=settings.sse_keepalive_s,
    )
    app[api.PROGRESS] = hub
    app[metrics.METRICS].sse_clients = lambda: hub.clients
    try:
        async with _running("progress hub", lambda _: hub.run(), hub.block_ms, on_stop=hub.stop):
            yield
    finally:
        await reader.aclose()


async def _end_progress_streams(app: web.Application) -> None:
    """End every SSE stream, so shutting down does not wait for clients that never leave."""
    if api.PROGRESS in app:
        app[api.PROGRESS].end_streams("the controller is stopping")


async def _warn_uncovered(
    redis: Redis, definitions: Definitions, settings: ControllerSettings, ready: asyncio.Event
) -> None:
    """Once the correlator is ready and workers had ``liveness_grace_s`` to send a
    heartbeat, log a warning for every step no live worker subscribes to."""
    await ready.wait()
    # a grace period for workers started with the controller, not a deadline of any workflow
    await asyncio.sleep(settings.liveness_grace_s)
    try:
        found = await liveness.participants(redis, settings.partitions)
    except (RedisError, OSError) as exc:
        log.warning("cannot check which steps have a live worker: %s", exc)
        return
    uncovered = liveness.uncovered_steps(definitions, found)
    for missing in uncovered:
        log.warning(
            "step %s of %s v%d: no live worker of %s subscribes to %s",
            missing.step.name,
            missing.definition.name,
            missing.definition.version,
            missing.step.participant,
            missing.message_type,
            extra={"step": missing.step.name, "message_type": missing.message_type},
        )
    if not uncovered:
        log.info("every step has a live worker (%d participants live)", sum(view.live for view in found))


async def _run_correlator(correlator: Correlator, stop: asyncio.Event, ready: asyncio.Event) -> None:
    """Prepare the consumer groups (waiting for Redis if need be), then correlate until ``stop``."""
    try:
        while not stop.is_set():
            try:
                await correlator.run(stop, ready)
            except (RedisError, OSError) as exc:
                ready.clear()
                log.warning("correlator cannot reach Redis (%s); trying again in %.0fs", exc, RECONNECT_S)
                await wait_until(stop, RECONNECT_S)
    finally:
        ready.clear()


async def serve(settings: ControllerSettings, stop: asyncio.Event) -> None:
    """Serve the API on ``settings.host:settings.port`` until ``stop`` is set, then shut down gracefully."""
    # the access log is off unless asked for: the correlator logs every workflow's changes,
    # and a line per request costs the controller a few percent of its CPU
    runner = web.AppRunner(create_app(settings), access_log=access_logger if settings.access_log else None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        log.info(
            "controller %s serving http://%s:%d (%d partitions)",
            settings.consumer,
            settings.host,
            settings.port,
            settings.partitions,
        )
        await stop.wait()
        log.info("controller %s stopping", settings.consumer)
    finally:
        await runner.cleanup()
