"""What the gRPC and REST fronts share through the data plane, against a fake gRPC upstream:
forwarded metadata and W3C trace context, OpenTelemetry spans with --otel, and admission.

Without --otel the caller's `traceparent`/`tracestate` reach the upstream unchanged. With it, the
sidecar's SERVER span is a child of the caller's span, its CLIENT span a child of that, and the
upstream receives the CLIENT span's context: one trace, caller -> sidecar -> upstream. Spans are
read from the OpenTelemetry SDK's in-memory exporter, set up once for the test session.
"""

from __future__ import annotations

import http.client

import numpy as np
import pytest
from fronts import call_grpc, http_request, rest_body
from oip_fake import infer_request

from purifier_server.app import BackgroundSidecar
from purifier_server.settings import Settings

pytestmark = pytest.mark.integration
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
X = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)


def settings(upstream, **extra) -> Settings:
    return Settings.resolve({"upstream": f"127.0.0.1:{upstream.port}", "model_name": "m",
                             "confidence_output": "probs", "host": "127.0.0.1", "port": 0, "http_port": 0,
                             "metrics_port": -1, "health_poll_s": 0.2, **extra}, env={})


def send_both(sc, request):
    """The request once over gRPC and once over REST, each with the caller's trace context."""
    from fronts import grpc, pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{sc.port}") as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=20, metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=1")))
    body, headers = rest_body(request, binary=True)
    status, _, answer = http_request(sc.http_port, "POST", "/v2/models/m/infer", body,
                                     {**headers, "traceparent": TRACEPARENT, "tracestate": "vendor=1"})
    assert status == 200, answer


def test_trace_context_goes_upstream_unchanged_without_otel(upstream, flatten_cls):
    with BackgroundSidecar(settings(upstream), defense=flatten_cls()) as sc:
        before = len(upstream.seen_metadata)
        send_both(sc, infer_request(X))
        seen = upstream.seen_metadata[before:]
    assert [m.get("traceparent") for m in seen] == [TRACEPARENT, TRACEPARENT]
    assert [m.get("tracestate") for m in seen] == ["vendor=1", "vendor=1"]
    assert all("authorization" not in m and "inference-header-content-length" not in m for m in seen)


@pytest.fixture(scope="module")
def spans():
    sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, sdk.TracerProvider):
        provider = sdk.TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def test_otel_spans_join_the_callers_trace_and_the_upstream_joins_the_sidecars(upstream, flatten_cls, spans):
    with BackgroundSidecar(settings(upstream, otel=True), defense=flatten_cls()) as sc:
        spans.clear()
        before = len(upstream.seen_metadata)
        send_both(sc, infer_request(X, request_id="traced"))
        bad = infer_request(X)
        bad.outputs.add(name="logits")
        assert call_grpc(sc.port, bad).code is not None
        seen = upstream.seen_metadata[before:]
        finished = spans.get_finished_spans()
    servers = [s for s in finished if s.name == "ModelInfer"]
    clients = [s for s in finished if s.name == "upstream ModelInfer"]
    assert len(servers) == 3 and len(clients) == 2
    for server, client, upstream_md in zip(servers, clients, seen, strict=False):
        assert format(server.context.trace_id, "032x") == TRACE_ID
        assert format(server.parent.span_id, "016x") == CALLER_SPAN             # child of the caller's span
        assert client.parent.span_id == server.context.span_id                  # the upstream call inside it
        version, trace_id, parent, _ = upstream_md["traceparent"].split("-")
        assert (trace_id, parent) == (TRACE_ID, format(client.context.span_id, "016x"))
        assert server.attributes["purifier.model"] == "m"
        assert server.attributes["rpc.grpc.status_code_name"] == "OK"
    failed = servers[2]
    assert failed.attributes["rpc.grpc.status_code_name"] == "INVALID_ARGUMENT"
    assert not failed.status.is_ok


def test_headers_grpc_cannot_carry_stay_behind_and_do_not_fail_the_request(upstream, flatten_cls):
    """HTTP allows header names and values that gRPC metadata refuses; such a header must not turn
    the client's request into an error (it did: INTERNAL, HTTP 500)."""
    odd = {"x!odd": "1", "x-tab": "a\tb", "x-latin": "caf\u00e9", "x-thing-bin": "AAAA", "x-fine": "yes"}
    with BackgroundSidecar(settings(upstream), defense=flatten_cls()) as sc:
        body, headers = rest_body(infer_request(X), binary=True)
        conn = http.client.HTTPConnection("127.0.0.1", sc.http_port, timeout=20)
        try:
            conn.putrequest("POST", "/v2/models/m/infer")
            for k, v in {**headers, "Content-Length": str(len(body)), **odd}.items():
                conn.putheader(k, v.encode("latin-1"))
            conn.endheaders(body)
            response = conn.getresponse()
            assert response.status == 200, response.read()
        finally:
            conn.close()
        seen = upstream.seen_metadata[-1]
    assert seen["x-fine"] == "yes"
    assert not {"x!odd", "x-tab", "x-latin", "x-thing-bin"} & set(seen)


def test_admission_counts_grpc_calls_streams_and_rest_requests_together(upstream, flatten_cls):
    """max_concurrent_rpcs is the data plane's: a REST request finds the slot a gRPC call holds,
    and a gRPC call the slot a stream holds (429 / RESOURCE_EXHAUSTED, counted)."""
    import threading

    from fronts import call_stream

    upstream.delay = 1.5
    try:
        with BackgroundSidecar(settings(upstream, max_concurrent_rpcs=1), defense=flatten_cls()) as sc:
            for holder in ("grpc", "stream"):
                busy = threading.Thread(target=call_grpc if holder == "grpc" else call_stream,
                                        args=(sc.port, infer_request(X) if holder == "grpc" else [infer_request(X)]))
                busy.start()
                try:
                    deadline = 50
                    while sc.plane.active == 0 and deadline:
                        threading.Event().wait(0.02)
                        deadline -= 1
                    assert sc.plane.active == 1
                    body, headers = rest_body(infer_request(X), binary=False)
                    status, _, answer = http_request(sc.http_port, "POST", "/v2/models/m/infer", body, headers)
                    assert status == 429 and b"max_concurrent_rpcs" in answer
                    assert call_grpc(sc.port, infer_request(X)).code.name == "RESOURCE_EXHAUSTED"
                finally:
                    busy.join()
    finally:
        upstream.delay = 0.0
