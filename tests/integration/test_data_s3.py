"""Shards on the local S3 server: round trip, loaders with workers, retries, and no public host."""

import ipaddress
import socket
import subprocess
import sys

import pytest
import webdataset

from linearsr.core import storage
from linearsr.data import s3  # noqa: F401 (s3 registers webdataset's s3:// opener)
from linearsr.data.config import DataConfig
from linearsr.data.loader import make_train_loader, make_val_loader
from linearsr.data.reader import iter_samples
from linearsr.data.shards import build_shards, read_shard_manifest
from linearsr.dev import s3local


def test_build_and_read_back_through_s3_is_byte_identical(s3_bucket, make_images, tmp_path):
    paths = make_images(tmp_path / "src", n=10)
    root = f"{s3_bucket}/photos/shards"
    manifest = build_shards(str(tmp_path / "src"), root, samples_per_shard=3, val_fraction=0.3, progress=False)
    assert read_shard_manifest(root) == manifest
    by_name = {p.stem: p.read_bytes() for p in paths}
    seen = {}
    for split in ("train", "val"):
        for s in iter_samples(root, split):
            ext = "png" if "png" in s else "jpg"
            seen[s["__key__"]] = s[ext]
    assert seen == by_name  # every image, stored bytes identical to the source file
    first = f"{root}/{manifest['splits']['train']['shards'][0]['path']}"
    plain = list(webdataset.WebDataset(first, shardshuffle=False))  # the registered s3:// opener
    assert [s["__key__"] for s in plain] == [s["__key__"] for s in iter_samples(root, "train")][:len(plain)] and plain

    cfg = DataConfig(shards=root, crop=32, val_crop=32, batch_size=2, num_workers=2, shuffle_buffer=4)
    loader = make_train_loader(cfg, seed=0)
    try:
        batches = [next(loader) for _ in range(4)]
    finally:
        loader.close()
    assert batches[-1]["hr"].shape == (2, 3, 32, 32) and loader.skips == {}
    val = [k for b in make_val_loader(cfg) for k in b["key"]]
    assert sorted(val) == sorted(s["__key__"] for s in iter_samples(root, "val"))


def test_s3_loader_counts_a_missing_shard(s3_bucket, tiny_shards):
    root = f"{s3_bucket}/tiny"
    fs, _ = storage.filesystem(root)
    fs.put(tiny_shards, root[len("s3://"):], recursive=True)
    manifest = read_shard_manifest(root)
    gone = manifest["splits"]["val"]["shards"][0]
    fs.rm(f"{root}/{gone['path']}")
    loader = make_val_loader(DataConfig(shards=root, crop=32, val_crop=32, num_workers=2, max_skip_fraction=1.0))
    got = sum(len(b["key"]) for b in loader)
    assert loader.skips == {"missing_shard": gone["samples"]}
    assert got == manifest["splits"]["val"]["samples"] - gone["samples"]


def test_reader_resumes_a_shard_after_a_dropped_request(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    fs, _ = storage.filesystem(s3_bucket)
    data = bytes(range(256)) * 4096  # 1 MiB
    fs.pipe_file(f"{s3_bucket}/blob"[5:], data)
    real, failures = fs.cat_file, []

    def cat_file(path, start=None, end=None, **kw):
        if start and not failures:  # the second ranged GET fails once
            failures.append(start)
            raise ConnectionResetError("reset")
        return real(path, start=start, end=end, **kw)

    monkeypatch.setattr(fs, "cat_file", cat_file)
    monkeypatch.setattr(storage, "CHUNK", 256 << 10)
    before = storage.retry_count()
    with storage.open_read(f"{s3_bucket}/blob") as f:
        assert f.read() == data
    assert failures and storage.retry_count() - before == 1


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json under shard root s3://no-such-bucket-x"):
        make_train_loader(DataConfig(shards="s3://no-such-bucket-x/shards"))


def test_s3_server_fixture_never_lets_a_request_reach_a_public_host(s3_bucket, s3_server, monkeypatch):
    peers = []
    real_connect = socket.socket.connect

    def connect(self, address):
        peers.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    import boto3
    import s3fs

    # clients that are given no endpoint at all: they must follow AWS_ENDPOINT_URL to the local server
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe_file(f"{s3_bucket}/probe"[5:], b"hello")
    assert boto3.client("s3").get_object(Bucket=s3_bucket[5:], Key="probe")["Body"].read() == b"hello"
    assert peers and all(ipaddress.ip_address(a[0]).is_loopback for a in peers), peers
    assert all(a[1] == int(s3_server.endpoint.rsplit(":", 1)[1]) for a in peers)
    # and child processes inherit the endpoint
    code = "import boto3; print(boto3.client('s3').meta.endpoint_url)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == s3_server.endpoint
    assert "probe" in s3_server.log_path.read_text()


def test_s3_up_and_down_manage_a_detached_server(tmp_path, capsys):
    state = tmp_path / "s3"
    assert s3local.main(["up", "--state", str(state)]) == 0
    server = s3local.running(state)
    assert server is not None and "export AWS_ENDPOINT_URL=http://127.0.0.1:" in (state / "env").read_text()
    assert s3local.main(["up", "--state", str(state)]) == 0  # idempotent
    assert "already running" in capsys.readouterr().out
    server.make_bucket("upcheck")
    assert s3local.main(["down", "--state", str(state)]) == 0
    assert s3local.running(state) is None and not (state / "server.pid").exists()
    assert s3local.main(["status", "--state", str(state)]) == 1


def test_no_credentials_and_unreachable_endpoint_are_one_line_errors(s3_bucket, monkeypatch, capsys):
    from linearsr.main import main

    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    monkeypatch.setattr(storage, "_filesystems", {})  # fresh clients that resolve credentials again
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    before = storage.retry_count()
    assert main(["shards", "info", f"{s3_bucket}/shards"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no AWS credentials found; set AWS_ACCESS_KEY_ID" in err and "\n" not in err
    assert storage.retry_count() == before  # not worth retrying
    monkeypatch.undo()

    monkeypatch.setattr(storage, "_settings", storage.StorageConfig(connect_budget_s=2))
    cfg = DataConfig(shards=f"{s3_bucket}/shards", s3_endpoint="http://127.0.0.1:9")
    with pytest.raises(ConnectionError, match=r"cannot reach the storage endpoint http://127.0.0.1:9 after \d+ attempts"):
        make_train_loader(cfg)


def test_read_ahead_hands_over_bytes_then_the_error_that_ended_the_download():
    import io

    class Flaky(io.RawIOBase):
        def __init__(self):
            self.sent = 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.sent >= 3000:
                raise OSError("connection reset after retries")
            n = min(len(b), 1000)
            b[:n] = bytes([self.sent // 1000 + 1]) * n
            self.sent += n
            return n

    with io.BufferedReader(storage.ReadAhead(Flaky(), chunk=1000, depth=2), 512) as f:
        assert f.read(2500) == b"\1" * 1000 + b"\2" * 1000 + b"\3" * 500
        with pytest.raises(OSError, match="connection reset after retries"):
            f.read()
