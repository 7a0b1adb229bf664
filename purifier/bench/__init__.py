"""Latency benchmarking of Open Inference Protocol deployments (`purifier bench`)."""

from purifier.bench.measure import Endpoint, compare, latency_summary, random_rows

__all__ = ["Endpoint", "compare", "latency_summary", "random_rows"]
