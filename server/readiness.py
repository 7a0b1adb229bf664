"""May a request go to the upstream now? The model check, health, identity probes, and waiting for them.

`Readiness` owns what the sidecar knows about the upstream model: the connection generation the
model check (`preflight.check_model`) passed for, or why it refused the model. A poller task
keeps it current:

* every `health_poll_s` (or at once when a request suspects an outage) it asks ModelReady; an
  upstream that is not ready is unverified until it is back and checked again;
* after every (re)connection, and while the model is refused, it runs the full model check;
* at random times, at most `identity_check_s` apart, it asks the upstream a few of the
  fingerprint's questions again (`preflight.identity_probe`) in a request that looks like any
  client's: an id drawn like every forwarded request's (`upstream_request_id`), the row count,
  model version and representation of a recent client request, rows drawn from the stored
  set. Answers of another model turn the sidecar NOT_SERVING until the upstream matches again.

Requests do not fail because the upstream is restarting: `wait_verified` holds a request until
the upstream is back and verified (bounded by the request's deadline and `max_waiting_requests`),
and `recheck` tells a request whose upstream call failed with UNAVAILABLE (or NOT_FOUND while a
model reloads) whether the upstream went away (then it waits and asks again) or answered that
itself (then the error is the answer). An answer that arrived over another connection than the
verified one is never used (`still_verified`): the request waits for the check and asks again.

What the identity probes guarantee, and what not (docs/serving.md says the same to users): the
upstream cannot tell a probe from a client request by its id, size, version, representation,
requested outputs or timing. If it answers some fraction f of the requests it cannot tell
apart with another model, each probe finds out with probability at least f, so after n probes
it has gone unnoticed with probability at most (1 - f)^n; probes come on average every
identity_check_s / 2 seconds. The probe inputs are a finite stored set (64 rows for defenses
fitted now): an upstream that remembers inputs and answers the ones it sees again with the
fitted model is not caught. Probes carry no request parameters or application metadata. Only
the embedded backend checks the model file itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import numpy as np

from purifier.defenses import Defense
from purifier_server.errors import NotServing, RequestError, UpstreamFailed, WaitedTooLong
from purifier_server.metrics import SidecarMetrics
from purifier_server.outputs import ClassIndexOutput
from purifier_server.preflight import Checked, ModelCheck, ModelRefused, check_model, identity_probe
from purifier_server.settings import Settings
from purifier_server.upstream import Upstream, upstream_request_id

log = logging.getLogger("purifier_server")
RECENT_REQUESTS = 256
# row counts of probes before any client request was seen
FIRST_PROBE_ROWS = 8


class Readiness:
    """See the module doc. Implements the servicer's `Readiness` protocol.

    `on_health(serving)` is awaited whenever what health should say may have changed.
    """

    def __init__(self, settings: Settings, upstream: Upstream, defense: Defense, check: ModelCheck,
                 metrics: SidecarMetrics, encoding: str | None):
        self.settings, self.upstream, self.defense, self.check = settings, upstream, defense, check
        self.metrics, self.encoding = metrics, encoding
        self.on_health: Callable[[bool], Awaitable[None]] | None = None
        self.class_outputs: dict[str, ClassIndexOutput] = {}
        self._verified: int | None = None       # upstream generation the model check passed for
        self._refused: str | None = None        # why the model was refused, until it passes again
        self._refused_by_probe = False          # refused by an identity probe: only a probe clears it
        self._checked: Checked | None = None
        self._changed = asyncio.Event()         # replaced after every poll and state change
        self._poke = asyncio.Event()
        self._polls_started = self._polls_done = 0
        self._waiting = 0
        self._recent: collections.deque = collections.deque(maxlen=RECENT_REQUESTS)
        # Probe timing and row choice must be unpredictable to the upstream, and they are no
        # defense output (which must be a deterministic keyed function of the input): the
        # operating system's randomness, no seeded generator an upstream could reproduce.
        self._random = random.SystemRandom()
        self._next_probe = 0.0
        self._probing = not settings.embedded  # the embedded model is checked by its file's hash
        self._poller: asyncio.Task | None = None

    # --- the model check --------------------------------------------------------------------------

    async def check_model(self, at_start: bool = False) -> None:
        """Run the model check; record the generation it passed for, or why it refused the model.

        At start-up a refusal is raised (purifier serve exits 2); later it is logged once and
        health stays NOT_SERVING. An upstream that does not answer leaves the model unverified.
        """
        generation = self.upstream.generation
        try:
            checked = await check_model(self.upstream, self.defense, self.check)
        except ModelRefused as e:
            if at_start:
                raise
            self._refuse(str(e), generation)
            return
        except (UpstreamFailed, TimeoutError) as e:
            if at_start and self.settings.embedded:
                raise
            log.warning("upstream model check did not complete; retrying at the next poll",
                        extra={"model": self.check.name, "error": str(e)})
            return
        self.class_outputs, self._checked = checked.outputs, checked
        was_refused = self._refused is not None
        self._refused, self._refused_by_probe, self._verified = None, False, generation
        self._schedule_probe()
        log.log(logging.WARNING if checked.warn else logging.INFO,
                f"upstream model checked: {checked.note}" + (" (it matches again)" if was_refused else ""),
                extra={"model": self.check.name})

    def _refuse(self, why: str, generation: int, by_probe: bool = False) -> None:
        if why != self._refused:
            log.error(f"upstream model refused: {why}", extra={"model": self.check.name})
        self._refused, self._refused_by_probe, self._verified = why, by_probe, generation

    def _schedule_probe(self) -> None:
        loop = asyncio.get_running_loop()
        self._next_probe = loop.time() + self._random.uniform(0.0, self.settings.identity_check_s)

    def _probe_due(self) -> bool:
        return (self._probing and self._checked is not None and self._checked.probe is not None
                and asyncio.get_running_loop().time() >= self._next_probe)

    async def _probe_identity(self) -> None:
        """Ask a few fingerprint questions in a request shaped like a recent client's.

        While a probe's mismatch keeps the model refused, probes go on at every poll and the first
        that matches serves again: the full model check (a ModelMetadata call, then all stored
        rows at once) is easy to recognise, so it does not clear what a probe found.
        """
        probe = self._checked.probe
        self._schedule_probe()
        stored = len(probe.fingerprint.inputs)
        if self._recent:
            rows, version, raw = self._random.choice(self._recent)
        else:
            rows, version, raw = self._random.randint(1, min(FIRST_PROBE_ROWS, stored)), self.check.version, True
        rows = probe.batch or min(rows, stored)
        chosen = np.asarray(self._random.sample(range(stored), rows), np.int64)
        generation = self.upstream.generation
        try:
            await identity_probe(self.upstream, self.defense, self.check, probe, chosen, upstream_request_id(),
                                 version, raw, self.encoding)
        except ModelRefused as e:
            self.metrics.identity_probes.labels("mismatch").inc()
            if self.upstream.generation == generation:  # else the full check after the reconnect decides
                self._refuse(str(e), generation, by_probe=True)
            return
        except (UpstreamFailed, TimeoutError) as e:
            self.metrics.identity_probes.labels("failed").inc()
            log.warning("identity probe did not complete", extra={"model": self.check.name, "error": str(e)})
            return
        self.metrics.identity_probes.labels("match").inc()
        if self._refused_by_probe and self.upstream.generation == generation:
            self._refused, self._refused_by_probe = None, False
            log.info("upstream model matches the fingerprint again", extra={"model": self.check.name})

    # --- polling --------------------------------------------------------------------------------

    def verified(self) -> bool:
        return self._refused is None and self._verified == self.upstream.generation

    async def poll_once(self) -> None:
        upstream = self.upstream
        ready = await upstream.ready(self.check.name, self.check.version)
        if not ready:
            self._verified, self._refused, self._refused_by_probe = None, None, False  # check when it is back
        elif self._verified != upstream.generation or (self._refused is not None and not self._refused_by_probe):
            await self.check_model()
        elif self._refused_by_probe or self._probe_due():
            await self._probe_identity()
        if self.on_health is not None:
            await self.on_health(ready and self.verified())

    async def _poll(self) -> None:
        while True:
            timeout = self.settings.health_poll_s
            if self.verified() and self._probing and self._checked is not None and self._checked.probe is not None:
                timeout = min(timeout, max(self._next_probe - asyncio.get_running_loop().time(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), timeout)
            self._poke.clear()
            self._polls_started += 1
            try:
                await self.poll_once()
            except Exception:  # the poller must survive anything; health stays as it was
                log.exception("health poll failed", extra={"model": self.check.name})
            finally:
                self._polls_done += 1
                self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="upstream-health")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        self._notify()

    # --- what requests ask (dataplane.Readiness) ------------------------------------------------

    def refusal(self) -> RequestError | None:
        """None while the upstream model is verified for its current connection; else why not."""
        if self._refused is not None:
            return NotServing("the upstream model was refused by the sidecar's model check; see the sidecar log")
        if self._verified != self.upstream.generation:
            self._poke.set()
            return NotServing("the upstream model is not verified yet; retry shortly")
        return None

    def note_request(self, rows: int, version: str, raw: bool) -> None:
        """A client request went upstream: identity probes imitate its row count, version and representation."""
        self._recent.append((rows, version, raw))

    async def _wait(self, done: Callable[[], bool], deadline: float) -> None:
        """Until `done()` after a poll or state change; WaitedTooLong past `deadline` (loop time),
        NotServing when `max_waiting_requests` already wait."""
        if done():
            return
        if self._waiting >= self.settings.max_waiting_requests:
            raise NotServing(f"the upstream model is not verified yet and {self._waiting} requests already wait for "
                             "it (max_waiting_requests); retry shortly")
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            while not done():
                if self._refused is not None:
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise WaitedTooLong("the upstream model was not back and verified within the request's "
                                        "deadline; retry later")
                self._poke.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)
        finally:
            self._waiting -= 1

    async def wait_verified(self, deadline: float) -> int:
        """Wait until the upstream model is verified for the current connection; its generation.

        deadline: loop time. NotServing when the model is refused, past the deadline, or when
        too many requests wait already.
        """
        if not self.verified():
            await self._wait(self.verified, deadline)
        if self._refused is not None:
            raise self.refusal()
        return self._verified

    async def recheck(self, generation: int, deadline: float) -> bool:
        """After an upstream call over `generation` failed as if the upstream were away: True when
        it was (not ready, or reconnected since: wait and ask again), False when it is still up and
        verified (the failure is its answer)."""
        target = self._polls_started + 1  # a poll that starts after the failure
        await self._wait(lambda: self._polls_done >= target, deadline)
        return not (self.verified() and self._verified == generation)

    def still_verified(self, generation: int) -> bool:
        """Whether an answer that came over `generation` may be used (the connection it came over
        is the one the model check verified)."""
        return self.verified() and self._verified == generation
