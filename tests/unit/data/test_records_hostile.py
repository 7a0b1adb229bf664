"""Record files come from anyone: reading one is bounded before anything is decompressed, and
every way it can fail to parse is one line naming the file (issue 21, item 8)."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest

from purifier.data.records import load_records, save_records
from purifier.errors import ConfigError


def _npy_header(shape, dtype="<f8") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip_bomb(path, megabytes: int) -> None:
    """X.npy: `megabytes` MB of zeros behind a valid header, deflated to a few hundred KB; y.npy small."""
    rows = megabytes * (1 << 20) // (8 * 8)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("X.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((rows, 8)))
            chunk = bytes(1 << 20)
            for _ in range(megabytes):
                f.write(chunk)
        zf.writestr("y.npy", _npy_header((rows,), "<i8"))


def _one_line_error(path, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_records(path, flag="--members", **kw)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--members {path}"), message
    return message


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path):
    path = tmp_path / "bomb.npz"
    _zip_bomb(path, 256)
    assert path.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        message = _one_line_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "would expand from" in message and "zip bomb" in message and "np.savez" in message
    assert peak < 16 << 20, peak  # nothing of the 256 MB was inflated


def test_genuine_compressed_and_uncompressed_records_still_load(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(500, 20)).astype(np.float32), rng.integers(0, 3, 500)
    np.savez_compressed(tmp_path / "c.npz", X=X, y=y)
    save_records(tmp_path / "u.npz", X, y)
    for name in ("c.npz", "u.npz"):
        r = load_records(tmp_path / name)
        np.testing.assert_array_equal(r.X, X)
        np.testing.assert_array_equal(r.y, y)


def _lying_header(p):
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("X.npy", _npy_header((10**9, 10)) + bytes(80))
        zf.writestr("y.npy", _npy_header((10,), "<i8") + bytes(80))


def _corrupt_member(p):
    np.savez_compressed(p, X=np.random.default_rng(1).normal(size=(200, 4)), y=np.zeros(200, np.int64))
    raw = bytearray(p.read_bytes())
    raw[200] ^= 0xFF  # inside X.npy's deflated data
    p.write_bytes(bytes(raw))


def _truncated(p):
    np.savez(p, X=np.zeros((50, 4)), y=np.zeros(50, np.int64))
    p.write_bytes(p.read_bytes()[:300])


def _huge_csv_field(p):
    p.write_text("f0,label\n" + "1" * (2 << 20) + ",0\n")


def _latin1_csv(p):
    p.write_bytes(b"f0,label\n1.5,0\n" + "2,1 \xe9\n".encode("latin-1"))


@pytest.mark.parametrize("suffix,write,message", [
    (".npz", _lying_header, r"declares shape \(1000000000, 10\) .* the file is corrupt"),
    (".npz", _corrupt_member, "not a readable .npz"),
    (".npz", _truncated, "not a readable .npz"),
    (".npz", lambda p: p.write_bytes(b"PK\x03\x04" + bytes(60)), "not a readable .npz"),
    (".csv", _huge_csv_field, r"line \d+: field larger than field limit .* one number per field"),
    (".csv", _latin1_csv, r"byte \d+ is not UTF-8 text; save the file as UTF-8"),
], ids=["lying-npy-header", "corrupt-member", "truncated-zip", "zip-magic-only", "2MB-csv-field", "non-utf8-csv"])
def test_every_parse_failure_is_one_line(tmp_path, suffix, write, message):
    path = tmp_path / f"bad{suffix}"
    write(path)
    import re

    got = _one_line_error(path)
    assert re.search(message, got), got
