"""Record files: the user's labelled records, loaded and validated the same way by every command.

One format for "a set of labelled records" (fit-defense, audit, and later tune and bench):

* `.npz` with `X` (N, D) numbers and `y` (N,) integer class indices;
* `.csv` with a header row, a label column (default `label`) holding integer class indices, and
  every other column a feature, in file order.

Both are read with numpy and the standard library's csv module (no pandas). Features become
float32 rows, the datatype every model here is queried with. Validation names the file, the
row and the fix: shapes, finite values, integer labels, and (`check_model`) a feature count equal
to the model's input and labels inside the model's classes. A record file may come from anyone,
so reading it is bounded: an `.npz`'s members are size-checked from the zip directory and the
arrays' own headers before anything is decompressed (a 1.5 MB zip can expand to gigabytes), and
every way a file can fail to parse (not a zip, a corrupt member, a huge CSV field, bytes that are
not UTF-8) is one line naming the file and the fix. Files that must not share a record
(members and non-members; the attacker pool and the evaluation records) are compared by the exact
bytes of their float32 rows (`shared_rows`); a built-in dataset split is just another `Records`.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from purifier.errors import ConfigError
from purifier.untrusted import printable

DEFAULT_LABEL_COLUMN = "label"
FORMATS = (".npz", ".csv")
# An .npz member may expand past its stored size by at most this factor once it is larger than
# FREE_BYTES: np.savez stores members uncompressed (factor 1), and real features compressed with
# np.savez_compressed shrink far less than this, while a zip bomb expands by a thousand or more.
MAX_EXPANSION, FREE_BYTES = 100, 64 << 20


@dataclass(frozen=True)
class Records:
    """X: (N, D) float32; y: (N,) int64 class indices; `source` names them in messages."""

    X: np.ndarray
    y: np.ndarray
    source: str

    def __post_init__(self):
        if self.X.ndim != 2 or self.y.ndim != 1 or len(self.X) != len(self.y):
            raise ConfigError(f"{self.source}: X {self.X.shape} and y {self.y.shape} must be (N, D) and (N,)")

    def __len__(self) -> int:
        return int(len(self.y))

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    def row_keys(self) -> np.ndarray:
        """(N,) opaque keys, equal iff two rows have the same float32 features (-0.0 == 0.0)."""
        rows = np.ascontiguousarray(self.X + np.float32(0.0), np.float32)  # -0.0 + 0.0 is +0.0
        return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1])))[:, 0]

    def sha256(self) -> str:
        """Content hash of X and y (what a cache would key these records by)."""
        h = hashlib.sha256(str(self.X.shape).encode())
        h.update(np.ascontiguousarray(self.X, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.y, np.int64).tobytes())
        return h.hexdigest()

    def check_model(self, n_features: int | None, n_classes: int | None) -> None:
        """Feature count equal to the model's input, labels inside its classes 0..C-1."""
        if n_features is not None and self.n_features != n_features:
            raise ConfigError(f"{self.source}: records have {self.n_features} features, the model takes "
                              f"{n_features}; give the model's input columns only, in its order")
        if n_classes is not None:
            bad = (self.y < 0) | (self.y >= n_classes)
            if bad.any():
                i = int(np.argmax(bad))
                raise ConfigError(f"{self.source}: label {int(self.y[i])} (record {i}) is outside the model's "
                                  f"classes 0..{n_classes - 1}; labels must be class indices in the "
                                  "model's output order")


def shared_rows(a: Records, b: Records) -> tuple[np.ndarray, np.ndarray]:
    """Indices (ia, ib) of the records a[ia[j]] and b[ib[j]] with identical features."""
    if a.n_features != b.n_features:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, ia, ib = np.intersect1d(a.row_keys(), b.row_keys(), assume_unique=False, return_indices=True)
    return ia.astype(np.int64), ib.astype(np.int64)


def check_disjoint(a: Records, b: Records) -> None:
    """ConfigError naming both sources and one shared record if any record is in both."""
    ia, ib = shared_rows(a, b)
    if len(ia):
        raise ConfigError(f"{a.source} and {b.source} share {len(ia)} record(s) (e.g. record {ia[0]} of the first "
                          f"is record {ib[0]} of the second); they must be disjoint: remove them from one file")


def load_records(path: str | Path, label_column: str = DEFAULT_LABEL_COLUMN, flag: str = "") -> Records:
    """Read and validate a record file (.npz with X, y; .csv with a label column).

    `flag` (e.g. "--members") is put in front of the path in messages.
    """
    path = Path(path)
    source = f"{flag} {path}".strip()
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"{source}: unknown record file type {path.suffix!r}; use .npz (arrays X, y) "
                          f"or .csv (a header row and a {label_column!r} column)")
    if not path.is_file():
        raise ConfigError(f"{source}: file does not exist")
    try:
        X, y = _read_npz(path, source) if path.suffix.lower() == ".npz" else _read_csv(path, source, label_column)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read the file ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: byte {e.start} is not UTF-8 text; save the file as UTF-8 CSV "
                          "(or as .npz)") from None
    return Records(_features(X, source), _labels(y, source), source)


def save_records(path: str | Path, X: np.ndarray, y: np.ndarray, label_column: str = DEFAULT_LABEL_COLUMN) -> Path:
    """Write records as .npz (X float32, y int64) or .csv (header f0..f{D-1} and the label column)."""
    path = Path(path)
    X, y = np.asarray(X, np.float32), np.asarray(y, np.int64)
    if path.suffix.lower() == ".npz":
        np.savez(path, X=X, y=y)
    elif path.suffix.lower() == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([*(f"f{i}" for i in range(X.shape[1])), label_column])
            w.writerows([*map(repr, row), int(label)] for row, label in zip(X.tolist(), y.tolist(), strict=True))
    else:
        raise ConfigError(f"{path}: record files are .npz or .csv")
    return path


def _read_npz(path: Path, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        _check_npz_sizes(path, source)
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("X", "y") if k not in z.files]
            if missing:
                raise ConfigError(f"{source}: no array named {' or '.join(missing)} (found: "
                                  f"{', '.join(z.files) or 'none'}); save with np.savez(path, X=features, y=labels)")
            return z["X"], z["y"]
    except ConfigError:
        raise
    except Exception as e:  # the file is anyone's: numpy's zip and .npy parsers raise many
        # types on hostile bytes (ValueError, EOFError, zipfile.BadZipFile, zlib.error, tokenize.TokenError,
        # SyntaxError, ...): every one is a file that cannot be read, said in one line
        raise ConfigError(f"{source}: not a readable .npz of numeric arrays ({type(e).__name__}: {printable(e, 200)}); "
                          "save with np.savez(path, X=features, y=labels)") from None


def _check_npz_sizes(path: Path, source: str) -> None:
    """Refuse, before decompressing anything, an .npz whose members expand past MAX_EXPANSION times
    their stored size (beyond FREE_BYTES), or whose array header declares more data than the member holds."""
    if not zipfile.is_zipfile(path):
        return  # np.load names what it is instead
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.file_size > max(FREE_BYTES, MAX_EXPANSION * info.compress_size):
                raise ConfigError(f"{source}: member {printable(info.filename, 80)} would expand from "
                                  f"{info.compress_size:,} to {info.file_size:,} bytes; refused as a likely zip bomb. "
                                  "Genuine records: save them uncompressed with np.savez(path, X=features, y=labels)")
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as member:  # only the header is decompressed
                version = np.lib.format.read_magic(member)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(member)
            if dtype.hasobject:
                continue  # np.load refuses it without reading the data
            declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
            if declared > info.file_size:
                raise ConfigError(f"{source}: member {printable(info.filename, 80)} declares shape {shape} "
                                  f"({declared:,} bytes) but holds {info.file_size:,}; the file is corrupt")


def _read_csv(path: Path, source: str, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            rows = list(reader)
        except csv.Error as e:  # a field beyond the csv module's limit (128 KiB), a NUL byte, ...
            raise ConfigError(f"{source}: line {reader.line_num}: {printable(e, 200)}; record files hold one "
                              "number per field") from None
    if not rows:
        raise ConfigError(f"{source}: empty file; expected a header row naming the columns")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise ConfigError(f"{source}: no column {label_column!r} in the header ({', '.join(header[:8])}"
                          f"{', ...' if len(header) > 8 else ''}); name the label column with --label-column")
    body = [r for r in rows[1:] if r]
    ragged = [i for i, r in enumerate(body) if len(r) != len(header)]
    if ragged:
        raise ConfigError(f"{source}: line {ragged[0] + 2} has {len(body[ragged[0]])} fields, the header has "
                          f"{len(header)}")
    cells = np.array(body, dtype=str).reshape(len(body), len(header))
    try:
        values = cells.astype(np.float64)
    except ValueError:
        for i, row in enumerate(body):  # error path only: find the cell to name
            for j, cell in enumerate(row):
                try:
                    float(cell)
                except ValueError:
                    raise ConfigError(f"{source}: line {i + 2}, column {header[j]!r}: {cell!r} is not a number") from None
        raise
    j = header.index(label_column)
    return np.delete(values, j, axis=1), values[:, j]


def _features(X: np.ndarray, source: str) -> np.ndarray:
    if X.dtype.kind not in "biuf":
        raise ConfigError(f"{source}: X has dtype {X.dtype}; features must be numbers")
    if X.ndim != 2:
        raise ConfigError(f"{source}: X has shape {X.shape}; it must be 2-D (records, features)")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ConfigError(f"{source}: X has shape {X.shape}; it needs at least one record and one feature")
    with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported below
        X32 = X.astype(np.float32)
    bad = ~np.isfinite(X32).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ConfigError(f"{source}: record {i} has a NaN or infinite feature (or one beyond float32 range); "
                          "impute or drop it")
    return X32


def _labels(y: np.ndarray, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"{source}: y has shape {y.shape}; it must be 1-D class indices (not one-hot)")
    if y.dtype.kind not in "biuf":
        raise ConfigError(f"{source}: y has dtype {y.dtype}; labels must be integer class indices 0..C-1")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.argmax(bad))
            raise ConfigError(f"{source}: label {float(y[i])!r} (record {i}) is not an integer class index")
    y64 = y.astype(np.int64)
    if (y64 < 0).any():
        raise ConfigError(f"{source}: label {int(y64.min())} is negative; labels are class indices 0..C-1")
    return y64
