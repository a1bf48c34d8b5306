"""An in-memory provider: the null implementation for manager tests and demos.

Instances are records in a dict. Tests drive it like an outside world: ``kill(id)``
makes an instance vanish unasked, ``set_health(id, health)`` plays the load balancer,
``fail_next(method, error)`` makes the next call of a method raise.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import replace

from fleet.model import Health, Instance, InstanceState
from fleet.providers.base import PermanentProviderError


class InMemoryProvider:
    name = "memory"

    def __init__(self, clock: Callable[[], float], *, start_healthy: bool = False) -> None:
        self._clock = clock
        self._start_healthy = start_healthy
        self.instances: dict[str, Instance] = {}
        self.calls: list[tuple[str, str]] = []
        self._failures: dict[str, deque[BaseException]] = defaultdict(deque)
        self._seq = 0

    # --- test controls ---------------------------------------------------------------------

    def fail_next(self, method: str, error: BaseException, times: int = 1) -> None:
        self._failures[method].extend([error] * times)

    def clear_failures(self, method: str) -> None:
        """The outside world recovers: the failures still queued for ``method`` are dropped."""
        self._failures[method].clear()

    def kill(self, instance_id: str, detail: str = "killed by SIGKILL") -> None:
        self.instances[instance_id] = replace(self.instances[instance_id],
                                              state=InstanceState.STOPPED, detail=detail)

    def set_health(self, instance_id: str, health: Health, inflight: int | None = None) -> None:
        instance = self.instances[instance_id]
        self.instances[instance_id] = replace(
            instance, health=health,
            inflight=instance.inflight if inflight is None else inflight)

    def live_ids(self) -> list[str]:
        return [i.id for i in self.instances.values() if i.live]

    # --- Provider protocol -----------------------------------------------------------------

    def _enter(self, method: str, argument: str) -> None:
        self.calls.append((method, argument))
        if self._failures[method]:
            raise self._failures[method].popleft()

    async def observe(self) -> tuple[Instance, ...]:
        self._enter("observe", "")
        # Stopping instances finish stopping between observations.
        for iid, instance in list(self.instances.items()):
            if instance.state is InstanceState.STOPPING:
                del self.instances[iid]
        return tuple(self.instances.values())

    async def launch(self, token: str) -> str:
        self._enter("launch", token)
        self._seq += 1
        iid = f"m{self._seq}"
        self.instances[iid] = Instance(id=iid, state=InstanceState.RUNNING,
                                       health=Health.UNUSED, address=f"10.0.0.{self._seq}:80",
                                       launched_at=self._clock())
        return iid

    async def bootstrap(self, instance_id: str) -> None:
        self._enter("bootstrap", instance_id)
        self._get(instance_id)

    async def register(self, instance_id: str) -> None:
        self._enter("register", instance_id)
        health = Health.HEALTHY if self._start_healthy else Health.INITIAL
        self.instances[instance_id] = replace(self._get(instance_id), registered=True,
                                              health=health)

    async def deregister(self, instance_id: str) -> None:
        self._enter("deregister", instance_id)
        self.instances[instance_id] = replace(self._get(instance_id), health=Health.DRAINING)

    async def terminate(self, instance_id: str, graceful: bool = True) -> None:
        self._enter("terminate", instance_id)
        if instance_id in self.instances:
            self.instances[instance_id] = replace(
                self.instances[instance_id], state=InstanceState.STOPPING,
                health=Health.UNUSED, registered=False)

    async def close(self) -> None:
        self._enter("close", "")
        self.instances.clear()

    def _get(self, instance_id: str) -> Instance:
        try:
            return self.instances[instance_id]
        except KeyError:
            raise PermanentProviderError(f"no instance {instance_id!r}") from None
