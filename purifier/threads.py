"""Thread pools, sized in one place: one thread each (docs/design.md#threads).

Everything Purifier computes is small (MLPs of a few hundred units, batches of tens to thousands
of rows) and shares its cores: with the sidecar's gRPC threads, with the other workers of an
audit, with the model server beside it. Extra threads in a pool then wait for cores more than
they compute, so each pool gets one thread, each for its own reason:

* BLAS and OpenMP under numpy, scipy and scikit-learn (OpenBLAS, MKL, libgomp): idle OpenBLAS
  workers busy-wait between calls, taking cores from the threads with work to do, and the
  calls here are too small to split.
* torch's intra-op pool (training, MemGuard's faithful solver): a step is hundreds of small ops,
  and on a busy core every op waits for each of its threads to get a time slice.
* onnxruntime (`purifier.models.onnx_runner`): one intra-op and one inter-op thread per session;
  the graphs are small and a call's rows are already one batch.

Parallel work comes from processes instead (`purifier.executor`: one single-threaded worker per
core) and, in the sidecar, from batching rows into one defense call.

`limit_threads()` sizes a process's pools where it starts (`purifier serve`, executor workers,
Ray tasks); `single_threaded()` sizes them for a block and gives the caller's sizes back after it
(training and the executor's in-process path run inside programs that are not ours).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

THREADS = 1
# Pools a process loads after it started (torch's OpenMP, a second OpenBLAS) read these when they
# initialise; pools already loaded are resized through threadpoolctl.
POOL_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_threads() -> None:
    """Size every pool of this process, loaded now or later, to `THREADS` for the rest of its life."""
    from threadpoolctl import threadpool_limits

    for var in POOL_ENV:
        os.environ[var] = str(THREADS)
    threadpool_limits(THREADS)
    limit_torch_threads()


def limit_torch_threads() -> None:
    """torch's intra-op pool to `THREADS`, if torch is loaded; the sidecar's defense thread calls
    it, as a defense in torch may be loaded into a process whose pools someone else sized."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(THREADS)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with every BLAS/OpenMP pool and torch at `THREADS`, then restore them."""
    from threadpoolctl import threadpool_limits

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(THREADS):
        if torch is not None:
            torch.set_num_threads(THREADS)
        try:
            yield
        finally:
            if torch is not None:
                torch.set_num_threads(before)
