"""May a request go to the upstream now? The model check, health, identity probes, and waiting for them.

`Readiness` owns what the sidecar knows about the upstream model: the connection generation the
model check (`preflight.check_model`) passed for, or why it refused the model. Two tasks keep it
current:

* the poller: every `health_poll_s` (or at once when a request suspects an outage) it asks
  ModelReady; an upstream that is not ready is unverified until it is back and checked again;
  after every (re)connection, and while the model check refuses the model, it runs the check;
* the prober, on its own clock (never right after a ModelReady): at random times, at most
  `identity_check_s` apart, it asks the upstream a few of the fingerprint's questions again
  (`preflight.identity_probe`) in a request that looks like any client's: an id drawn like every
  forwarded request's (`upstream_request_id`), the row count, model version, representation and
  deadline of a recent client request, rows that no model check sends (`Fingerprint.probe_rows`),
  each row once before any comes back. Answers of another model turn the sidecar NOT_SERVING
  until RECOVERY_PROBES probes in a row, at short random intervals, match again; neither a
  reconnect nor the model check (which an upstream can recognise) clears it.

Requests do not fail because the upstream is restarting: `wait_verified` holds a request until
the upstream is back and verified (bounded by the request's deadline and `max_waiting_requests`),
and `recheck` tells a request whose upstream call failed with UNAVAILABLE (or NOT_FOUND while a
model reloads) whether the upstream went away (then it waits and asks again) or answered that
itself (then the error is the answer). An answer that arrived over another connection than the
verified one is never used (`still_verified`): the request waits for the check and asks again.

What the identity probes guarantee, and what not (docs/serving.md#model-identity says the same
to users): the upstream cannot tell a probe from a client request by its id, size, version,
representation, requested outputs, deadline or timing, nor by remembering what a model check
asked. If it answers some fraction f of the requests it cannot tell apart with another model,
each probe finds out with probability at least f, so after n probes it has gone unnoticed with
probability at most (1 - f)^n; probes come on average every identity_check_s / 2 seconds. Once
found out, it is served again only after RECOVERY_PROBES matching probes in a row (probability
(1 - f)^RECOVERY_PROBES per try). The probe rows are a finite stored set: an upstream that
remembers inputs and answers the ones it sees again with the fitted model is caught only by a
row's first use, so for about len(probe_rows) / k probes of k rows. Probes carry no request
parameters or application metadata (copying a client's could replay a sequence id or a trace).
Only the embedded backend checks the model file itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable

import numpy as np

from purifier.defenses import Defense
from purifier_server.errors import NotServing, RequestError, UpstreamFailed, WaitedTooLong
from purifier_server.metrics import SidecarMetrics
from purifier_server.model_description import Description
from purifier_server.outputs import ClassIndexOutput
from purifier_server.preflight import Checked, ModelCheck, ModelRefused, check_model, identity_probe
from purifier_server.settings import Settings
from purifier_server.upstream import Upstream, upstream_request_id

log = logging.getLogger("purifier_server")
RECENT_REQUESTS = 256
# row counts of probes before any client request was seen
FIRST_PROBE_ROWS = 8
# matching probes in a row, at short random intervals, before a model a probe found out is served again
RECOVERY_PROBES = 5


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
        self._refused: str | None = None        # why the model check refused the model, until it passes
        self._mismatch: str | None = None       # why a probe refused it: only matching probes clear it
        self.peer_refusal: str | None = None    # why another worker refuses it (workers.py)
        self._matches_needed = 0                # matching probes in a row still needed to clear _mismatch
        self._ready = False                     # the last ModelReady answer
        self._checked: Checked | None = None
        # what clients are told about the model: from the first check that passed (or given: a
        # worker of `serve --workers` is given worker 0's), never refreshed; `on_described(d)` is
        # called when it is taken
        self.description: Description | None = None
        self.on_described: Callable[[Description], None] | None = None
        self._changed = asyncio.Event()         # replaced after every poll and state change
        self._poke = asyncio.Event()
        self._polls_started = self._polls_done = 0
        self._waiting = 0
        self._recent: collections.deque = collections.deque(maxlen=RECENT_REQUESTS)
        # Probe timing and row choice must be unpredictable to the upstream, and they are no
        # defense output (which must be a deterministic keyed function of the input): the
        # operating system's randomness, no seeded generator an upstream could reproduce.
        self._random = random.SystemRandom()
        self._unasked: list[int] = []           # probe rows in the order probes take them
        self._probing = not settings.embedded  # the embedded model is checked by its file's hash
        self._tasks: list[asyncio.Task] = []

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
        if self.description is None:
            self.description = checked.description
            if self.on_described is not None:
                self.on_described(checked.description)
        elif checked.description != self.description:
            changed = [f.name for f in dataclasses.fields(Description)
                       if getattr(checked.description, f.name) != getattr(self.description, f.name)]
            why = (f"model metadata: the upstream's description of the model ({', '.join(changed)}) changed since "
                   "the sidecar first checked it, and clients are told only that one; restart the sidecar to serve "
                   "the new one")
            if at_start:
                raise ModelRefused(why)
            self._refuse(why, generation)
            return
        self.class_outputs, self._checked = checked.outputs, checked
        was_refused = self._refused is not None
        self._refused, self._verified, self._ready = None, generation, True  # it answered the check: ready
        log.log(logging.WARNING if checked.warn else logging.INFO,
                f"upstream model checked: {checked.note}" + (" (it matches again)" if was_refused else "")
                + (f"; a probe found another model before, so {self._matches_needed} matching probes in a row "
                   "are needed" if self._mismatch else ""), extra={"model": self.check.name})

    def _refuse(self, why: str, generation: int) -> None:
        if why != self._refused:
            log.error(f"upstream model refused: {why}", extra={"model": self.check.name})
        self._refused, self._verified = why, generation

    def _probe_interval(self) -> float:
        """Seconds to the next probe: uniform up to identity_check_s; while a probe's mismatch is
        being cleared, up to health_poll_s (short, so the matches needed come in a burst the
        upstream cannot wait out)."""
        longest = self.settings.identity_check_s
        if self._mismatch is not None:
            longest = min(longest, self.settings.health_poll_s)
        return self._random.uniform(0.0, longest)

    def _can_probe(self) -> bool:
        return (self._probing and self._checked is not None and self._checked.probe is not None
                and self._refused is None and self._verified == self.upstream.generation)

    def _draw_rows(self, rows: int, pool: np.ndarray) -> np.ndarray:
        """`rows` distinct rows of `pool`: each pool row once, in a random order, before any comes back."""
        members = set(pool.tolist())
        left = [i for i in self._unasked if i in members]
        if len(left) < rows:
            fresh = list(members - set(left))
            self._random.shuffle(fresh)
            left += fresh
        self._unasked = left[rows:]
        return np.asarray(left[:rows], np.int64)

    async def _probe_identity(self) -> None:
        """Ask a few fingerprint questions in a request shaped like a recent client's (its rows,
        version, representation and deadline)."""
        probe = None if self._checked is None else self._checked.probe
        if probe is None:  # `_can_probe` asks only when there is one
            return
        pool = probe.probe_rows
        if self._recent:
            rows, version, raw, timeout = self._random.choice(self._recent)
        else:
            rows, version, raw = self._random.randint(1, FIRST_PROBE_ROWS), self.check.version, True
            timeout = self.settings.upstream_timeout_s
        chosen = self._draw_rows(probe.batch or min(rows, len(pool)), pool)
        generation = self.upstream.generation
        try:
            await identity_probe(self.upstream, self.defense, self.check, probe, chosen, upstream_request_id(),
                                 version, raw, self.encoding, timeout)
        except ModelRefused as e:
            self.metrics.identity_probes.labels("mismatch").inc()
            if self.upstream.generation == generation:  # else the check after the reconnect runs first
                if self._mismatch is None:
                    log.error(f"upstream model refused: {e}", extra={"model": self.check.name})
                self._mismatch, self._matches_needed = str(e), RECOVERY_PROBES
            return
        except (UpstreamFailed, TimeoutError) as e:
            self.metrics.identity_probes.labels("failed").inc()
            log.warning("identity probe did not complete", extra={"model": self.check.name, "error": str(e)})
            return
        self.metrics.identity_probes.labels("match").inc()
        if self._mismatch is not None and self.upstream.generation == generation:
            self._matches_needed -= 1
            if self._matches_needed <= 0:
                self._mismatch = None
                log.info(f"upstream model matches the fingerprint again ({RECOVERY_PROBES} probes in a row)",
                         extra={"model": self.check.name})

    # --- polling --------------------------------------------------------------------------------

    def verified(self) -> bool:
        return self._refusing() is None and self._verified == self.upstream.generation

    def own_refusal(self) -> str | None:
        """Why this process refuses the upstream model (its model check or an identity probe), or None."""
        return self._refused or self._mismatch

    def _refusing(self) -> str | None:
        return self._refused or self._mismatch or self.peer_refusal

    async def set_peer_refusal(self, why: str | None) -> None:
        """Another worker of this sidecar refuses the upstream model (`why`), or none does any more
        (None): every worker refuses while one does (workers.py), so no connection reaches a model
        that one of them caught answering as another."""
        if why != self.peer_refusal:
            self.peer_refusal = why
            self._notify()
            await self._tell_health()

    async def _tell_health(self) -> None:
        if self.on_health is not None:
            await self.on_health(self._ready and self.verified())

    async def poll_once(self) -> None:
        upstream = self.upstream
        ready = self._ready = await upstream.ready(self.check.name, self.check.version)
        if not ready:
            self._verified, self._refused = None, None  # check when it is back (a probe's mismatch stays)
        elif self._verified != upstream.generation or self._refused is not None:
            await self.check_model()
        await self._tell_health()

    async def _poll(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.settings.health_poll_s)
            self._poke.clear()
            self._polls_started += 1
            try:
                await self.poll_once()
            except Exception:  # the poller must survive anything; health stays as it was
                log.exception("health poll failed", extra={"model": self.check.name})
            finally:
                self._polls_done += 1
                self._notify()

    async def _probe_loop(self) -> None:
        """Identity probes on their own random clock, apart from the poller's ModelReady calls."""
        while True:
            await asyncio.sleep(self._probe_interval())
            if not self._can_probe():
                continue
            try:
                await self._probe_identity()
                await self._tell_health()
            except Exception:  # the prober must survive anything
                log.exception("identity probe failed", extra={"model": self.check.name})
            finally:
                self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll(), name="upstream-health")]
        if self._probing:
            self._tasks.append(loop.create_task(self._probe_loop(), name="identity-probes"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._notify()

    # --- what requests ask (dataplane.Readiness) ------------------------------------------------

    def refusal(self) -> RequestError | None:
        """None while the upstream model is verified for its current connection; else why not."""
        if self.own_refusal() is not None:
            return NotServing("the upstream model was refused by the sidecar's model check; see the sidecar log")
        if self.peer_refusal is not None:
            return NotServing("the upstream model was refused by another worker's model check; see the sidecar log")
        if self._verified != self.upstream.generation:
            self._poke.set()
            return NotServing("the upstream model is not verified yet; retry shortly")
        return None

    def note_request(self, rows: int, version: str, raw: bool, timeout: float | None = None) -> None:
        """A client request went upstream: identity probes imitate its row count, version,
        representation and deadline (timeout: seconds its caller's deadline left, None: the
        sidecar's own upstream_timeout_s)."""
        self._recent.append((rows, version, raw, self.settings.upstream_timeout_s if timeout is None else timeout))

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
                if self._refusing() is not None:
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
        refused = self.refusal()
        if refused is not None:
            raise refused
        return self.upstream.generation  # the generation the check passed for

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
