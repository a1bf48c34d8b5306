"""The one narrow interface between the fleet manager and the things it runs on.

A provider only observes and acts; it never decides. The manager calls it from its
asyncio loop, one action at a time, and awaits each call, so every method must return
promptly (seconds): long work such as an SSH bootstrap is started in the background and
reported through :meth:`Provider.observe` (state ``bootstrapping``), never awaited here.

Errors (after kopf's ``TemporaryError`` / ``PermanentError``):

- :class:`TransientProviderError` — may succeed if retried later (throttling, network,
  capacity). The manager retries with a growing delay.
- :class:`PermanentProviderError` — retrying the same call will not help (bad AMI, no
  permission, unknown instance). The manager records an event and backs off to its cap.

Anything else a provider raises is a bug; the manager logs it with its traceback, records
an event, treats it as transient and keeps running.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fleet.model import Instance


class ProviderError(Exception):
    """Base of the errors a provider raises on purpose."""


class TransientProviderError(ProviderError):
    """The call failed but may succeed later."""


class PermanentProviderError(ProviderError):
    """The call failed and repeating it unchanged will fail again."""


@runtime_checkable
class Provider(Protocol):
    """Observe and act on instances. ``name`` is ``"local"`` or ``"aws"``.

    Contract:

    - ``observe()`` returns every instance this fleet owns that is not yet forgotten,
      including ones just launched that the backend does not list yet (EC2's eventual
      consistency), with state, target health and, if known, in-flight requests.
      Instances the provider was asked to terminate are reported ``stopping`` until gone.
      A worker that went away without being asked is reported ``stopped``.
    - ``launch(token)`` starts one instance and returns its id. ``token`` is unique per
      launch decision; pass it as the idempotency token where the backend has one.
    - ``bootstrap(id)`` starts set-up of an instance that is up and not bootstrapped.
    - ``register(id)`` / ``deregister(id)`` add it to / remove it from the load
      balancer; deregistering lets in-flight requests finish (health ``draining``,
      then ``unused``).
    - ``terminate(id, graceful)`` deregisters if needed and makes the instance go away;
      ``graceful=False`` kills at once (dead or hung instances). Idempotent: terminating
      an instance already gone is not an error.
    - ``close()`` releases what the provider holds. The local provider stops every
      worker process; the AWS provider leaves instances running (they are adopted on the
      next start).
    """

    name: str

    async def observe(self) -> tuple[Instance, ...]: ...

    async def launch(self, token: str) -> str: ...

    async def bootstrap(self, instance_id: str) -> None: ...

    async def register(self, instance_id: str) -> None: ...

    async def deregister(self, instance_id: str) -> None: ...

    async def terminate(self, instance_id: str, graceful: bool = True) -> None: ...

    async def close(self) -> None: ...
