import json
import logging

from purifier_server.logs import BURST, MAX_FIELD_CHARS, BoundedRecords, JsonFormatter


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def lines(n, clock, bounded, level=logging.WARNING, code="NOT_FOUND", **extra):
    logger = logging.getLogger("test-bounded")
    out = []
    for _ in range(n):
        record = logger.makeRecord(logger.name, level, __file__, 1, "request failed: %s", ("x" * 5000,), None,
                                   extra={"code": code, **extra})
        if bounded.filter(record):
            out.append(record)
    return out


def test_every_string_of_a_record_is_cut_and_says_how_much():
    clock = Clock()
    (record,) = lines(1, clock, BoundedRecords(clock), request_id="i" * (1 << 20))
    text = JsonFormatter().format(record)
    assert len(text) < 4 * MAX_FIELD_CHARS
    doc = json.loads(text)
    assert doc["msg"].endswith(f"... [{len('request failed: ') + 5000 - MAX_FIELD_CHARS} more characters]")
    assert doc["request_id"].endswith(f"... [{(1 << 20) - MAX_FIELD_CHARS} more characters]")


def test_repeated_warnings_of_one_kind_are_rate_limited_and_counted():
    clock = Clock()
    bounded = BoundedRecords(clock)
    assert len(lines(100, clock, bounded)) == BURST
    assert len(lines(5, clock, bounded, code="INVALID_ARGUMENT")) == 5      # another kind has its own budget
    assert len(lines(5, clock, bounded, level=logging.INFO)) == 5           # info lines are not limited
    clock.now += 3.0
    kept = lines(100, clock, bounded)
    assert len(kept) == 3 and kept[0].suppressed == 80 and not hasattr(kept[1], "suppressed")
    clock.now += 3600.0
    assert len(lines(100, clock, bounded)) == BURST                        # the burst refills, no more
