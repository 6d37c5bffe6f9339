"""A runner's Prometheus metrics, scraped over HTTP from its ``metrics_port`` while it runs on a real Redis."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from contracts import naming
from controller.cli import build_parser
from controller.embedded_redis import free_port
from participants.sdk import Message, Participant, Reject, Reply, Retry, Runner, RunnerSettings
from participants.sdk.metrics import DeadLetterReason, HandlerOutcome, RunnerMetrics
from participants.workers import WorkerSettings
from tests.conftest import eventually
from tests.participants.helpers import dead_letters, emitted, envelope, fast_settings, publish, running, stream_of

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def shaky() -> Participant:
    """Ping answers, Nope is rejected, Boom always fails, Later asks to be retried once."""
    p = Participant("shaky")

    @p.on("Ping")
    async def ping(msg: Message) -> Reply:
        return Reply("Pong", {"n": msg.payload.get("n")})

    @p.on("Nope")
    async def nope(msg: Message) -> None:
        raise Reject("never")

    @p.on("Boom")
    async def boom(msg: Message) -> None:
        raise RuntimeError("boom")

    @p.on("Later")
    async def later(msg: Message) -> None:
        if msg.attempt == 1:
            raise Retry("not yet", delay=0.01)

    return p


async def scrape(port: int) -> Samples:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def messages(samples: Samples, message_type: str, outcome: str) -> float | None:
    labels = {"participant": "shaky", "type": message_type, "outcome": outcome}
    return samples.get(("streamsaga_handler_messages_total", frozenset(labels.items())))


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_handler_outcomes_durations_and_dead_letters_are_served_on_the_metrics_port(
    redis: Redis, redis_url: str
) -> None:
    port = free_port()
    ping = envelope("Ping", {"n": 1})
    async with running(shaky(), fast_settings(redis_url, metrics_port=port)):
        before = await scrape(port)
        assert sample(before, "streamsaga_handler_in_flight", participant="shaky") == 0
        await publish(redis, ping)
        await eventually(lambda: emitted(redis, "Pong"), lambda found: len(found) == 1, what="a Pong")
        await publish(redis, ping)  # a redelivery: acked without running the handler
        for message_type in ("Nope", "Boom", "Later"):
            await publish(redis, envelope(message_type))
        await redis.xadd(stream_of(ping), {"garbage": "1"})
        await eventually(lambda: dead_letters(redis), lambda found: len(found) == 3, what="three dead letters")
        found = await eventually(
            lambda: scrape(port), lambda s: messages(s, "Later", "ok") == 1, what="Later handled on its retry"
        )

    assert messages(found, "Ping", HandlerOutcome.OK) == 1
    assert messages(found, "Ping", HandlerOutcome.DUPLICATE) == 1
    assert messages(found, "Ping", HandlerOutcome.DEAD_LETTERED) == 1  # the garbage on its stream
    assert messages(found, "Nope", HandlerOutcome.REJECTED) == 1
    assert messages(found, "Boom", HandlerOutcome.FAILED) == 2
    assert messages(found, "Boom", HandlerOutcome.DEAD_LETTERED) == 1  # its third and last delivery failed too
    assert messages(found, "Later", HandlerOutcome.RETRY) == 1
    for reason in (DeadLetterReason.UNDECODABLE, DeadLetterReason.REJECTED, DeadLetterReason.EXHAUSTED):
        assert sample(found, "streamsaga_dead_letters_total", group="shaky", reason_kind=reason) == 1, reason
    runs = {"Ping": 1, "Nope": 1, "Boom": 3, "Later": 2}  # a duplicate or garbage runs no handler
    for message_type, count in runs.items():
        labels = {"participant": "shaky", "type": message_type}
        assert sample(found, "streamsaga_handler_duration_seconds_count", **labels) == count, message_type
    assert sample(found, "streamsaga_handler_in_flight", participant="shaky") == 0
    assert ("process_cpu_seconds_total", frozenset()) in found


async def test_a_dead_letter_is_counted_once_it_is_written_not_each_time_writing_it_failed(
    redis: Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    stream = stream_of(envelope("Ping"))
    dead_letter_stream = naming.dead_letter_stream(naming.partition_of_key(stream))
    await redis.set(dead_letter_stream, "not a stream")  # every dead-letter commit fails: WRONGTYPE
    async with running(shaky(), fast_settings(redis_url, metrics_port=port, max_deliveries=50)):
        garbage = await redis.xadd(stream, {"garbage": "1"})
        await eventually(
            lambda: redis.xpending_range(stream, "shaky", garbage, garbage, 1),
            lambda found: bool(found) and int(found[0]["times_delivered"]) >= 3,
            what="two failed attempts to dead-letter the garbage",
        )
        failing = await scrape(port)
        await redis.delete(dead_letter_stream)
        await eventually(lambda: dead_letters(redis), lambda found: len(found) == 1, what="the dead letter")
        found = await eventually(
            lambda: scrape(port),
            lambda s: messages(s, "Ping", HandlerOutcome.DEAD_LETTERED) is not None,
            what="the dead letter counted",
        )

    assert messages(failing, "Ping", HandlerOutcome.DEAD_LETTERED) is None
    assert sample(
        failing, "streamsaga_dead_letters_total", group="shaky", reason_kind=DeadLetterReason.UNDECODABLE
    ) in (None, 0)
    assert messages(found, "Ping", HandlerOutcome.DEAD_LETTERED) == 1
    assert sample(found, "streamsaga_dead_letters_total", group="shaky", reason_kind=DeadLetterReason.UNDECODABLE) == 1
    # and logged once, when it landed
    assert sum("dead-lettered" in r.getMessage() for r in caplog.records if r.name == "participants.sdk.runner") == 1


async def test_the_metrics_endpoint_stops_with_the_runner(redis_url: str) -> None:
    port = free_port()
    async with running(shaky(), fast_settings(redis_url, metrics_port=port)):
        await scrape(port)

    with pytest.raises(aiohttp.ClientConnectionError):
        await scrape(port)


async def test_a_metrics_port_in_use_fails_the_start_before_the_runner_announces_itself(
    redis: Redis, redis_url: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runner = Runner(shaky(), fast_settings(redis_url, metrics_port=port))
        with pytest.raises(OSError, match="address already in use"):
            await runner.__aenter__()

    assert await redis.hget(naming.heartbeat_key(), runner.heartbeat_field) is None


def test_no_metrics_port_serves_nothing_and_an_impossible_one_is_refused(redis_url: str) -> None:
    assert RunnerSettings(redis_url=redis_url).metrics_port == 0
    with pytest.raises(ValueError, match="metrics_port"):
        RunnerSettings(redis_url=redis_url, metrics_port=70_000)


def test_runners_in_one_process_count_into_registries_of_their_own() -> None:
    first, second = RunnerMetrics("a", "a"), RunnerMetrics("b", "b")

    first.message("Ping", HandlerOutcome.OK)

    labels = {"participant": "a", "type": "Ping", "outcome": "ok"}
    assert first.registry.get_sample_value("streamsaga_handler_messages_total", labels) == 1
    assert second.registry.get_sample_value("streamsaga_handler_messages_total", labels) is None


def test_the_worker_command_passes_its_metrics_port_and_host_to_the_runner() -> None:
    args = build_parser().parse_args(["worker", "payment", "--metrics-port", "9101", "--metrics-host", "0.0.0.0"])
    assert (args.metrics_port, args.metrics_host) == (9101, "0.0.0.0")
    assert build_parser().parse_args(["worker", "payment"]).metrics_port is None  # WorkerSettings decides: off

    settings = WorkerSettings(redis_url="redis://x", metrics_port=9101, metrics_host="0.0.0.0").runner_settings()

    assert (settings.metrics_port, settings.metrics_host) == (9101, "0.0.0.0")
    assert WorkerSettings(redis_url="redis://x").runner_settings().metrics_port == 0
