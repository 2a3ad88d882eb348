"""A loopback HTTP proxy in front of the S3 test server that delays every request and fails some with 503.

Used by the fault tests and by benchmarks/s3_bench.py. It forwards each request unchanged (moto does not check
SigV4 signatures against the Host header) over a keep-alive connection per handler thread, after sleeping
`delay_s`; with probability `fail_rate` it answers 503 SlowDown instead, as S3 does under load. Only ever
bound to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


# The accept queue. socketserver's default is 5: the loader opens ~100-200 connections at once (every range
# request of its read-ahead in flight), the kernel drops the SYNs that do not fit, and each dropped client waits
# for its SYN to be retransmitted (1, 3, 7, 15, 31 s): the ~35 s first batches of benchmarks/RESULTS.md.
BACKLOG = 4096


class FaultyProxy:
    """start() -> url; counts requests forwarded and failed. fail_only_gets: faults on reads only."""

    def __init__(
        self,
        upstream: str,
        *,
        delay_s: float = 0.0,
        fail_rate: float = 0.0,
        seed: int = 0,
        fail_only_gets: bool = True,
        backlog: int = BACKLOG,
    ):
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.delay_s = delay_s
        self.fail_rate = fail_rate
        self.fail_only_gets = fail_only_gets
        self.backlog = backlog
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.forwarded = 0
        self.failed = 0
        self._server: ThreadingHTTPServer | None = None

    def _should_fail(self, method: str) -> bool:
        if self.fail_rate <= 0 or (self.fail_only_gets and method != "GET"):
            return False
        with self.rng_lock:
            return self.rng.random() < self.fail_rate

    def start(self) -> str:
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _upstream(self) -> http.client.HTTPConnection:
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                    local.conn = conn
                return conn

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._should_fail(self.command):
                    with proxy.rng_lock:
                        proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(_SLOW_DOWN)
                    return
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                for attempt in (0, 1):  # a keep-alive connection the server closed: reconnect once
                    conn = self._upstream()
                    try:
                        conn.request(self.command, self.path, body=body, headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        break
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        local.conn = None
                        if attempt:
                            raise
                with proxy.rng_lock:
                    proxy.forwarded += 1
                self.send_response(resp.status, resp.reason)
                head = self.command == "HEAD"  # its Content-Length is the object's size: pass it on
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding") and (
                        head or k.lower() != "content-length"
                    ):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": self.backlog})
        self._server = server_class(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def main() -> None:
    """`python tests/s3/proxy.py http://127.0.0.1:PORT --delay-ms 50`: serve until killed, print the URL."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("upstream")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--backlog", type=int, default=BACKLOG, help="accept queue (5: socketserver's default)")
    args = p.parse_args()
    proxy = FaultyProxy(
        args.upstream, delay_s=args.delay_ms / 1000, fail_rate=args.fail_rate, backlog=args.backlog
    )
    print(proxy.start(), flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
