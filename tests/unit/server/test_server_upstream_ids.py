"""Upstream request ids: random hex, never repeated, also not by a forked process."""

import os

from purifier_server.upstream import upstream_request_id


def test_ids_are_16_hex_digits_and_distinct():
    ids = [upstream_request_id() for _ in range(5000)]  # several 4 KiB draws
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_a_forked_process_draws_other_ids_than_its_parent():
    upstream_request_id()  # the parent holds randomness drawn in bulk
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        try:
            os.write(write, " ".join(upstream_request_id() for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = f.read().split()
    os.waitpid(pid, 0)
    parent = [upstream_request_id() for _ in range(4)]
    assert len(child) == 4 and not set(child) & set(parent)
