"""compose.yaml stays true to the code: its Redis is configured as documented and
every streamsaga command in it is one the CLI accepts."""

from __future__ import annotations

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
