import asyncio

import numpy as np
import pytest

from purifier.errors import InvalidProbabilities
from purifier_server.batcher import Batcher, DefenseCost
from purifier_server.metrics import SidecarMetrics


async def _with_batcher(defense, max_rows, max_wait, body, **options):
    b = Batcher(defense, max_rows, max_wait, SidecarMetrics(), **options)
    b.start()
    try:
        return await body(b)
    finally:
        await b.close()


def test_concurrent_requests_are_coalesced_and_equal_unbatched(flatten, probs):
    parts = np.array_split(probs, 16)
    expected = [flatten.transform(p) for p in parts]
    flatten.calls.clear()

    async def body(b):
        return await asyncio.gather(*(b.submit(p) for p in parts))

    got = asyncio.run(_with_batcher(flatten, max_rows=1000, max_wait=0.05, body=body))
    assert len(flatten.calls) < len(parts)          # coalesced
    assert sum(flatten.calls) == len(probs)          # every row exactly once
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and np.array_equal(g, e)


def test_max_rows_caps_each_defense_call(flatten, probs):
    parts = np.array_split(probs, 16)  # 4 rows each

    async def body(b):
        return await asyncio.gather(*(b.submit(p) for p in parts))

    asyncio.run(_with_batcher(flatten, max_rows=8, max_wait=0.02, body=body))
    assert max(flatten.calls) <= 8 and sum(flatten.calls) == len(probs)


def test_mixed_dtypes_are_defended_separately_and_errors_reach_every_waiter(flatten, probs):
    bad = probs[:2].copy()
    bad[0, 0] = np.nan

    async def body(b):
        return await asyncio.gather(b.submit(probs[:3]), b.submit(probs[3:5].astype(np.float64)),
                                    b.submit(bad), return_exceptions=True)

    ok32, ok64, err = asyncio.run(_with_batcher(flatten, 1000, 0.05, body))
    assert ok32.dtype == np.float32 and ok64.dtype == np.float64
    assert np.array_equal(ok64, flatten.transform(probs[3:5].astype(np.float64)))
    assert isinstance(err, InvalidProbabilities)


def test_submit_after_close_fails_closed(flatten, probs):
    async def body():
        b = Batcher(flatten, 8, 0.0, SidecarMetrics())
        b.start()
        await b.close()
        with pytest.raises(RuntimeError, match="not running"):
            await b.submit(probs[:1])

    asyncio.run(body())


def test_large_requests_are_chunked_after_small_ones_and_equal_unbatched(flatten, probs):
    """One 64-row request and three 1-row requests, 8 rows per call: the first call holds the three
    small requests only, then the large one is defended in chunks of 8."""
    large, small = probs, [probs[i:i + 1] for i in range(3)]
    expected = flatten.transform(large)
    flatten.calls.clear()

    async def body(b):
        return await asyncio.gather(b.submit(large), *(b.submit(s) for s in small))

    got_large, *got_small = asyncio.run(_with_batcher(flatten, max_rows=8, max_wait=0.0, body=body))
    assert flatten.calls == [3] + [8] * 8
    assert np.array_equal(got_large, expected)                     # chunks reassembled in order
    for got, s in zip(got_small, small, strict=True):
        assert np.array_equal(got, flatten.transform(s))


def test_small_and_large_calls_alternate_while_both_wait(probs):
    """Small requests arriving while a large one is chunked get every other call, not the end of the line."""
    import threading

    from purifier.defenses import Defense

    calls: list[int] = []
    gate = threading.Semaphore(0)

    class Stepped(Defense):
        name = "test-stepped"

        def _transform(self, p, inputs):
            calls.append(len(p))
            gate.acquire(timeout=10)        # one call at a time, released by the test
            return p, None

    async def body():
        b = Batcher(Stepped(), 8, 0.0, SidecarMetrics(), max_queued=1000)
        b.start()
        try:
            large = asyncio.ensure_future(b.submit(probs[:32]))           # 4 chunks of 8
            await asyncio.sleep(0.05)                                      # chunk 1 is running
            smalls = [asyncio.ensure_future(b.submit(probs[32 + i:33 + i])) for i in range(2)]
            await asyncio.sleep(0.05)
            for _ in range(8):
                gate.release()
                await asyncio.sleep(0.05)
            return await asyncio.gather(large, *smalls)
        finally:
            for _ in range(8):
                gate.release()
            await b.close()

    large, *smalls = asyncio.run(body())
    assert calls == [8, 2, 8, 8, 8]                                        # the small pair right after chunk 1
    assert np.array_equal(large, probs[:32]) and [len(s) for s in smalls] == [1, 1]


def test_a_full_queue_refuses_at_once_and_keeps_room_for_small_requests(probs):
    import threading

    from purifier.defenses import Defense
    from purifier_server.errors import TooLarge

    release = threading.Event()

    class Held(Defense):
        """Blocks the defense thread until released."""

        name = "test-held"

        def _transform(self, p, inputs):
            release.wait(10)
            return p, None

    async def body():
        b = Batcher(Held(), 8, 0.0, SidecarMetrics(), max_queued=40)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(probs[:16]))        # being defended, 16 rows queued
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(b.submit(probs[16:32]))     # large requests may fill 40 - 8 rows
            await asyncio.sleep(0.05)
            with pytest.raises(TooLarge, match="the defense queue is full"):
                await b.submit(probs[32:41])                           # 9 more large rows: refused at once
            small = asyncio.ensure_future(b.submit(probs[40:41]))      # a small request still fits
            await asyncio.sleep(0.05)
            assert b.metrics.registry.get_sample_value("purifier_defense_queued_rows") == 33
            release.set()
            return await asyncio.gather(first, second, small)
        finally:
            release.set()
            await b.close()

    first, second, small = asyncio.run(body())
    assert np.array_equal(first, probs[:16]) and np.array_equal(second, probs[16:32])
    assert np.array_equal(small, probs[40:41])


# --- rows per call from the measured cost --------------------------------------------------

def test_rows_per_call_converge_to_the_slice_from_the_measured_cost():
    """Calls that cost a + b * rows: rows per call climb to the most that fit the slice, from a
    first call far too slow (a warm-up) or far too large, and one-row calls barely move them."""
    a, b, slice_s = 300e-6, 60e-6, 0.005
    best = int((slice_s - a) / b)  # 78
    assert DefenseCost(slice_s, 256).rows() == 256  # nothing measured yet: the cap
    assert DefenseCost(0.0, 256).rows() == 256  # no slice: the cap
    for first_rows, first_seconds in ((256, 0.060), (256, a + 256 * b), (1, a + b)):
        cost = DefenseCost(slice_s, 256)
        cost.observe(first_rows, first_seconds)
        sizes = []
        for _ in range(40):
            n = cost.rows()
            sizes.append(n)
            cost.observe(n, a + b * n)
            for _ in range(5):  # one-row requests between the chunks
                cost.observe(1, a + b)
        assert sizes[-10:] == [best] * 10, sizes
        assert all(a + b * n <= 1.05 * slice_s for n in sizes[1:] if n > best)  # overshoots are small
    slow = DefenseCost(slice_s, 256)
    slow.observe(4, 0.100)  # 25 ms a row (a faithful solver): one row per call, not zero
    assert slow.rows() == 1
    assert DefenseCost(slice_s, 50).rows() == 50


class Clock:
    """A clock that moves only when the defense works: a + b * rows per call."""

    def __init__(self, a: float, b: float):
        self.now, self.a, self.b = 0.0, a, b

    def __call__(self) -> float:
        return self.now


def timed(clock: Clock, gate=None):
    """A deterministic defense whose calls take clock.a + clock.b * rows on `clock`, recorded as
    (start time, rows, first row) and, with `gate`, released one at a time by the test."""
    from purifier.defenses import Defense

    calls: list[tuple[float, int, np.ndarray]] = []

    class Timed(Defense):
        name = "test-timed"

        def _transform(self, p, inputs):
            calls.append((clock.now, len(p), p[0].copy()))
            if gate is not None:
                gate.acquire(timeout=10)
            clock.now += clock.a + clock.b * len(p)
            return p ** 0.5 / (p ** 0.5).sum(axis=1, keepdims=True), None

    return Timed(), calls


def test_large_requests_are_cut_into_slices_of_the_measured_cost(probs):
    clock = Clock(a=300e-6, b=60e-6)
    defense, calls = timed(clock)
    big = np.random.default_rng(1).dirichlet(np.ones(10), size=2000).astype(np.float32)

    async def body():
        b = Batcher(defense, 256, 0.0, SidecarMetrics(), slice=0.005, clock=clock)
        b.start()
        try:
            return await b.submit(big)
        finally:
            await b.close()

    got = asyncio.run(body())
    rows = [n for _, n, _ in calls]
    assert rows[0] == 256 and sum(rows) == len(big)  # nothing measured yet: max rows
    # from the second call on, calls take about the slice (78 rows: 4.98 ms)
    assert all(clock.a + clock.b * n <= 1.05 * 0.005 for n in rows[1:])
    assert set(rows[10:-1]) == {78} and rows[-1] <= 78
    assert np.array_equal(got, defense.transform(big))  # chunks reassembled: the unbatched answer


def test_a_one_row_request_waits_one_slice_beside_four_maximum_size_requests(probs):
    """Four clients with 1,000-row requests queued, a one-row request arrives while the first
    chunk is defended: it is in the very next call, and no call after the first holds the
    defense longer than the slice."""
    import threading

    clock = Clock(a=300e-6, b=60e-6)
    gate = threading.Semaphore(0)
    defense, calls = timed(clock, gate)
    rng = np.random.default_rng(2)
    large = [rng.dirichlet(np.ones(10), size=1000).astype(np.float32) for _ in range(4)]
    one = probs[:1]

    async def body():
        b = Batcher(defense, 256, 0.0, SidecarMetrics(), max_queued=8192, slice=0.005, clock=clock)
        b.cost.observe(50, clock.a + 50 * clock.b)  # a sidecar that has served before
        b.cost.observe(1, clock.a + clock.b)
        b.start()
        try:
            big = [asyncio.ensure_future(b.submit(x)) for x in large]
            while not calls:
                await asyncio.sleep(0.01)  # the first chunk is being defended
            submitted = clock.now
            small = asyncio.ensure_future(b.submit(one))
            await asyncio.sleep(0.05)
            while not all(f.done() for f in [small, *big]):
                gate.release()
                await asyncio.sleep(0.005)
            return submitted, await small, await asyncio.gather(*big)
        finally:
            for _ in range(200):
                gate.release()
            await b.close()

    submitted, got_one, got_large = asyncio.run(body())
    start, rows, first = calls[1]
    assert rows == 1 and np.allclose(first, one[0], atol=1e-6)  # the one-row call comes second
    assert start - submitted <= 0.005  # it waited at most one slice
    assert all(clock.a + clock.b * n <= 0.005 for _, n, _ in calls)
    assert np.array_equal(got_one, defense.transform(one))
    for got, x in zip(got_large, large, strict=True):
        assert np.array_equal(got, defense.transform(x))


def test_a_small_request_to_an_idle_defense_is_defended_on_the_loop_and_a_busy_one_queues(flatten, probs):
    """With nothing queued or running, a few rows of a defense measured to be cheap skip the
    executor thread (the hops would cost about what the defense does); while a call runs, or
    while other calls are in progress (they would never coalesce), or before the defense has been
    measured, or above INLINE_ROWS, requests go through the queue."""
    import threading

    from purifier_server.batcher import INLINE_ROWS

    threads: list[int] = []
    real = flatten.transform

    def recording(p, inputs=None):
        threads.append(threading.get_ident())
        return real(p, inputs)

    flatten.transform = recording

    async def body(b):
        loop_thread = threading.get_ident()
        first = await b.submit(probs[:1])               # not measured yet: queued, on the executor
        second = await b.submit(probs[1:2])             # measured and idle: on the loop
        large = await b.submit(probs[:INLINE_ROWS + 1])  # more than INLINE_ROWS: queued
        both = await asyncio.gather(b.submit(probs[:40]), b.submit(probs[2:3]))  # second arrives while busy
        company = await b.submit(probs[3:4], alone=False)  # idle, but other calls are in progress: queued
        again = await b.submit(probs[4:5])               # idle and alone again: on the loop
        return loop_thread, first, second, large, both, company, again

    loop_thread, first, second, large, both, company, again = asyncio.run(_with_batcher(flatten, 1000, 0.0, body))
    assert threads[0] != loop_thread and threads[1] == loop_thread and threads[2] != loop_thread
    assert all(t != loop_thread for t in threads[3:-2])  # the busy pair, in one or two calls
    assert threads[-2] != loop_thread and threads[-1] == loop_thread
    assert np.array_equal(company, real(probs[3:4])) and np.array_equal(again, real(probs[4:5]))
    assert np.array_equal(second, real(probs[1:2])) and np.array_equal(first, real(probs[:1]))
    assert np.array_equal(both[1], real(probs[2:3]))


@pytest.mark.parametrize("gather", [0.0, 60.0])
def test_a_call_waits_for_rows_on_their_way_only_while_some_are(flatten, probs, gather):
    """With `gather`, a call waits for requests the data plane says are awaiting their upstream
    answer (`coming`), and stops waiting when none is left: two requests, one defense call. The
    wait ends on the arrival, not on a clock (gather is a minute here). Without it, the first
    request is defended at once and the second in a call of its own."""
    async def body(b):
        b.coming = 1                                  # a second request is on its way
        first = asyncio.ensure_future(b.submit(probs[:1], alone=False))
        for _ in range(5):
            await asyncio.sleep(0)                    # queued; the worker waits (or defends it)
        b.coming = 0
        second = await b.submit(probs[1:2], alone=False)
        return await first, second

    flatten.calls.clear()
    first, second = asyncio.run(_with_batcher(flatten, 256, 0.0, lambda b: asyncio.wait_for(body(b), 30),
                                              gather=gather))
    assert np.array_equal(first, flatten.transform(probs[:1])) and np.array_equal(second, flatten.transform(probs[1:2]))
    assert flatten.calls[:-2] == ([2] if gather else [1, 1])


def test_a_lone_request_never_waits_to_gather(flatten, probs):
    """Nothing on its way (`coming` 0): the call starts at once, whatever `gather` says."""
    async def body(b):
        return await asyncio.wait_for(b.submit(probs[:3], alone=False), 30)

    flatten.calls.clear()
    answer = asyncio.run(_with_batcher(flatten, 256, 0.0, body, gather=3600.0))
    assert np.array_equal(answer, flatten.transform(probs[:3]))
    assert flatten.calls[0] == 3
