"""Instances as this controller committed them last, kept so the next event of a
workflow need not read it back from Redis (which ones: see
:meth:`controller.store.WorkflowStore.committed`).

A cached instance is only a guess at the current state: another controller may
have moved the workflow on, or Redis may have expired it.  Correctness never
rests on it — every commit carries the version it was decided on, and the commit
script refuses it when Redis holds another one.  Whoever gets that refusal (or
any reply it cannot be sure of) forgets the entry and reads the instance again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.instance import Instance

DEFAULT_SIZE = 10_000


class InstanceCache:
    """A bounded LRU of instances by workflow id; ``size`` 0 keeps nothing."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 0:
            raise ValueError(f"the instance cache size must not be negative, not {size}")
        self.size = size
        self._instances: OrderedDict[str, Instance] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._instances)

    def get(self, workflow_id: str) -> Instance | None:
        instance = self._instances.get(workflow_id)
        if instance is None:
            self.misses += 1
            return None
        self._instances.move_to_end(workflow_id)
        self.hits += 1
        return instance

    def holds(self, instance: Instance) -> bool:
        """Whether ``instance`` itself (not a copy) is the one kept for its workflow."""
        return self._instances.get(instance.id) is instance

    def put(self, instance: Instance) -> None:
        """Keep ``instance`` as its workflow's latest committed state, unless a later
        version is kept already (two commits of this process may report back out of
        order).  It must not be modified afterwards; the state machine never modifies
        the instance it decides on."""
        if self.size == 0:
            return
        kept = self._instances.get(instance.id)
        if kept is not None and kept.version > instance.version:
            return
        self._instances[instance.id] = instance
        self._instances.move_to_end(instance.id)
        if len(self._instances) > self.size:
            self._instances.popitem(last=False)

    def forget(self, workflow_id: str) -> None:
        self._instances.pop(workflow_id, None)
