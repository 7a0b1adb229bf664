"""Distributed tracing: W3C trace context through the sidecar, and spans when OpenTelemetry is on.

Without tracing (the default), a caller's `traceparent` and `tracestate` (gRPC metadata or HTTP
headers) go upstream unchanged with the other application metadata (`dataplane.forwardable`), so
the upstream's spans join the caller's trace and the sidecar is invisible in it.

With `--otel` the sidecar records its own spans through the OpenTelemetry API (the `otel` extra,
`pip install 'purifier[otel]'`): a SERVER span per inference request ("ModelInfer", a child of
the caller's context read from its `traceparent`) with the model, the row count and the outcome,
and a CLIENT span around the upstream call ("upstream ModelInfer") whose context replaces the
caller's `traceparent` upstream, so the trace reads caller -> sidecar -> upstream. Spans go where
the process's TracerProvider sends them: one set up by the embedding program or by
`opentelemetry-instrument`, else an SDK provider with the OTLP exporter configured from the
standard `OTEL_*` environment variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, ...).
No span attribute holds tensor values.
"""

from __future__ import annotations

import contextlib
import logging

from purifier.errors import ConfigError

log = logging.getLogger("purifier_server")
TRACE_KEYS = ("traceparent", "tracestate")


class Tracing:
    """Spans for the data plane (construct only when tracing is on; raises ConfigError without OTel)."""

    def __init__(self):
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            raise ConfigError("otel: OpenTelemetry is not installed; pip install 'purifier[otel]' "
                              "(or drop --otel)") from None
        self._trace, self._propagate = trace, propagate
        if type(trace.get_tracer_provider()).__name__.startswith(("ProxyTracerProvider", "NoOpTracerProvider")):
            self._configure_sdk()
        self.tracer = trace.get_tracer("purifier_server")

    @staticmethod
    def _configure_sdk() -> None:
        """No provider was set up: an SDK provider exporting over OTLP as the OTEL_* environment says."""
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError("otel: no TracerProvider is configured and the OpenTelemetry SDK with the OTLP "
                              "exporter is not installed; pip install 'purifier[otel]'") from None
        provider = TracerProvider(resource=Resource.create({"service.name": "purifier"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        log.info("OpenTelemetry: spans exported over OTLP (OTEL_EXPORTER_OTLP_* environment)")

    @contextlib.contextmanager
    def request(self, metadata, model: str, request_id: str):
        """The SERVER span of one inference request, a child of the caller's trace context."""
        carrier = {k: v for k, v in metadata if k in TRACE_KEYS and isinstance(v, str)}
        context = self._propagate.extract(carrier)
        with self.tracer.start_as_current_span("ModelInfer", context=context, kind=self._trace.SpanKind.SERVER,
                                               record_exception=False, set_status_on_exception=False,
                                               attributes={"purifier.model": model,
                                                           "purifier.request_id": request_id[:128]}) as span:
            yield span

    @staticmethod
    def outcome(span, code_name: str) -> None:
        span.set_attribute("rpc.grpc.status_code_name", code_name)
        if code_name != "OK":
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, code_name))

    @contextlib.contextmanager
    def upstream(self, metadata):
        """A CLIENT span around the upstream call; yields the metadata to send, whose trace
        context is this span's."""
        with self.tracer.start_as_current_span("upstream ModelInfer", kind=self._trace.SpanKind.CLIENT,
                                               record_exception=False):
            carrier: dict[str, str] = {}
            self._propagate.inject(carrier)
            yield (*(kv for kv in metadata if kv[0] not in TRACE_KEYS), *carrier.items())
