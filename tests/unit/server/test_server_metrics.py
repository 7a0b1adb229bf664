import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from purifier_server.metrics import L1_BUCKETS, BatchHistogram, SidecarMetrics


def families(metrics):
    return {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}


def test_batch_histogram_matches_numpy_and_counters(flatten, probs):
    m = SidecarMetrics()
    defended = flatten.transform(probs)
    m.record_defense(probs, defended)
    m.record_defense(probs[:5], probs[:5])  # identity rows: no noise released
    fam = families(m)["purifier_l1_distortion"]
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    l1 = np.concatenate([np.abs(defended.astype(np.float64) - probs).sum(1), np.zeros(5)])
    for bound in L1_BUCKETS:
        assert buckets[repr(float(bound))] == np.count_nonzero(l1 <= bound)
    assert buckets["+Inf"] == len(l1)
    total = next(s.value for s in fam.samples if s.name.endswith("_sum"))
    np.testing.assert_allclose(total, l1.sum())
    noisy = families(m)["purifier_noise_released_rows"].samples[0].value
    assert noisy == np.count_nonzero(l1 > 0) and noisy >= len(probs) - 5
    assert families(m)["purifier_label_changed_rows"].samples[0].value == 0


def test_each_sidecar_has_its_own_registry():
    a, b = SidecarMetrics(), SidecarMetrics()
    a.requests.labels("m", "OK").inc()
    assert families(b)["purifier_requests"].samples == []


def test_one_row_calls_are_all_in_the_next_scrape(flatten, probs):
    """The hot path only queues one-row outcomes and timings; a scrape bins everything observed
    before it, in the same counts a single batch-wise record gives."""
    one_by_one, at_once = SidecarMetrics(), SidecarMetrics()
    defended = flatten.transform(probs)
    swapped = defended[:, ::-1].copy()  # another label for most rows
    for i in range(len(probs)):
        one_by_one.record_defense(probs[i:i + 1], defended[i:i + 1])
        one_by_one.record_defense(probs[i:i + 1], swapped[i:i + 1])
        one_by_one.total_stage.observe(1e-3 * (i % 7))
    at_once.record_defense(probs, defended)
    at_once.record_defense(probs, swapped)
    for i in range(len(probs)):
        at_once.total_stage.observe(1e-3 * (i % 7))
    a, b = families(one_by_one), families(at_once)
    for name in ("purifier_noise_released_rows", "purifier_label_changed_rows"):
        assert a[name].samples[0].value == b[name].samples[0].value > 0
    for name in ("purifier_l1_distortion", "purifier_stage_seconds"):
        assert [(s.name, s.labels, s.value) for s in a[name].samples if not s.name.endswith("_sum")] == \
               [(s.name, s.labels, s.value) for s in b[name].samples if not s.name.endswith("_sum")]
    stage = {s.labels["le"]: s.value for s in a["purifier_stage_seconds"].samples
             if s.name.endswith("_bucket") and s.labels["stage"] == "total"}
    assert stage["+Inf"] == len(probs) and stage["0.001"] == sum(1 for i in range(len(probs)) if i % 7 <= 1)


def test_pending_observations_stay_bounded():
    m = SidecarMetrics()
    for _ in range(3 * BatchHistogram.FLUSH_AT):
        m.upstream_stage.observe(2e-4)
    assert len(m.upstream_stage._pending) < BatchHistogram.FLUSH_AT
    counts = {s.labels["le"]: s.value for s in families(m)["purifier_stage_seconds"].samples
              if s.name.endswith("_bucket") and s.labels["stage"] == "upstream"}
    assert counts["0.0001"] == 0 and counts["0.00025"] == 3 * BatchHistogram.FLUSH_AT
