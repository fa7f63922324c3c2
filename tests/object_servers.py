"""Real servers on loopback for the object-storage tests: moto's S3 server, an HTTP file server and a
fault-injecting reverse proxy.  Started once per test session; the fixtures are imported by
tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import logging
import random
import socket
import threading
from pathlib import Path

import pytest

BUCKET = "pssr-test"
ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-print",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """The session's S3 server: endpoint, bucket, and helpers to put local folders there."""

    def __init__(self, endpoint: str, tmp: Path) -> None:
        self.endpoint = endpoint
        self.tmp = tmp
        self.bucket = BUCKET

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        quiet = self.tmp / "aws-empty"
        quiet.touch()
        return {
            **ENV,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            # tensorstore's AWS library logs a harmless error per missing ~/.aws file otherwise
            "AWS_CONFIG_FILE": str(quiet),
            "AWS_SHARED_CREDENTIALS_FILE": str(quiet),
        }

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def store(self, prefix: str | None = None, endpoint: str | None = None):
        from obstore.store import S3Store

        return S3Store(
            self.bucket, prefix=prefix, endpoint=endpoint or self.endpoint, region="us-east-1",
            access_key_id=ENV["AWS_ACCESS_KEY_ID"], secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"],
            client_options={"allow_http": True},
        )  # fmt: skip

    def upload(self, folder: Path, key: str) -> str:
        """Copy a local folder (a zarr, N5, precomputed volume) to ``s3://bucket/key``; its URL."""
        import obstore

        st = self.store()
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                obstore.put(st, f"{key}/{p.relative_to(folder).as_posix()}", p.read_bytes())
        return self.url(key)

    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix`` (obstore lists by path segments: list the parent)."""
        import obstore

        parent = prefix.rsplit("/", 1)[0] if "/" in prefix else None
        found = (m["path"] for batch in obstore.list(self.store(), prefix=parent) for m in batch)
        return sorted(k for k in found if k.startswith(prefix))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on a free loopback port, with one bucket."""
    pytest.importorskip("moto.server", reason="moto[s3], flask and flask-cors are in the dev extra")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=BUCKET)  # fmt: skip
    yield S3(endpoint, tmp_path_factory.mktemp("aws"))
    srv.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with the standard AWS environment pointing at it for this test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3_server


class _Quiet(http.server.SimpleHTTPRequestHandler):
    # keep-alive, and no 40 ms Nagle / delayed-ACK stall between the headers and the body
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """``(folder, base_url)``: python's http.server serving a folder from a thread."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(_Quiet, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
_HOP = {
    "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
    "proxy-authenticate", "content-length",
}  # fmt: skip


class FaultProxy:
    """A reverse proxy that answers 503 SlowDown (``p503``), drops the connection (``pdrop``) or
    denies (``p403``) a fraction of requests and forwards the rest unchanged; ``stats`` counts them."""

    def __init__(self, upstream: str, p503=0.0, pdrop=0.0, p403=0.0, seed=0) -> None:
        self.upstream = upstream.rstrip("/")
        self.p503, self.pdrop, self.p403 = p503, pdrop, p403
        self.rng = random.Random(seed)
        self.stats = {"requests": 0, "503": 0, "dropped": 0, "403": 0, "forwarded": 0}
        self._lock = threading.Lock()
        self.log: list[tuple[str, str, str]] = []  # (method, path, what happened) of every request

    @property
    def faults(self) -> int:
        return self.stats["503"] + self.stats["dropped"]

    async def handle(self, request):
        from aiohttp import web

        with self._lock:
            self.stats["requests"] += 1
            r = self.rng.random()
        body = await request.read()
        if r < self.p403:
            self.stats["403"] += 1
            self.log.append((request.method, request.path_qs, "403"))
            return web.Response(status=403, body=DENIED, content_type="application/xml")
        if r < self.p403 + self.p503:
            self.stats["503"] += 1
            self.log.append((request.method, request.path_qs, "503"))
            return web.Response(status=503, body=SLOWDOWN, content_type="application/xml")
        if r < self.p403 + self.p503 + self.pdrop:
            self.stats["dropped"] += 1
            self.log.append((request.method, request.path_qs, "dropped"))
            request.transport.close()
            raise asyncio.CancelledError
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body,
            allow_redirects=False, auto_decompress=False,
        ) as up:  # fmt: skip
            data = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in _HOP}
            self.stats["forwarded"] += 1
            self.log.append((request.method, request.path_qs, "forwarded"))
            if request.method == "HEAD":
                if "Content-Length" in up.headers:
                    out["Content-Length"] = up.headers["Content-Length"]
                return web.Response(status=up.status, headers=out)
            return web.Response(status=up.status, body=data, headers=out)

    async def _main(self, ready: threading.Event) -> None:
        import aiohttp
        from aiohttp import web

        self.session = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent")
        )
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        ready.set()
        await self._stop.wait()
        await runner.cleanup()
        await self.session.close()

    def start(self) -> str:
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(ready)), daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fault proxy did not start"
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def fault_proxy(s3_server):
    """A factory of fault proxies in front of the S3 server, stopped after the test."""
    made: list[FaultProxy] = []

    def make(upstream: str | None = None, **kw) -> tuple[FaultProxy, str]:
        proxy = FaultProxy(upstream or s3_server.endpoint, **kw)
        made.append(proxy)
        return proxy, proxy.start()

    yield make
    for p in made:
        p.stop()


__all__ = ["BUCKET", "ENV", "FaultProxy", "S3", "fault_proxy", "http_server", "s3", "s3_server"]
