"""A fault-injecting HTTP proxy for S3 tests, on 127.0.0.1.

Point a client's endpoint at the proxy; it forwards to the real (local) S3 server and, for a
seeded random fraction of requests, instead:
  - "reset":  closes the connection without answering (a dropped TCP connection),
  - "slowdown": answers 503 SlowDown with S3's XML error body (what S3 says when throttling),
  - "truncate": forwards the request but cuts the response body off halfway (counted only when
    there was a body to cut: a HEAD answer or an empty body is forwarded whole).
Counts of requests and injected faults are kept per kind, for assertions. `enabled = False`
forwards everything untouched (requests are still counted). `fail_next(method, path, n)` fails
the next n matching requests whatever the rates, `fail_for(method, path, seconds)` every matching
request for that long (an outage of one prefix). `access_key_ids`
holds the access key ids the clients signed their requests with (proof of which credentials
a process really used). `bytes_served` counts the body bytes GET answers carried, per object.

Note: aiohttp (under s3fs) re-sends an idempotent request once, silently, when its connection is
dropped before an answer (RFC 9112 9.3.1), so a "reset" reaches the client's own retry loop only
when the re-sent request fails too; "slowdown" and "truncate" always do."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class FaultProxy:
    def __init__(self, upstream: str, reset: float = 0.0, slowdown: float = 0.0, truncate: float = 0.0,
                 seed: int = 0, methods: tuple[str, ...] = ("GET", "PUT", "POST", "HEAD", "DELETE")):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.rates = {"reset": reset, "slowdown": slowdown, "truncate": truncate}
        self.methods = set(methods)
        self.counts: Counter = Counter()
        self.bytes_served: Counter = Counter()  # object path (/bucket/key) -> body bytes of the GETs answered
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[list] = []
        self._bursts: list[dict] = []
        self.access_key_ids: set[str] = set()  # the access key ids the clients signed with (never secrets)
        self.enabled = True
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                proxy._saw_credential(self.headers.get("Authorization", ""))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._pick(self.command, self.path)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slowdown":
                    self.send_response(503, "Slow Down")
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOWDOWN_BODY)
                    return
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # a HEAD answer has no body but the object's Content-Length
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if head:
                    return
                if fault == "truncate" and len(data) > 1:
                    proxy._count("truncate")
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command == "GET":
                    proxy._served(self.path, len(data))
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def fail_next(self, method: str, path_contains: str, count: int, kind: str = "slowdown") -> None:
        """Answer the next `count` requests of `method` whose path contains `path_contains` with
        fault `kind` ("slowdown" or "reset"), whatever the random rates say (an outage of one prefix)."""
        assert kind in ("slowdown", "reset"), kind
        with self._lock:
            self._rules.append([method, path_contains, count, kind])

    def fail_for(self, method: str, path_contains: str, seconds: float, kinds: tuple[str, ...] = ("slowdown", "reset")) -> None:
        """An outage of one prefix that starts with the first matching request and lasts `seconds`:
        every matching request until then gets the next fault of `kinds`, in turn."""
        assert all(k in ("slowdown", "reset") for k in kinds), kinds
        with self._lock:
            self._bursts.append({"method": method, "path": path_contains, "seconds": seconds, "kinds": kinds,
                                 "start": None, "n": 0})

    def _burst(self, method: str, path: str) -> str | None:
        for b in self._bursts:
            if b["method"] == method and b["path"] in path:
                now = time.monotonic()
                b["start"] = now if b["start"] is None else b["start"]
                if now - b["start"] < b["seconds"]:
                    kind = b["kinds"][b["n"] % len(b["kinds"])]
                    b["n"] += 1
                    return kind
        return None

    def _pick(self, method: str, path: str = "") -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            burst = self._burst(method, path)
            if burst is not None:
                self.counts[burst] += 1
                self.counts["targeted"] += 1
                self.counts[f"targeted_{burst}"] += 1
                return burst
            for rule in self._rules:
                if rule[2] > 0 and rule[0] == method and rule[1] in path:
                    rule[2] -= 1
                    self.counts[rule[3]] += 1
                    self.counts["targeted"] += 1
                    self.counts[f"targeted_{rule[3]}"] += 1
                    return rule[3]
            if not self.enabled or method not in self.methods:
                return None
            u = self._rng.random()
            acc = 0.0
            for kind, rate in self.rates.items():
                acc += rate
                if u < acc:
                    if kind != "truncate":  # counted once a body was actually cut (a HEAD has none)
                        self.counts[kind] += 1
                    return kind
            return None

    def _saw_credential(self, authorization: str) -> None:
        # SigV4: "AWS4-HMAC-SHA256 Credential=<access key id>/<date>/<region>/s3/aws4_request, ..."
        if "Credential=" in authorization:
            with self._lock:
                self.access_key_ids.add(authorization.split("Credential=", 1)[1].split("/", 1)[0])

    def _served(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_served[urlsplit(path).path] += n

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def injected(self) -> int:
        return sum(self.counts[k] for k in self.rates)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
