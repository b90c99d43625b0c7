"""linearsr.core.storage against the local S3 server: conditional writes decided by the server
(the sidecar lease on an s3:// run dir), and every botocore retry counted."""

import pytest

from linearsr.ckpt_analysis.lease import Lease, LeaseHeld, LeaseLost
from linearsr.core import storage
from tests.support.faultproxy import FaultProxy

pytestmark = pytest.mark.integration


def test_conditional_writes_on_s3_let_exactly_one_writer_win(s3_bucket):
    url = f"{s3_bucket}/run/analysis/lease.json"
    tag = storage.create_exclusive(url, b"A")
    assert tag and storage.create_exclusive(url, b"B") is None  # If-None-Match: * refused by the server
    assert storage.read_with_tag(url) == (b"A", tag)
    new = storage.replace_if_unchanged(url, b"A2", tag)
    assert new and new != tag
    assert storage.replace_if_unchanged(url, b"B2", tag) is None  # If-Match on a stale ETag: 412
    assert storage.read_with_tag(url) == (b"A2", new)
    assert storage.read_with_tag(f"{s3_bucket}/run/analysis/none.json") is None


def test_the_sidecar_lease_works_on_an_s3_run_dir(s3_bucket):
    run, clock = f"{s3_bucket}/runs/leased", [1000.0]
    first = Lease(run, seconds=60, clock=lambda: clock[0]).acquire()
    with pytest.raises(LeaseHeld, match=first.holder):
        Lease(run, seconds=60, clock=lambda: clock[0]).acquire()
    clock[0] += 61
    second = Lease(run, seconds=60, clock=lambda: clock[0]).acquire()  # took the expired one over
    with pytest.raises(LeaseLost):
        first.renew()
    second.release()
    assert not storage.exists(second.url)


def test_botocore_retries_are_counted(s3_server, s3_bucket, monkeypatch):
    with FaultProxy(s3_server.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        url = f"{s3_bucket}/blob"
        storage.write_bytes_atomic(url, b"x")  # the endpoint answered: full retry budget from here on
        proxy.fail_next("GET", "/blob", 3, kind="slowdown")
        before = storage.retry_count()
        assert storage.read_bytes(url) == b"x"  # botocore's own attempts rode out the 503s
    assert proxy.counts["targeted_slowdown"] == 3 and storage.retry_count() - before == 3
