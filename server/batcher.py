"""Micro-batching: rows from concurrent requests share one defense call.

An expensive defense (MemGuard's batched boundary search, PURIFIER's ONNX reformer) costs much
less per row in one large call than in many small ones. One worker task takes whatever requests
are queued (up to `max_rows` rows, optionally waiting `max_wait` seconds for more), concatenates
rows of the same dtype and width, runs the defense once off the event loop, and hands every
request its own slice back. Defenses are deterministic per row (the `Defense` contract), so a
batched answer is identical to an unbatched one.

With `max_wait = 0` no request ever waits for company: batches form only from requests that
arrived while the previous defense call was running, so an idle sidecar adds no latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from purifier.defenses import Defense, IdentityDefense
from purifier.defenses.base import check_probabilities
from purifier_server.metrics import SidecarMetrics


@dataclass
class _Item:
    probs: np.ndarray            # (n, C)
    inputs: np.ndarray | None    # (n, D) or None
    future: asyncio.Future


class Batcher:
    """Coalesces `submit` calls into `defense.transform` calls.

    Args:
        defense: a loaded Defense.
        max_rows: rows per defense call (a single larger request still goes in one call).
        max_wait: seconds to wait for more rows after the first one (0: never wait).
        metrics: where batch sizes, defense time and distortion are recorded.
    """

    def __init__(self, defense: Defense, max_rows: int, max_wait: float, metrics: SidecarMetrics):
        self.defense = defense
        self.max_rows = max_rows
        self.max_wait = max_wait
        self.metrics = metrics
        # The identity "defense" is a copy: a thread hop would cost more than the work itself.
        self._inline = type(defense) is IdentityDefense
        self._executor = None if self._inline else ThreadPoolExecutor(1, thread_name_prefix="defense")
        self._queue: deque[_Item] = deque()
        self._wakeup: asyncio.Event | None = None
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
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, probs: np.ndarray, inputs: np.ndarray | None = None) -> np.ndarray:
        """Defend probs (n, C); returns (n, C) in the same dtype. Raises what the defense raised."""
        if self._task is None or self._task.done():
            raise RuntimeError("batcher is not running")
        # Validate here, per request: one client's NaN row must not fail the requests it shares
        # a defense call with.
        check_probabilities(probs, self.defense.n_classes)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(probs, inputs, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_wait > 0:
                deadline = loop.time() + self.max_wait
                while self._queued_rows() < self.max_rows and (left := deadline - loop.time()) > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), left)
                    except TimeoutError:
                        break
            items = self._take()
            if items:
                await self._process(items)

    def _queued_rows(self) -> int:
        return sum(len(i.probs) for i in self._queue)

    def _take(self) -> list[_Item]:
        items, rows = [], 0
        while self._queue and (not items or rows + len(self._queue[0].probs) <= self.max_rows):
            item = self._queue.popleft()
            if item.future.done():  # the caller gave up (deadline, cancellation)
                continue
            items.append(item)
            rows += len(item.probs)
        return items

    async def _process(self, items: list[_Item]) -> None:
        groups: dict[tuple, list[_Item]] = {}
        for item in items:
            width = None if item.inputs is None else item.inputs.shape[1:]
            groups.setdefault((item.probs.dtype.str, item.probs.shape[1], width), []).append(item)
        for group in groups.values():
            try:
                probs = group[0].probs if len(group) == 1 else np.concatenate([i.probs for i in group])
                inputs = None
                if self.defense.needs_inputs:
                    inputs = group[0].inputs if len(group) == 1 else np.concatenate([i.inputs for i in group])
                t0 = time.perf_counter()
                if self._inline:
                    defended = self.defense.transform(probs, inputs)
                else:
                    defended = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self.defense.transform, probs, inputs)
                self.metrics.defense_stage.observe(time.perf_counter() - t0)
                self.metrics.batch_rows.observe(len(probs))
                self.metrics.record_defense(probs, defended)
            except Exception as e:  # handed to every waiting request; each fails closed
                for item in group:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            offsets = np.cumsum([len(i.probs) for i in group])[:-1]
            for item, part in zip(group, np.split(defended, offsets), strict=True):
                if not item.future.done():
                    item.future.set_result(part)
