"""Child processes of a benchmark run: start, watch CPU, stop — always.

Children run in their own session so that a Ctrl-C in the terminal reaches only
the benchmark, which then stops them in order (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ChildFailed(RuntimeError):
    """A child process exited while the benchmark still needed it."""


def streamsaga_command(override: str | None = None) -> list[str]:
    """How to run the ``streamsaga`` CLI: ``override`` (a shell-style command line), else this environment's."""
    if override:
        command = shlex.split(override)
        # "python" means this environment's interpreter, not whichever one PATH finds
        return [sys.executable, *command[1:]] if command and command[0] in ("python", "python3") else command
    script = Path(sys.executable).with_name("streamsaga")
    if script.is_file():
        return [str(script)]
    found = shutil.which("streamsaga")
    return [found] if found else [sys.executable, "-m", "controller"]


class Child:
    """One child process whose output goes to ``<log_dir>/<name>.log``."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def start(self) -> Child:
        log.debug("starting %s: %s", self.name, " ".join(self.args))
        with self.log_path.open("wb") as out:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    def check(self) -> None:
        """Raise :class:`ChildFailed` if the process has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise ChildFailed(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"  {self.name}| {line}" for line in text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful drain), then SIGKILL after ``timeout``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            process.kill()
            process.wait()


class Children:
    """The children of a run, stopped in reverse start order on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        child = Child(name, args, self.log_dir, env).start()
        self.started.append(child)
        return child

    def check(self) -> None:
        for child in self.started:
            child.check()

    def stop(self, names: Sequence[str] | None = None) -> None:
        for child in reversed(self.started):
            if names is None or child.name in names:
                child.stop()
        self.started = [c for c in self.started if c.process is not None]

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _descendants(pid: int) -> list[int]:
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                found += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
            except OSError:
                continue
    return found


def cpu_seconds(pid: int, *, descendants: bool = True) -> float:
    """User + system CPU time of a process and (by default) its live descendants (Linux /proc)."""
    total = 0
    for member in _descendants(pid) if descendants else [pid]:
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        # the command name (field 2) may contain spaces; fields 14 and 15 follow it
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total / _CLOCK_TICKS


class CpuMeter:
    """CPU seconds used by named processes between :meth:`start` and :meth:`stop`.

    Each child counts with its descendants; ``own`` (the benchmark itself, the
    parent of every child) counts alone.
    """

    def __init__(self, pids: Mapping[str, int], own: str | None = None) -> None:
        self.pids = dict(pids)
        self.own = own
        self._start: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, descendants=name != self.own) for name, pid in self.pids.items()}

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        now = self._read()
        used = {name: max(now[name] - self._start.get(name, 0.0), 0.0) for name in self.pids}
        used["total"] = sum(used.values())
        return used


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"
