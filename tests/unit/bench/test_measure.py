"""purifier.bench.measure without a server: requests as built, answers as checked, percentiles."""

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from purifier.bench.measure import (
    Cell,
    Endpoint,
    InputSpec,
    build_requests,
    check_response,
    latency_summary,
    percentile,
    window_ratios,
)
from purifier.errors import ConfigError

ENDPOINT = Endpoint("sidecar", "127.0.0.1:9001", "digits", "1")


def test_latency_summary_uses_nearest_rank_percentiles():
    times = np.arange(1, 201) / 1e3  # 1..200 ms
    s = latency_summary(np.random.default_rng(0).permutation(times))
    assert s["calls"] == 200
    # ranks ceil(0.50 * 200) = 100 and ceil(0.99 * 200) = 198 of the sorted calls
    assert s["p50_ms"] == pytest.approx(100.0) and s["p99_ms"] == pytest.approx(198.0)
    assert s["mean_ms"] == pytest.approx(100.5)
    assert latency_summary([])["p50_ms"] is None


@pytest.mark.parametrize("values, q, expected", [
    ([4.0, 1.0, 3.0, 2.0], 50, 2.0),     # rank ceil(2.0) = 2: the lower middle, not the mean 2.5
    ([1.0, 2.0, 3.0], 50, 2.0),          # rank ceil(1.5) = 2
    ([5.0], 99, 5.0),
    (list(range(1, 101)), 99, 99.0),     # rank 99 of 100
    (list(range(1, 101)), 99.5, 100.0),  # rank ceil(99.5) = 100
    (list(range(1, 11)), 7, 1.0),        # rank ceil(0.7) = 1
    (list(range(1, 11)), 100, 10.0),
])
def test_percentile_is_the_nearest_rank(values, q, expected):
    assert percentile(values, q) == expected
    assert percentile(values, q) == np.percentile(values, q, method="inverted_cdf")


def test_percentile_agrees_with_numpy_on_random_latencies():
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100, 999):
        x = rng.lognormal(size=n)
        for q in (1, 7, 50, 90, 99, 99.9, 100):
            if q * n % 100 == 0 and q != 100:
                continue  # an exact rank: numpy's float rank may overshoot it (below)
            assert percentile(x, q) == np.percentile(x, q, method="inverted_cdf"), (n, q)
    # the rank in exact arithmetic: 7% of 100 is rank 7 (numpy: 0.07 * 100 = 7.000000000000001 -> 8)
    assert percentile(np.arange(1.0, 101.0), 7) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 0)


@pytest.mark.parametrize("typed", [False, True])
@pytest.mark.parametrize("datatype, dtype", [("FP32", np.float32), ("FP64", np.float64)])
def test_requests_carry_the_rows_in_turn(typed, datatype, dtype):
    X = np.random.default_rng(1).random((10, 4), dtype=np.float32)
    spec = InputSpec("x", datatype, 4, ("probabilities",))
    payloads = build_requests(ENDPOINT, spec, "probabilities", X, rows=3, typed=typed)
    assert len(payloads) == 3  # 10 rows make three whole 3-row requests
    for i, data in enumerate(payloads):
        request = pb.ModelInferRequest.FromString(data)
        assert (request.model_name, request.model_version) == ("digits", "1")
        assert [o.name for o in request.outputs] == ["probabilities"]
        tensor = request.inputs[0]
        assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("x", datatype, [3, 4])
        if typed:
            assert not request.raw_input_contents
            field = "fp32_contents" if datatype == "FP32" else "fp64_contents"
            got = np.asarray(getattr(tensor.contents, field), dtype)
        else:
            got = np.frombuffer(request.raw_input_contents[0], dtype)
        np.testing.assert_array_equal(got.reshape(3, 4), X[3 * i:3 * i + 3].astype(dtype))


def test_fewer_rows_than_a_request_wrap_around():
    X = np.arange(8, dtype=np.float32).reshape(2, 4)
    (data,) = build_requests(ENDPOINT, InputSpec("x", "FP32", 4, ()), "p", X, rows=5)
    got = np.frombuffer(pb.ModelInferRequest.FromString(data).raw_input_contents[0], np.float32).reshape(5, 4)
    np.testing.assert_array_equal(got, X[[0, 1, 0, 1, 0]])


def test_unsupported_inputs_are_refused():
    X = np.zeros((4, 2), np.float32)
    with pytest.raises(ConfigError, match="INT64"):
        build_requests(ENDPOINT, InputSpec("x", "INT64", 2, ()), "p", X, rows=1)
    with pytest.raises(ConfigError, match="raw only"):
        build_requests(ENDPOINT, InputSpec("x", "FP16", 2, ()), "p", X, rows=1, typed=True)


def test_answers_must_hold_the_output_with_one_row_per_request_row():
    response = pb.ModelInferResponse()
    response.outputs.add(name="probabilities", datatype="FP32", shape=[3, 10])
    data = response.SerializeToString()
    check_response(ENDPOINT, data, "probabilities", 3)
    with pytest.raises(ConfigError, match="lacks output 'logits'"):
        check_response(ENDPOINT, data, "logits", 3)
    with pytest.raises(ConfigError, match=r"shape \[3, 10\] for 2 row"):
        check_response(ENDPOINT, data, "probabilities", 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"address": "nohost"}, "not HOST:PORT"),
    ({"tls_cert": "c.pem"}, "needs both"),
    ({"token_file": "/no/such/token"}, "does not exist"),
])
def test_endpoint_settings_are_checked_up_front(kwargs, message):
    fields = {"label": "sidecar", "address": "127.0.0.1:1", "model_name": "m", **kwargs}
    with pytest.raises(ConfigError, match=message):
        Endpoint(**fields)


def test_a_cell_pools_its_windows_and_keeps_each_one():
    cell = Cell()
    cell.add([0.001] * 10, 1.0, 12, 0.006)
    cell.add([0.002] * 30, 2.0, 32, 0.008)
    s = cell.summary(rows=1)
    assert s["throughput_rps"] == 40 / 3 and s["server_cpu_ms_per_request"] == 1e3 * 0.014 / 44
    assert s["windows"] == [{"throughput_rps": 10.0, "server_cpu_ms_per_request": 0.5},
                            {"throughput_rps": 15.0, "server_cpu_ms_per_request": 0.25}]
    unknown = Cell()
    unknown.add([0.001], 1.0, 1, None)
    assert unknown.summary(rows=1)["server_cpu_ms_per_request"] is None
    assert unknown.summary(rows=1)["windows"] == [{"throughput_rps": 1.0, "server_cpu_ms_per_request": None}]


def test_window_ratios_pair_the_windows_of_one_round():
    a = {"windows": [{"x": 2.0}, {"x": None}, {"x": 3.0}]}
    b = {"windows": [{"x": 1.0}, {"x": 1.0}, {"x": 0.0}]}
    assert window_ratios(a, b, "x") == [2.0, None, None]
    with pytest.raises(ValueError):  # cells of different runs
        window_ratios(a, {"windows": b["windows"][:2]}, "x")
