import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from purifier_server.metrics import L1_BUCKETS, SidecarMetrics


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
