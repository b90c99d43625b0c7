"""A local S3 server (moto's server mode) on 127.0.0.1, for tests, `make demo STORE=s3` and benchmarks.

    python -m linearsr.dev.s3local up   [--state runs/s3] [--port N]   # prints the env to export
    python -m linearsr.dev.s3local down [--state runs/s3]
    python -m linearsr.dev.s3local status [--state runs/s3]

State folder: `server.pid`, `server.log`, `endpoint` (the URL) and `env` (a shell snippet with
AWS_ENDPOINT_URL and the dummy credentials: `. runs/s3/env`). Data lives in the server's
memory and is gone after `down`. Credentials are the dummy pair "testing"/"testing".
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from linearsr.dev.local_ray import free_port

HOST = "127.0.0.1"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _ready(endpoint: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(endpoint + "/", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _is_moto(pid: int) -> bool:
    try:
        return b"moto.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass
class S3Server:
    """A running moto server. `endpoint` is its URL; `make_bucket()` creates a fresh bucket."""

    endpoint: str
    pid: int
    state_dir: Path
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.state_dir / "server.log"

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (endpoint, dummy credentials, no proxy)."""
        no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY"), HOST, "localhost") if x)
        return {"AWS_ENDPOINT_URL": self.endpoint, **DUMMY_ENV, "NO_PROXY": no_proxy, "no_proxy": no_proxy}

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name if none given) and return its URL `s3://name`."""
        import boto3

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif _is_moto(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            for _ in range(100):
                if not _is_moto(self.pid):
                    break
                time.sleep(0.1)
        for name in ("server.pid", "endpoint", "env"):
            (self.state_dir / name).unlink(missing_ok=True)


def start(state_dir: str | os.PathLike, port: int | None = None, detach: bool = False, timeout: float = 60.0) -> S3Server:
    """Start moto's S3 server on 127.0.0.1 (a free port unless given) and wait until it answers.
    `detach=True` lets it outlive this process (for `make s3-up`)."""
    state = Path(state_dir)
    state.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _ in range(3):  # a free port can be taken between probing and binding: try another
        p = port or free_port()
        endpoint = f"http://{HOST}:{p}"
        log = open(state / "server.log", "ab")
        env = {**os.environ, **DUMMY_ENV}
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(p)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=detach)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None and not _ready(endpoint):
            time.sleep(0.1)
        if proc.poll() is None and _ready(endpoint):
            server = S3Server(endpoint, proc.pid, state, None if detach else proc)
            (state / "server.pid").write_text(f"{proc.pid}\n")
            (state / "endpoint").write_text(endpoint + "\n")
            (state / "env").write_text("".join(f"export {k}={v}\n" for k, v in server.env().items()))
            return server
        proc.kill()
        proc.wait()
        last_error = f"moto server on port {p} did not come up within {timeout:.0f}s (exit {proc.returncode})"
        if port:
            break
    raise RuntimeError(f"{last_error}; see {state / 'server.log'}")


def running(state_dir: str | os.PathLike) -> S3Server | None:
    """The server recorded in state_dir, if it is still alive."""
    state = Path(state_dir)
    try:
        pid = int((state / "server.pid").read_text())
        endpoint = (state / "endpoint").read_text().strip()
    except (OSError, ValueError):
        return None
    return S3Server(endpoint, pid, state) if _is_moto(pid) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linearsr.dev.s3local", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state", default="runs/s3", help="state folder (pid, log, endpoint, env)")
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    args = parser.parse_args(argv)
    server = running(args.state)
    if args.action == "up":
        if server is None:
            server = start(args.state, port=args.port, detach=True)
            print(f"local S3 server started: {server.endpoint} (pid {server.pid}, log {server.log_path})")
        else:
            print(f"local S3 server already running: {server.endpoint} (pid {server.pid})")
        print(f"use it with:  . {Path(args.state) / 'env'}")
    elif args.action == "down":
        if server is None:
            print(f"no local S3 server recorded in {args.state}")
        else:
            server.stop()
            print(f"local S3 server {server.endpoint} (pid {server.pid}) stopped")
    else:
        print(f"running: {server.endpoint} (pid {server.pid})" if server else f"not running (state {args.state})")
        return 0 if server else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
