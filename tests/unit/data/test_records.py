"""Record files: one loader and validator for .npz and .csv, and exact disjointness checks."""

import numpy as np
import pytest

from purifier.data.records import Records, check_disjoint, load_records, save_records, shared_rows
from purifier.errors import ConfigError


def _data(n=40, d=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n)


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_round_trip_keeps_rows_and_labels_exactly(tmp_path, suffix):
    X, y = _data()
    r = load_records(save_records(tmp_path / f"r{suffix}", X, y), flag="--members")
    assert r.X.dtype == np.float32 and r.y.dtype == np.int64 and len(r) == 40 and r.n_features == 5
    np.testing.assert_array_equal(r.X, X)  # float32 -> repr -> float32 is exact
    np.testing.assert_array_equal(r.y, y)
    assert r.source == f"--members {tmp_path / f'r{suffix}'}"
    assert r.sha256() == Records(X, y.astype(np.int64), "x").sha256()


def test_csv_label_column_anywhere_and_features_in_file_order(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,cls,b\n1.5,2,-3\n0,0,4e2\n\n")
    r = load_records(path, label_column="cls")
    np.testing.assert_array_equal(r.X, [[1.5, -3], [0, 400]])
    np.testing.assert_array_equal(r.y, [2, 0])


@pytest.mark.parametrize("write,message", [
    (lambda p: np.savez(p.with_suffix(".npz"), features=np.zeros((2, 2)), y=[0, 1]), r"no array named X \(found: "),
    (lambda p: np.savez(p.with_suffix(".npz"), X=np.zeros(3), y=[0, 1, 1]), r"X has shape \(3,\); it must be 2-D"),
    (lambda p: np.savez(p.with_suffix(".npz"), X=np.zeros((3, 2)), y=[0, 1]), r"X \(3, 2\) and y \(2,\)"),
    (lambda p: np.savez(p.with_suffix(".npz"), X=[[0, np.nan]], y=[0]), "record 0 has a NaN or infinite"),
    (lambda p: np.savez(p.with_suffix(".npz"), X=[[0.0], [1e39]], y=[0, 1]), "record 1 .* beyond float32"),
    (lambda p: np.savez(p.with_suffix(".npz"), X=np.zeros((2, 2)), y=[0.0, 1.5]), "label 1.5 .* not an integer"),
    (lambda p: np.savez(p.with_suffix(".npz"), X=np.zeros((2, 2)), y=np.eye(2)), "not one-hot"),
    (lambda p: np.savez(p.with_suffix(".npz"), X=np.zeros((2, 2)), y=[0, -1]), "label -1 is negative"),
    (lambda p: p.with_suffix(".npz").write_bytes(b"not a zip"), "not a readable .npz"),
    (lambda p: p.with_suffix(".csv").write_text("x,y\n1,2\n"), "no column 'label' in the header .*--label-column"),
    (lambda p: p.with_suffix(".csv").write_text("x,label\n1,2\n3\n"), "line 3 has 1 fields, the header has 2"),
    (lambda p: p.with_suffix(".csv").write_text("x,label\n1,2\nabc,1\n"), "line 3, column 'x': 'abc' is not a number"),
    (lambda p: p.with_suffix(".csv").write_text(""), "empty file"),
    (lambda p: p.with_suffix(".txt").write_text("1"), "unknown record file type '.txt'"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, write, message):
    write(tmp_path / "bad")
    path = next(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=message) as info:
        load_records(path, flag="--members")
    assert str(info.value).startswith(f"--members {path}")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.npz: file does not exist"):
        load_records(tmp_path / "nope.npz")


def test_check_model_names_features_and_classes():
    X, y = _data(c=3)
    r = Records(X, y, "--members m.npz")
    r.check_model(5, 3)
    with pytest.raises(ConfigError, match="have 5 features, the model takes 64"):
        r.check_model(64, 3)
    with pytest.raises(ConfigError, match=r"label 2 \(record \d+\) is outside the model's classes 0..1"):
        r.check_model(5, 2)


def test_shared_rows_are_found_exactly_and_only_them():
    X, y = _data(n=200)
    a = Records(X[:120], y[:120], "a")
    b_X = np.concatenate([X[100:150], X[:3] + np.float32(1e-6)])  # 20 shared; 3 near-copies are not
    b = Records(b_X, np.zeros(len(b_X), np.int64), "b")
    ia, ib = shared_rows(a, b)
    assert sorted(ia.tolist()) == list(range(100, 120))
    np.testing.assert_array_equal(a.X[ia], b.X[ib])
    with pytest.raises(ConfigError, match=r"^a and b share 20 record\(s\)"):
        check_disjoint(a, b)
    check_disjoint(Records(X[:100], y[:100], "a"), Records(X[100:], y[100:], "b"))


def test_negative_zero_is_the_same_record():
    a = Records(np.array([[0.0, 1.0]], np.float32), np.zeros(1, np.int64), "a")
    b = Records(np.array([[-0.0, 1.0]], np.float32), np.zeros(1, np.int64), "b")
    assert len(shared_rows(a, b)[0]) == 1
