"""Micro-batching with admission control: rows from concurrent requests share one defense call.

An expensive defense (MemGuard's batched boundary search, PURIFIER's ONNX reformer) costs much
less per row in one large call than in many small ones. One worker task takes queued rows (up to
one call's worth, optionally waiting `max_wait` seconds for more), concatenates rows of the same
dtype and width, runs the defense once off the event loop, and hands every request its own slice
back. Defenses are deterministic per row (the `Defense` contract), so a batched or chunked answer
is identical to an unbatched one.

One call's worth is at most `max_rows` rows and at most what the defense gets through in `slice`
seconds, from the measured cost per row (`DefenseCost`), so a large request holds the defense for
a few milliseconds at a time whatever the defense costs per row (MemGuard's faithful solver, its
fast one and PURIFIER differ by orders of magnitude) and however loaded the machine is. Until a
call has been measured, a call takes `max_rows` rows.

Admission and fairness: at most `max_queued` rows wait (above: RESOURCE_EXHAUSTED at once, not a
growing queue and a deadline later), and requests larger than `max_rows` may fill it only up to
`max_queued - max_rows`, so there is always room for small ones. Requests that fit one call
("small") are defended whole, smallest first, several to a call; larger ones in chunks of one
call, fewest rows left first. While both kinds wait, calls alternate between the two: a one-row
request waits for at most the slice being defended and then its own short call, however many
maximum-size requests are queued, and large requests still get every other call.

With `max_wait = 0` a request waits for company only when company is on its way: while other
requests await their upstream's answer (`coming`), a call waits up to `gather` seconds for their
rows (or a call's worth), so that under concurrency the defense runs fewer, larger calls (the
fixed cost of a call, most of a one-row MemGuard call, is paid once per call). A lone request
never waits, so an idle sidecar adds no latency. Otherwise batches form from requests that
arrived while the previous defense call was running. Then a
request of a few rows (INLINE_ROWS, and INLINE_S by the measured cost) that finds the defense
idle, and that its caller says is alone (no other call in progress that could join it), is
defended on the event loop itself, skipping the two hops through the queue and the executor
thread, which cost about as much CPU as a one-row MemGuard call. A request with company always
queues: defended on the loop, one request at a time, concurrent requests would never coalesce
(each finds the defense idle again) and the loop would stop serving while the defense runs. The
work per row is the same either way (constant work is the defense's property, not the batcher's).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from purifier.defenses import Defense, IdentityDefense
from purifier.threads import limit_torch_threads
from purifier_server.errors import TooLarge
from purifier_server.metrics import SidecarMetrics

# A request that a defense other than the identity defends on the event loop when nothing else
# waits for the defense or runs in it (`Batcher.submit`): at most INLINE_ROWS rows, and at most
# INLINE_S seconds by the measured cost per row (a defense not measured yet goes through the queue).
INLINE_ROWS = 8
INLINE_S = 0.002


@dataclass(eq=False)
class _Item:
    probs: np.ndarray            # (n, C)
    inputs: np.ndarray | None    # (n, D) or None
    future: asyncio.Future
    done: int = 0                # rows defended so far
    parts: list[np.ndarray] = field(default_factory=list)

    @property
    def left(self) -> int:
        return len(self.probs) - self.done


class DefenseCost:
    """Rows per defense call that take about `slice` seconds, from a running estimate of the
    defense's cost per row (up to `cap` rows; `cap` until a call has been measured or with no slice).

    A call of at least half the current rows per call that took t seconds for n rows moves the
    estimate by `rate` towards t / n; smaller calls, whose fixed cost overstates the cost per row,
    leave it alone (the first call sets it, whatever its size). A call's cost per row falls as it
    takes more rows, so the rows per call climb until a call takes about the slice, and follow the
    machine's load.
    """

    def __init__(self, slice: float, cap: int, rate: float = 0.3):
        self.slice, self.cap, self.rate = slice, cap, rate
        self.per_row: float | None = None  # seconds

    def rows(self) -> int:
        if self.per_row is None or self.slice <= 0:
            return self.cap
        return max(1, min(self.cap, int(self.slice / self.per_row)))

    def observe(self, rows: int, seconds: float) -> None:
        if rows < 1:
            return
        if self.per_row is None:
            self.per_row = seconds / rows
            return
        if 2 * rows >= self.rows():
            self.per_row += self.rate * (seconds / rows - self.per_row)


class Batcher:
    """Coalesces `submit` calls into `defense.transform` calls.

    Args:
        defense: a loaded Defense.
        max_rows: most rows per defense call; larger requests are defended in chunks,
            interleaved with other requests.
        max_wait: seconds to wait for more rows after the first one (0: never wait).
        metrics: where batch sizes, queue length, defense time and distortion are recorded.
        max_queued: rows allowed to wait; a request that would exceed it is refused (TooLarge).
        slice: longest a call should hold the defense, in seconds: rows per call come from the
            measured cost (`DefenseCost`); 0 = always `max_rows` rows.
        gather: with `max_wait = 0`, seconds a call waits for more rows while `coming` (requests
            awaiting their upstream's answer, counted by the data plane) is not 0; 0 = never.
        clock: measures defense calls (tests inject one).
    """

    def __init__(self, defense: Defense, max_rows: int, max_wait: float, metrics: SidecarMetrics,
                 max_queued: int = 1 << 62, slice: float = 0.0, gather: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter):
        self.defense = defense
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.metrics = metrics
        self.max_queued = max_queued
        self.clock = clock
        self.cost = DefenseCost(slice, max_rows)
        self._identity = type(defense) is IdentityDefense  # a copy: cheaper than any thread hop
        self._busy = False  # a defense call is running on the executor
        self.gather = gather
        self.coming = 0  # requests on their way here: awaiting their upstream's answer (the data plane counts them)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="defense", initializer=limit_torch_threads)
        self._queue: list[_Item] = []
        self._queued_rows = 0
        self._small_turn = False  # whether the last call defended small requests
        self._wakeup = asyncio.Event()  # bound to the running loop on first use; start() makes a fresh one
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="defense-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(asyncio.CancelledError())
        self._queue.clear()
        self._set_queued(0)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, probs: np.ndarray, inputs: np.ndarray | None = None, alone: bool = True) -> np.ndarray:
        """Defend probs (n, C); returns (n, C) in the same dtype. Raises what the defense raised,
        or TooLarge when `max_queued` rows are already waiting.

        alone: no other call is in progress that could bring rows to coalesce with (the data
            plane's count of calls); False keeps the request off the event loop (`_on_the_loop`).
        """
        if self._task is None or self._task.done():
            raise RuntimeError("batcher is not running")
        if self._on_the_loop(len(probs), alone):
            return self._defend([probs], [inputs])
        # requests larger than one call leave one call's worth of room for small ones
        room = self.max_queued - (self.max_rows if len(probs) > self.max_rows else 0)
        if self._queued_rows + len(probs) > room:
            raise TooLarge(f"the defense queue is full ({self._queued_rows} rows waiting, max_queued_rows "
                           f"{self.max_queued}); retry later")
        item = _Item(probs, inputs, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        self._set_queued(self._queued_rows + len(probs))
        self._wakeup.set()
        try:
            return await item.future
        finally:
            self._forget(item)  # done, failed or abandoned by its caller (deadline, cancellation)

    def _on_the_loop(self, rows: int, alone: bool) -> bool:
        """Whether a request of `rows` rows is defended right here on the event loop, skipping the
        two hops through the queue and the executor thread. The identity, up to `max_rows` rows:
        a copy costs less than the hops, and coalescing copies saves nothing. Another defense only
        for a request that is `alone` and finds nothing waiting for the defense or running in it
        (nothing to coalesce with, now or soon), for at most INLINE_ROWS rows measured to take at
        most INLINE_S: then the hops would cost about what the defense does. Everything else goes
        through the queue (coalesced, sliced, fair)."""
        if self.max_wait != 0:
            return False
        if self._identity:
            return rows <= self.max_rows
        return (alone and rows <= INLINE_ROWS and not self._queue and not self._busy
                and self.cost.per_row is not None and self.cost.per_row * rows <= INLINE_S)

    def _set_queued(self, rows: int) -> None:
        self._queued_rows = rows
        self.metrics.queued_rows.set(rows)

    def _forget(self, item: _Item) -> None:
        """Take an item off the queue (answered, failed or abandoned); idempotent."""
        if item in self._queue:
            self._queue.remove(item)
            self._set_queued(self._queued_rows - item.left)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            wait = self.max_wait if self.max_wait > 0 else (self.gather if self.coming else 0.0)
            if wait > 0:
                deadline = loop.time() + wait
                while (self._queued_rows < self.cost.rows() and (self.max_wait > 0 or self.coming)
                       and (left := deadline - loop.time()) > 0):
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except TimeoutError:
                        break
            chunks = self._take()
            if chunks:
                await self._process(chunks)
            else:  # only abandoned items were queued: their callers take them off
                self._wakeup.clear()
                await self._wakeup.wait()

    def _take(self) -> list[tuple[_Item, int, int]]:
        """One call's worth of (item, start, stop) row ranges: small requests whole, smallest
        first, or chunks of large requests (fewest rows left first); alternating while both wait."""
        limit = self.cost.rows()
        live = sorted((i for i in self._queue if not i.future.done()), key=lambda i: i.left)
        small = [i for i in live if len(i.probs) <= limit]
        large = [i for i in live if len(i.probs) > limit]
        self._small_turn = bool(small) and (not large or not self._small_turn)
        chunks, rows = [], 0
        for item in small if self._small_turn else large:
            if rows == limit or (self._small_turn and rows + item.left > limit):
                break
            take = min(item.left, limit - rows)
            chunks.append((item, item.done, item.done + take))
            rows += take
        return chunks

    async def _process(self, chunks: list[tuple[_Item, int, int]]) -> None:
        groups: dict[tuple, list[tuple[_Item, int, int]]] = {}
        for chunk in chunks:
            item = chunk[0]
            width = None if item.inputs is None else item.inputs.shape[1:]
            groups.setdefault((item.probs.dtype.str, item.probs.shape[1], width), []).append(chunk)
        for group in groups.values():
            probs = [item.probs[a:b] for item, a, b in group]
            inputs = [None if item.inputs is None else item.inputs[a:b] for item, a, b in group]
            try:
                self._busy = True
                try:
                    parts = await asyncio.get_running_loop().run_in_executor(self._executor, self._defend, probs, inputs)
                finally:
                    self._busy = False
            except Exception as e:
                if len(group) > 1:  # find the culprit: one client's bad rows must not fail the others
                    for chunk in group:
                        await self._process([chunk])
                    continue
                item = group[0][0]
                self._forget(item)
                if not item.future.done():
                    item.future.set_exception(e)
                continue
            if len(group) == 1:
                parts = [parts]
            for (item, a, b), part in zip(group, parts, strict=True):
                if item.future.done():
                    continue
                item.parts.append(part)
                item.done = b
                self._set_queued(self._queued_rows - (b - a))
                if item.left == 0:
                    self._forget(item)
                    item.future.set_result(item.parts[0] if len(item.parts) == 1 else np.concatenate(item.parts))

    def _defend(self, probs: list[np.ndarray], inputs: list[np.ndarray | None]):
        """One defense call over requests' rows (same dtype and width). A single request -> its
        (n, C) answer; several -> a list of per-request slices."""
        single = len(probs) == 1
        batch = probs[0] if single else np.concatenate(probs)
        rows = None
        if self.defense.needs_inputs:  # then the data plane passes every request's rows
            rows = inputs[0] if single else np.concatenate(cast(list[np.ndarray], inputs))
        t0 = self.clock()
        defended = self.defense.transform(batch, rows)
        seconds = self.clock() - t0
        self.cost.observe(len(batch), seconds)
        self.metrics.defense_stage.observe(seconds)
        self.metrics.batch_rows.observe(len(batch))
        self.metrics.record_defense(batch, defended)
        if single:
            return defended
        return np.split(defended, np.cumsum([len(p) for p in probs])[:-1])
