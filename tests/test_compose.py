"""compose.yaml stays true to the code: its Redis is configured as documented and
every streamsaga command in it is one the CLI accepts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.cli import build_parser

COMPOSE = Path(__file__).parents[1] / "compose.yaml"


def services() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return found


def test_redis_keeps_an_append_only_file_synced_every_second_and_never_evicts() -> None:
    command = services()["redis"]["command"]
    assert command[0] == "redis-server"
    settings = dict(zip(command[1::2], command[2::2], strict=True))
    assert settings == {"--appendonly": "yes", "--appendfsync": "everysec", "--maxmemory-policy": "noeviction"}


def test_the_controller_and_all_four_workers_run_with_replicas_for_the_workers() -> None:
    found = services()
    assert {"controller", "payment", "inventory", "shipping", "notification"} <= set(found)
    for worker in ("payment", "inventory", "shipping", "notification"):
        assert found[worker]["deploy"]["replicas"] >= 2
        assert found[worker]["environment"]["STREAMSAGA_REDIS_URL"] == "redis://redis:6379/0"


@pytest.mark.parametrize("name", ["controller", "payment", "inventory", "shipping", "notification"])
def test_every_command_is_one_the_cli_accepts(name: str) -> None:
    command = services()[name]["command"]
    assert command[0] == "streamsaga"
    args = build_parser().parse_args(command[1:])
    assert args.command == command[1]


def test_the_files_the_image_copies_are_enough_to_install_the_package(tmp_path: Path) -> None:
    """What `docker compose up --build` runs, without Docker: build the wheel from exactly the
    files the Dockerfile copies (a package pyproject.toml lists but the image lacks fails it)."""
    root = COMPOSE.parent
    context = tmp_path / "image"
    context.mkdir()
    copies = [line.split()[1:] for line in (root / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    assert copies
    for *sources, destination in copies:
        for source in sources:
            target = context / (source if destination in ("./", ".") else destination)
            if (root / source).is_dir():
                shutil.copytree(root / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(root / source, target)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert list(tmp_path.glob("streamsaga-*.whl"))
