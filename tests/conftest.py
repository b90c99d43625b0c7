"""Test-session environment: no test may reach a public host, and no GPU is assumed.

AWS_ENDPOINT_URL points at a loopback port so a test that forgets to start the local S3
server fails fast instead of talking to AWS; fixtures that start one override it."""

import os

os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # discard port: connection refused, never AWS
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 2 cores shared by Ray workers, DataLoader workers and the test process: one torch thread each
# (two threads per process on an oversubscribed machine made steps 10-40x slower)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import uuid  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models and small convs: one torch thread is faster than two, and much faster on a
    busy machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3 server (moto's server mode on 127.0.0.1, a free port), one per test session.

    Yields a `linearsr.dev.s3local.S3Server`:
        s3_server.endpoint        "http://127.0.0.1:PORT"
        s3_server.make_bucket()   creates a fresh uniquely named bucket, returns "s3://NAME"
                                  (use one bucket per test: the server is shared by the session)
        s3_server.log_path        the server's request log
    While it runs, AWS_ENDPOINT_URL points at it (for this process and every child it starts:
    Ray workers, DataLoader workers, subprocesses), with the dummy credentials "testing" and
    NO_PROXY covering 127.0.0.1, so s3fs / boto3 / TensorBoard clients with no explicit endpoint
    land here and never on a public host. Afterwards the dead loopback endpoint is restored."""
    from linearsr.dev import s3local

    server = s3local.start(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket on the session's local S3 server: "s3://test-<random>"."""
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:12]}")


def write_images(folder, n: int = 8, size: tuple[int, int] = (48, 64), seed: int = 0,
                 formats: tuple[str, ...] = ("png", "jpg")) -> list:
    """Write n small smooth synthetic RGB images (sizes vary around `size` = (h, w)) into folder,
    alternating formats; returns their paths. Smooth like photos, so JPEG and down-scaling behave."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = size[0] + 4 * (i % 3), size[1] + 4 * (i % 2)
        coarse = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        path = folder / f"img{i:03d}.{formats[i % len(formats)]}"
        img.save(path, quality=95) if path.suffix == ".jpg" else img.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def make_images():
    """The `write_images(folder, n=8, size=(48, 64), seed=0, formats=("png", "jpg"))` helper."""
    return write_images


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """A local shard root (manifest.json, train/, val/) of 24 small synthetic images, 4 per shard,
    val fraction 0.35 (18 train samples in 5 shards, 6 val in 2), tags "red"/"blue" alternating; shared by the session: do not modify it."""
    from linearsr.data.shards import build_shards

    base = tmp_path_factory.mktemp("tiny_shards")
    paths = write_images(base / "src", n=24)
    tags = {p.name: ["red" if i % 2 else "blue", "synthetic"] for i, p in enumerate(paths)}
    build_shards(str(base / "src"), str(base / "shards"), samples_per_shard=4, val_fraction=0.35, tags=tags, progress=False)
    return str(base / "shards")
