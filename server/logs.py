"""The sidecar's log: one JSON object per line, every string bounded, repeated warnings rate-limited.

Log lines quote what callers and the upstream sent (request ids, tensor names, error text), so
an unauthenticated or hostile peer decides how much is written: a failing request with a
megabyte-long id would write a megabyte per request. `BoundedRecords` (a filter on the `purifier_server` logger, installed
by the sidecar whatever handler the host application configures) cuts every string a record
carries to `MAX_FIELD_CHARS` and lets at most `BURST` WARNING-or-worse lines of one kind (same
message template and status code) through, then one per `1 / RATE` seconds; the next line of that
kind that gets through carries how many were suppressed (`suppressed`).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

LOGGER = "purifier_server"
MAX_FIELD_CHARS = 512
MAX_TRACEBACK_CHARS = 8192
BURST = 20
RATE = 1.0  # lines per second per kind, after the burst


def bounded(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class BoundedRecords(logging.Filter):
    """Bounds every string of a record and rate-limits repeated WARNING+ lines (see module doc).

    `clock` is injected for tests (default time.monotonic).
    """

    def __init__(self, clock=time.monotonic):
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple, list[float]] = {}   # kind -> [tokens, last refill, suppressed]

    def _admit(self, record: logging.LogRecord) -> bool:
        kind = (record.msg if isinstance(record.msg, str) else type(record.msg).__name__,
                record.levelno, str(getattr(record, "code", "")))
        now = self._clock()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None:
                if len(self._kinds) > 1024:  # kinds are message templates: a handful; never unbounded
                    self._kinds.clear()
                state = self._kinds[kind] = [float(BURST), now, 0]
            state[0] = min(float(BURST), state[0] + (now - state[1]) * RATE)
            state[1] = now
            if state[0] < 1.0:
                state[2] += 1
                return False
            state[0] -= 1.0
            suppressed, state[2] = state[2], 0
        if suppressed:
            record.suppressed = suppressed
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not self._admit(record):
            return False
        if record.args:
            record.msg, record.args = record.getMessage(), None
        if isinstance(record.msg, str):
            record.msg = bounded(record.msg)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str | bytes):
                record.__dict__[key] = bounded(value if isinstance(value, str) else repr(value))
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Put one BoundedRecords filter on the sidecar's logger (idempotent)."""
    logger = logger or logging.getLogger(LOGGER)
    if not any(isinstance(f, BoundedRecords) for f in logger.filters):
        logger.addFilter(BoundedRecords())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            doc["traceback"] = bounded(self.formatException(record.exc_info), MAX_TRACEBACK_CHARS)
        return json.dumps(doc, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr at `level` for `purifier serve`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(LOGGER)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    install(logger)
