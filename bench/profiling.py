"""Where the time goes: Redis command statistics and py-spy recordings of children."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

log = logging.getLogger(__name__)


async def redis_counters(redis: Redis) -> dict[str, Any]:
    """Redis CPU seconds and per-command call/µs counters, to diff around a phase."""
    cpu = await redis.info("cpu")
    commands = await redis.info("commandstats")
    return {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "commands": {
            name.removeprefix("cmdstat_"): (int(stat["calls"]), int(stat["usec"])) for name, stat in commands.items()
        },
    }


def redis_delta(
    before: dict[str, Any], after: dict[str, Any], top: int = 12
) -> tuple[float, dict[str, dict[str, float]]]:
    """(Redis CPU seconds, the ``top`` commands by time) between two :func:`redis_counters`."""
    rows: dict[str, dict[str, float]] = {}
    for name, (calls, usec) in after["commands"].items():
        calls0, usec0 = before["commands"].get(name, (0, 0))
        if calls > calls0:
            rows[name] = {
                "calls": calls - calls0,
                "usec": usec - usec0,
                "us_per_call": (usec - usec0) / (calls - calls0),
            }
    ranked = dict(sorted(rows.items(), key=lambda item: -item[1]["usec"])[:top])
    for row in ranked.values():
        row["us_per_call"] = round(row["us_per_call"], 2)
    return after["cpu_s"] - before["cpu_s"], ranked


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.is_file() else shutil.which("py-spy")


class Recorder:
    """``py-spy record`` of some processes for the length of a phase (collapsed stacks)."""

    def __init__(self, out_dir: Path, pids: dict[str, int], rate: int = 250) -> None:
        self.out_dir = out_dir
        self.pids = pids
        self.rate = rate
        self._running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self) -> None:
        binary = py_spy()
        if binary is None:
            log.warning("py-spy is not installed (pip install py-spy); not profiling")
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            args = [binary, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw"]
            args += ["--output", str(self.out_dir / f"{name}.folded"), "--nonblocking"]
            err = (self.out_dir / f"{name}.py-spy.log").open("wb")
            self._running.append((name, subprocess.Popen(args, stdout=err, stderr=subprocess.STDOUT)))

    def stop(self) -> list[Path]:
        written = []
        for name, process in self._running:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            path = self.out_dir / f"{name}.folded"
            if path.is_file():
                written.append(path)
        self._running = []
        return written


def summarize(folded: Path, top: int = 25) -> str:
    """The functions with the most samples in a collapsed-stack file: self and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(folded):
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return f"{folded.name}: no samples"
    lines = [f"{folded.name}: {total} samples", "  self%  incl%  function"]
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}  {100 * inclusive[frame] / total:5.1f}  {frame}")
    return "\n".join(lines)


def callees(folded: Path, function: str, top: int = 25) -> str:
    """Where the samples under ``function`` (a name as :func:`summarize` prints it, or
    its start: ``Correlator.handle``) go: its direct callees, inclusive, and its own."""
    below: Counter[str] = Counter()
    total = under = 0
    for frames, count in _stacks(folded):
        total += count
        at = next((i for i, frame in enumerate(frames) if frame.startswith(function)), None)
        if at is None:
            continue
        under += count
        below[frames[at + 1] if at + 1 < len(frames) else "(its own code)"] += count
    if not under:
        return f"{folded.name}: no samples under {function!r}"
    lines = [f"{folded.name}: {function} in {100 * under / total:.1f}% of {total} samples", "  incl%  callee"]
    for frame, count in below.most_common(top):
        lines.append(f"  {100 * count / total:5.1f}  {frame}")
    return "\n".join(lines)


def _stacks(folded: Path) -> Iterator[tuple[list[str], int]]:
    """Each stack of a collapsed-stack file, outermost frame first, with its sample count."""
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield [_short(frame) for frame in stack.split(";")], int(count_text)


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path else name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profiling",
        description="Summarise py-spy collapsed-stack recordings (python -m bench --profile DIR writes them): "
        "the functions with the most samples, self and inclusive, or where one function's samples go.",
    )
    parser.add_argument("folded", nargs="+", type=Path, help="a .folded file")
    parser.add_argument("--top", type=int, default=40, help="rows to print (default: %(default)s)")
    parser.add_argument(
        "--under",
        metavar="FUNCTION",
        help="print FUNCTION's direct callees instead (e.g. Correlator.handle), inclusive, as %% of all samples",
    )
    args = parser.parse_args(argv)
    for path in args.folded:
        if not path.is_file():
            parser.error(f"no such file: {path}")
        print(callees(path, args.under, args.top) if args.under else summarize(path, args.top))


if __name__ == "__main__":
    main()
