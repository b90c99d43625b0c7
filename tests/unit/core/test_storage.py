"""linearsr.core.storage on local paths and with simulated failures: the retry budget, what is
never retried, the retry counter, atomic and conditional writes (S3 itself: tests/integration)."""

import math
import os

import pytest

from linearsr.core import storage


class Clock:
    """time.monotonic and sleep for with_retries: sleeping advances the clock instantly."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(storage.time, "monotonic", c.monotonic)
    yield c
    storage.configure(storage.StorageConfig())


def flaky(fails: int, error: Exception):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= fails:
            raise error
        return "ok"

    return fn, calls


def test_a_storage_outage_is_ridden_out_within_the_budget_and_every_retry_counted(clock):
    storage.configure(storage.StorageConfig(retry_budget_s=300))
    before = storage.retry_count()
    fn, calls = flaky(12, OSError(16, "Please reduce your request rate."))  # 503 SlowDown, as s3fs raises it
    assert storage.with_retries(fn, "write s3://b/k", sleep=clock.sleep) == "ok"
    assert len(calls) == 13 and storage.retry_count() - before == 12
    assert 60 < clock.now < 300  # backoff grew to tens of seconds instead of giving up after ~3 s
    assert max(clock.sleeps) <= 45  # capped (30 s x jitter 1.5)


def test_an_outage_longer_than_the_budget_ends_in_one_sentence_naming_the_call(clock):
    storage.configure(storage.StorageConfig(retry_budget_s=120))
    fn, calls = flaky(10**6, OSError(16, "Please reduce your request rate."))
    with pytest.raises(storage.StorageError, match=r"write s3://b/ckpt/COMPLETE failed for \d+ s .*retry_budget_s=120"):
        storage.with_retries(fn, "write s3://b/ckpt/COMPLETE", sleep=clock.sleep)
    assert clock.now <= 120


@pytest.mark.parametrize("error", [FileNotFoundError("no such key"), PermissionError("AccessDenied"), ValueError("bad arg")])
def test_errors_no_retry_can_fix_are_raised_at_once(clock, error):
    fn, calls = flaky(10, error)
    with pytest.raises(type(error)):
        storage.with_retries(fn, "read s3://b/k", sleep=clock.sleep)
    assert len(calls) == 1


def test_an_endpoint_that_never_answered_fails_in_seconds_not_minutes(clock, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    storage.configure(storage.StorageConfig(retry_budget_s=600, connect_budget_s=20))
    fn, _ = flaky(10**6, ConnectionRefusedError(111, "Connection refused"))
    with pytest.raises(ConnectionError, match="cannot reach the storage endpoint http://127.0.0.1:1"):
        storage.with_retries(fn, "read s3://b/k", sleep=clock.sleep)
    assert clock.now <= 20


def test_bad_storage_settings_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="storage.retry_mode must be standard or adaptive"):
        storage.StorageConfig(retry_mode="legacy")
    with pytest.raises(ValueError, match="storage.retry_budget_s must be > 0"):
        storage.StorageConfig(retry_budget_s=0)


def test_json_keeps_non_finite_floats_as_strict_json(tmp_path):
    url = str(tmp_path / "a" / "x.json")
    storage.write_json(url, {"loss": math.nan, "hi": math.inf, "lo": -math.inf, "v": [1.5]})
    text = open(url).read()
    assert '"nan"' in text and "NaN" not in text
    back = storage.read_json(url)
    assert math.isnan(back["loss"]) and back["hi"] == math.inf and back["lo"] == -math.inf and back["v"] == [1.5]


def test_a_failed_write_leaves_the_old_file_and_no_temp_behind(tmp_path):
    url = str(tmp_path / "state.json")
    storage.write_text_atomic(url, "old")

    def boom(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_local_atomic(url, boom)
    assert open(url).read() == "old" and os.listdir(tmp_path) == ["state.json"]
    assert oct(os.stat(url).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_copies_listings_and_deletes_on_local_paths(tmp_path):
    src = tmp_path / "src"
    (src / "ds").mkdir(parents=True)
    (src / "ds" / "a.pt").write_bytes(b"12345")
    (src / "meta.json").write_text("{}")
    dest = str(tmp_path / "run" / "ckpt")
    assert storage.upload_dir(str(src), dest) == ["ds/a.pt", "meta.json"]
    assert storage.find(dest) == {"ds/a.pt": 5, "meta.json": 2} and storage.ls(dest) == ["ds", "meta.json"]
    got = storage.download_dir(dest, str(tmp_path / "dl"), keep=lambda rel: rel.startswith("ds/"))
    assert got == ["ds/a.pt"] and (tmp_path / "dl" / "ds" / "a.pt").read_bytes() == b"12345"
    storage.rm(dest, recursive=True)
    storage.rm(dest, recursive=True)  # absent: nothing happens
    assert not storage.exists(dest) and storage.find(dest) == {}


def test_conditional_writes_let_exactly_one_writer_win(tmp_path):
    url = str(tmp_path / "analysis" / "lease.json")
    tag = storage.create_exclusive(url, b"A")
    assert tag is not None and storage.create_exclusive(url, b"B") is None
    assert storage.read_with_tag(url) == (b"A", tag)
    new = storage.replace_if_unchanged(url, b"A2", tag)
    assert new is not None and new != tag
    assert storage.replace_if_unchanged(url, b"B2", tag) is None  # B read the old version: it loses
    assert storage.read_with_tag(url) == (b"A2", new) and storage.read_with_tag(str(tmp_path / "none")) is None
