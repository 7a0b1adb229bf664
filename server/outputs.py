"""What the sidecar answers besides the defended vector: class-index outputs it rebuilds itself.

An output the operator allows (`--allow-output label`) never leaves the sidecar as the upstream
sent it: an integer output has room for hidden bits (INT32 bit-casts of the clean probabilities,
INT64 scaled by 1e9, [N, C] or [N, 32C] shapes), whatever its name. The only allowed output the
sidecar can vouch for is a class index equal to the argmax of the *defended* vector, so that is
what it serves: it learns the output's integer datatype and its shape ([N] or [N, 1]) from the
model check, verifies on the probe rows that the upstream's own values are the argmax of its
clean confidences (otherwise rebuilding it would change its meaning, e.g. class names or another
class order), and builds every answer's copy from the defended vector. Anything else is refused
at start-up by the model check (`preflight`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from purifier_server.codec import DTYPES

INTEGER_DATATYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


class NotAClassIndex(ValueError):
    """The upstream's output is not a class index the sidecar could rebuild; the text says why."""


@dataclass(frozen=True)
class ClassIndexOutput:
    """An allowed output served as the argmax of the defended vector.

    datatype: an INTEGER_DATATYPES entry; column: True for shape [N, 1], False for [N].
    """

    name: str
    datatype: str
    column: bool

    def build(self, defended: np.ndarray) -> np.ndarray:
        """defended (N, C) -> (N,) or (N, 1) class indices in this output's datatype."""
        index = defended.argmax(axis=1).astype(DTYPES[self.datatype])
        return index[:, None] if self.column else index


def declared_shape_fits(shape: tuple[int, ...]) -> bool:
    """Whether a declared shape (-1 = any) is one row index per row: [N] or [N, 1]."""
    return len(shape) == 1 or (len(shape) == 2 and shape[1] in (1, -1))


def check_datatype(datatype: str, classes: int | None) -> None:
    """NotAClassIndex unless `datatype` is an integer type that holds the indices 0..classes-1."""
    if datatype not in INTEGER_DATATYPES:
        raise NotAClassIndex(f"it is {datatype or 'not a tensor'}, not an integer class index")
    if classes and np.iinfo(DTYPES[datatype]).max < classes - 1:
        raise NotAClassIndex(f"{datatype} cannot hold the class indices 0..{classes - 1}")


def class_index_output(name: str, datatype: str, answer: np.ndarray, clean: np.ndarray) -> ClassIndexOutput:
    """Check the upstream's answer `answer` for output `name` against its clean confidences.

    Args:
        datatype: the answer's OIP datatype.
        answer: what the upstream answered for the output on the probe rows: (N,) or (N, 1).
        clean: the upstream's confidence rows for the same probe rows, (N, C).
    Raises NotAClassIndex naming what is wrong.
    """
    n, classes = clean.shape
    check_datatype(datatype, classes)
    if answer.shape not in ((n,), (n, 1)):
        raise NotAClassIndex(f"its shape is {list(answer.shape)} for {n} rows; a class index is [N] or [N, 1]")
    index = answer.reshape(n).astype(np.int64)
    if ((index < 0) | (index >= classes)).any():
        raise NotAClassIndex(f"its values are not all class indices 0..{classes - 1}")
    # the index of a largest confidence (ties: any of them) on every probe row
    if not (clean[np.arange(n), index] >= clean.max(axis=1)).all():
        raise NotAClassIndex(f"it is not the index of the largest confidence on the {n} probe rows "
                             "(class names, or another class order)")
    return ClassIndexOutput(name, datatype, answer.ndim == 2)
