"""The set of workflow definitions a controller runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson
from pydantic import TypeAdapter

from contracts.definitions import ORDER_SAGA, Role, WorkflowDefinition
from contracts.messages import TIMER_FIRED

_MANY = TypeAdapter(list[WorkflowDefinition])


class NoDefinitions(ValueError):
    """A controller given no workflow to run."""


class UnknownWorkflow(LookupError):
    def __init__(self, name: str, version: int | None = None) -> None:
        super().__init__(f"no workflow definition {name!r}" + (f" version {version}" if version else ""))
        self.name = name


class Definitions:
    """Definitions by name (newest version) and by (name, version)."""

    def __init__(self, definitions: Iterable[WorkflowDefinition] = (ORDER_SAGA,)) -> None:
        self._by_version: dict[tuple[str, int], WorkflowDefinition] = {}
        self._latest: dict[str, WorkflowDefinition] = {}
        for definition in definitions:
            self._by_version[(definition.name, definition.version)] = definition
            current = self._latest.get(definition.name)
            if current is None or current.version < definition.version:
                self._latest[definition.name] = definition

    @classmethod
    def load(cls, path: Path | None, order_saga: bool = True) -> Definitions:
        """The built-in order saga (unless not ``order_saga``) plus the definitions in a
        JSON file (a list); raises :class:`NoDefinitions` when that leaves none."""
        extra = _MANY.validate_python(orjson.loads(path.read_bytes())) if path else []
        definitions = [ORDER_SAGA, *extra] if order_saga else extra
        if not definitions:
            raise NoDefinitions("no workflow definitions to run: the file has none, and the order saga is left out")
        return cls(definitions)

    def latest(self, name: str) -> WorkflowDefinition:
        try:
            return self._latest[name]
        except KeyError:
            raise UnknownWorkflow(name) from None

    def get(self, name: str, version: int) -> WorkflowDefinition:
        try:
            return self._by_version[(name, version)]
        except KeyError:
            raise UnknownWorkflow(name, version) from None

    def __iter__(self) -> Iterator[WorkflowDefinition]:
        return iter(self._by_version.values())

    def names(self) -> list[str]:
        return sorted(self._latest)

    def event_types(self) -> set[str]:
        """Every message type the controller correlates (its own timers included).

        A start event only the controller publishes, and that means nothing to it
        but "the first step started", is left out: :func:`state_machine.start`
        applies it when it publishes it, so reading it back would only find a duplicate.
        """
        needed: set[str] = {TIMER_FIRED}
        for definition in self._by_version.values():
            for message_type, roles in definition.roles.items():
                own_start = message_type == definition.start and all(role is Role.TRIGGER for _, role in roles)
                if not own_start:
                    needed.add(message_type)
        return needed

    def participant_types(self) -> dict[str, set[str]]:
        """participant -> the message types the definitions expect it to read."""
        reads: dict[str, set[str]] = {}
        for definition in self._by_version.values():
            for step in definition.steps:
                wanted = reads.setdefault(step.participant, set())
                wanted.add(step.command if step.orchestrated and step.command else step.trigger)
                if step.compensation:
                    wanted.add(step.compensation.command)
        return reads

    def all_types(self) -> set[str]:
        return {t for d in self._by_version.values() for t in d.message_types() | d.command_types()}
