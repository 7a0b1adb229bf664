import asyncio

import numpy as np
import pytest

from purifier.errors import InvalidProbabilities
from purifier_server.batcher import Batcher
from purifier_server.metrics import SidecarMetrics


async def _with_batcher(defense, max_rows, max_wait, body):
    b = Batcher(defense, max_rows, max_wait, SidecarMetrics())
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
