"""The Redis memory workflows leave behind, by key family.

After the order phases, every ``ss:*`` key is sized with ``MEMORY USAGE … SAMPLES 0``
(every element counted, not sampled) and put in its family by its name (see
:mod:`contracts.naming`); dividing by the workflow instances found gives bytes per
workflow, which is what sizing a Redis for a given rate and retention needs.  The
baseline's keys (``bench:*``) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from contracts import naming
from controller.settings import ControllerSettings
from participants.sdk.connection import text
from participants.sdk.consumer import DEAD_LETTER_MAXLEN
from participants.sdk.runner import RunnerSettings

_CHUNK = 500

# families by contracts.naming.key_kind
_FAMILIES = {
    "wf": "instance",
    "hist": "history",
    "seen": "seen message ids",
    "status": "status index",
    "timers": "timers",
    "progress": "progress stream",
    "dlq": "dead letters",
    "done": "outcome records",
    "msg": "message streams",
    "pt": "participant state",
    "heartbeats": "heartbeats",
}
LEDGERS = _FAMILIES["pt"]
OTHER = "other"

_CONTROLLER, _RUNNER = ControllerSettings(consumer="-"), RunnerSettings(redis_url="redis://unused", consumer="-")
_RETENTION = f"until --retention-s ({_CONTROLLER.retention_s / 86_400:g} d) after the workflow ends"
KEPT = {
    "instance": _RETENTION,
    "history": _RETENTION,
    "seen message ids": _RETENTION,
    "status index": "until the workflow expires (the retention sweep)",
    "timers": "until the deadline fires or is cancelled",
    "progress stream": f"the newest ~{_CONTROLLER.progress_maxlen:,} records per partition (--progress-maxlen)",
    "dead letters": f"until replayed or purged (the newest ~{DEAD_LETTER_MAXLEN:,} per partition)",
    "outcome records": f"--outcome-ttl-s ({_RUNNER.outcome_ttl_s / 86_400:g} d) after the message was handled",
    "message streams": f"until every group read them and they are {_CONTROLLER.stream_min_age_s / 3600:g} h old",
    LEDGERS: "the example workers' ledgers: for ever",
    "heartbeats": "one field per live worker",
    OTHER: "",
}


def family_of(key: str) -> str:
    """The family of a key named by :mod:`contracts.naming`."""
    return _FAMILIES.get(naming.key_kind(key), OTHER)


@dataclass
class Family:
    keys: int = 0
    bytes: int = 0


@dataclass
class Footprint:
    workflows: int = 0
    """Workflow instances found (each workflow of the run, unless one expired)."""
    used_memory: int = 0
    """Redis's ``used_memory`` at the time: every key, the baseline's too, and Redis itself."""
    families: dict[str, Family] = field(default_factory=dict)

    def per_workflow(self) -> dict[str, float]:
        """Bytes per workflow, by family, largest first."""
        n = self.workflows or 1
        ranked = sorted(self.families.items(), key=lambda item: -item[1].bytes)
        return {name: family.bytes / n for name, family in ranked}

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflows": self.workflows,
            "used_memory": self.used_memory,
            "bytes_per_workflow": {name: round(b) for name, b in self.per_workflow().items()},
            "keys": {name: family.keys for name, family in self.families.items()},
        }

    def as_text(self) -> list[str]:
        total = sum(family.bytes for family in self.families.values())
        n = self.workflows or 1
        lines = [
            f"Redis memory after the run: {total / 1e6:.1f} MB in {sum(f.keys for f in self.families.values())} "
            f"streamsaga keys for {self.workflows} workflows, {total / n:,.0f} B per workflow "
            f"(used_memory {self.used_memory / 1e6:.1f} MB); by key family:",
        ]
        for name, per in self.per_workflow().items():
            family = self.families[name]
            lines.append(f"  {name:<18} {per:>8,.0f} B {family.keys:>8} keys   kept {KEPT.get(name, '')}")
        return lines


async def footprint(redis: Redis) -> Footprint:
    """Size every streamsaga key now (a SCAN and pipelined MEMORY USAGE: seconds for ~100,000 keys)."""
    found = Footprint()
    batch: list[str] = []
    async for raw in redis.scan_iter(match=naming.PREFIX + ":*", count=_CHUNK):
        batch.append(text(raw))
        if len(batch) >= _CHUNK:
            await _size(redis, batch, found)
            batch = []
    await _size(redis, batch, found)
    found.workflows = found.families.get("instance", Family()).keys
    info: dict[str, Any] = await redis.info("memory")
    found.used_memory = int(info.get("used_memory", 0))
    return found


async def _size(redis: Redis, keys: list[str], into: Footprint) -> None:
    if not keys:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = await pipe.execute()
    for key, size in zip(keys, sizes, strict=True):
        if size is None:  # expired or deleted since the SCAN
            continue
        family = into.families.setdefault(family_of(key), Family())
        family.keys += 1
        family.bytes += int(size)
