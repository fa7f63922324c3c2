"""Images where they lie: ``s3://``, ``gs://`` and ``http(s)://`` URLs, with retries that are counted.

Zarr v2/v3 and OME-Zarr on S3 or GCS are read through zarr's ``ObjectStore`` over obstore (one
Rust wheel; measured at the local S3 server's ceiling, 2.3x s3fs: docs/remote.md); over HTTP, or
when the user gives fsspec ``storage_options``, through zarr's ``FsspecStore``.  Either is wrapped
in a :class:`RetryingStore`: transient failures (HTTP 5xx, 429 throttling, dropped connections,
timeouts) are retried with exponential backoff and jitter, and every retry is counted
(:func:`retry_count`), because no library reports its own.  obstore's internal retries are turned
off so that each failed request is seen (and counted) exactly once.

Credentials come from the SDKs' standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``;
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS) or from ``storage_options``, which are never printed,
logged or stored with an output (:func:`redact`).

A missing bucket, object or permission is one :class:`~pssr.errors.PssrIOError` line naming the URL
and the HTTP status (:func:`explain`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from zarr.storage import WrapperStore

from pssr.errors import PssrError, PssrIOError

logger = logging.getLogger(__name__)

__all__ = [
    "CLOUD_EXTRA",
    "Claims",
    "RetryingStore",
    "content_stamp",
    "access_failure",
    "explain",
    "explained",
    "is_url",
    "parse_storage_options",
    "redact",
    "require",
    "retry",
    "raw_store",
    "retry_count",
    "set_storage_options",
    "split_url",
    "url_parts",
    "writable_store",
    "zarr_store",
]

CLOUD_EXTRA = "pip install 'pssr-toolkit[cloud]'"
SCHEMES = ("s3", "gs", "gcs", "http", "https")
_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Neuroglancer's data source prefixes: "precomputed://gs://bucket/path", "n5://s3://...", "zarr://..."
FORMAT_PREFIXES = ("precomputed", "n5", "zarr", "zarr2", "zarr3")


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL pssr reads over the network (``s3://``, ``gs://``, ``http(s)://``)."""
    if not isinstance(path, str):
        return False
    m = _URL.match(path)
    if not m:
        return False
    scheme = m.group(1).lower()
    if scheme in FORMAT_PREFIXES:
        return is_url(path[m.end() :])
    return scheme in SCHEMES


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or host, key)`` of a URL, the key without slashes at its ends."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise PssrIOError(
            f"{url!r}: the scheme {scheme!r} is not supported; use s3://, gs://, http:// or https://."
        )
    if not parts.netloc:
        raise PssrIOError(f"{url!r} names no bucket or host; write it as {scheme}://BUCKET/path.")
    return ("gs" if scheme == "gcs" else scheme), parts.netloc, parts.path.strip("/")


# ----------------------------------------------------------------------- comparing URLs
_HOSTED = (  # path-style HTTP(S) hosts of object stores: http(s)://HOST/bucket/key is SCHEME://bucket/key
    (re.compile(r"^s3[.-]([a-z0-9-]+[.])?amazonaws[.]com$"), "s3"),
    (re.compile(r"^storage[.]googleapis[.]com$"), "gs"),
)
_VHOSTED = (  # virtual-hosted: http(s)://bucket.HOST/key
    (re.compile(r"^(.+)[.]s3[.-]([a-z0-9-]+[.])?amazonaws[.]com$"), "s3"),
    (re.compile(r"^(.+)[.]storage[.]googleapis[.]com$"), "gs"),
)


def _endpoints(storage_options: dict[str, Any] | None) -> list[str]:
    """The S3 endpoints in use (``endpoint_url`` option, ``AWS_ENDPOINT_URL[_S3]``), as ``scheme://host``."""
    found = [(storage_options or {}).get("endpoint_url"), *(os.environ.get(k) for k in _S3_ENDPOINT_VARS)]
    out = []
    for e in found:
        if isinstance(e, str) and e:
            p = urlsplit(e)
            out.append(f"{p.scheme.lower()}://{p.netloc.lower()}")
    return out


_S3_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def url_parts(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str, tuple[str, ...]]:
    """``(scheme, bucket, key segments)`` naming the objects under ``url``, for comparing two URLs.

    A Neuroglancer format prefix (``precomputed://``) is dropped, ``gcs`` is ``gs``, empty segments
    (``//``, a trailing slash) are dropped; an http(s) URL on the S3 endpoint in use (``endpoint_url``,
    ``AWS_ENDPOINT_URL``), on AWS S3 or on Google Cloud Storage is the ``s3://`` / ``gs://`` URL of the same
    objects.  A ``.`` or ``..`` segment is refused (object stores do not resolve them: the key would name
    other objects than it reads as), with the URL to write instead.
    """
    s = url
    m = _URL.match(s)
    while m and m.group(1).lower() in FORMAT_PREFIXES:
        s = s[m.end() :]
        m = _URL.match(s)
    scheme, host, key = split_url(s)
    segs = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in segs):
        fixed: list[str] = []
        for p in segs:
            if p == "..":
                fixed = fixed[:-1]
            elif p != ".":
                fixed.append(p)
        base = f"{s[: s.index('://')]}://{host}"
        raise PssrIOError(
            f"{url!r}: the key has a '.' or '..' segment, which object storage does not resolve (a key is a "
            f"name, not a path); write it without them, e.g. {base + '/' + '/'.join(fixed)!r}."
        )
    host = host.lower()
    if scheme in ("http", "https"):
        origin = f"{scheme}://{host}"
        for rx, sch in _VHOSTED:
            if (mv := rx.match(host)) is not None:
                return sch, mv.group(1), tuple(segs)
        if segs and (origin in _endpoints(storage_options) or any(rx.match(host) for rx, _ in _HOSTED)):
            sch = next((sch for rx, sch in _HOSTED if rx.match(host)), "s3")
            return sch, segs[0], tuple(segs[1:])
    return scheme, host, tuple(segs)


def require(module: str, what: str) -> Any:
    """Import ``module`` (an optional dependency) or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise PssrIOError(
            f"{what} needs the Python package {module.split('.')[0]!r}, which is not installed; "
            f"install the cloud extra: {CLOUD_EXTRA}"
        ) from None


def parse_storage_options(text: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """``--storage-options JSON`` as a dict (fsspec's keys: ``endpoint_url``, ``key``, ``secret``...)."""
    if text is None:
        return None
    if isinstance(text, dict):
        return _check_client_kwargs(text)
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        # never echo the text: it may hold a secret
        raise PssrIOError(
            f"--storage-options is not valid JSON ({e.msg} at character {e.pos}); give an object such as "
            '\'{"endpoint_url": "https://...", "anon": true}\'.'
        ) from None
    if not isinstance(opts, dict):
        raise PssrIOError("--storage-options must be a JSON object such as '{\"anon\": true}'.")
    return _check_client_kwargs(opts)


# botocore's Session.create_client keywords (s3fs passes client_kwargs there; writing reads region_name)
_CLIENT_KWARGS = (
    "region_name", "api_version", "use_ssl", "verify", "endpoint_url", "aws_access_key_id",
    "aws_secret_access_key", "aws_session_token", "config", "aws_account_id",
)  # fmt: skip


def _check_client_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Refuse a nested ``client_kwargs`` that is not an object or holds a key botocore has no option for."""
    ck = opts.get("client_kwargs")
    if ck is None:
        return opts
    if not isinstance(ck, dict):
        raise PssrIOError(
            f"--storage-options client_kwargs must be a JSON object such as "
            f'{{"region_name": "us-east-1"}}, not {type(ck).__name__}.'
        )
    for k in ck:
        if k not in _CLIENT_KWARGS:
            hint = " (the region is 'region_name')" if k.lower() in ("region", "aws_region") else ""
            raise PssrIOError(
                f"--storage-options client_kwargs key {k!r} is not an option of the S3 client{hint}; remove "
                f"or correct it. Its options: {', '.join(_CLIENT_KWARGS)}."
            )
    return opts


_SECRET = re.compile(r"(secret|token|password|passwd|key|credential|session|signature|auth)", re.I)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with every value under a secret-looking key replaced."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        # presigned URLs and the like: drop query strings that carry signatures
        return re.sub(r"([?&](?:X-Amz-[A-Za-z-]+|Signature|sig|token)=)[^&\s]+", r"\1***", obj)
    return obj


# ------------------------------------------------------------------------------- retries
class _Counter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.last: str = ""

    def add(self, what: str) -> None:
        with self._lock:
            self.retries += 1
            self.last = what


_COUNT = _Counter()
RETRIES = int(os.environ.get("PSSR_RETRIES", "10"))  # attempts after the first, per request
_BACKOFF = (0.05, 5.0)  # first and longest wait, seconds (exponential, full jitter)


def retry_count() -> int:
    """Transient failures retried so far in this process (every remote request pssr makes)."""
    return _COUNT.retries


_TRANSIENT = re.compile(
    r"(\b5\d\d\b|\b429\b|SlowDown|Throttl|RequestTimeout|timed? ?out|error sending request|connection|"
    r"disconnected|reset by peer|broken pipe|incomplete ?read|payload|UNAVAILABLE|DEADLINE_EXCEEDED|"
    r"ServiceUnavailable|InternalError)",
    re.I,
)
_PERMANENT = re.compile(r"(\b40[0134]\b|NoSuchBucket|NoSuchKey|AccessDenied|Forbidden|not found)", re.I)


def transient(e: BaseException) -> bool:
    """Whether an error from a store is worth retrying (5xx, 429, dropped connection, timeout)."""
    if isinstance(e, FileNotFoundError | PermissionError | KeyError | NotImplementedError):
        return False
    if isinstance(e, TimeoutError | ConnectionError | asyncio.TimeoutError):
        return True
    status = getattr(e, "status", None) or getattr(e, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    text = f"{type(e).__name__}: {e}"
    # the message's elapsed time ("in 403.828µs") is no HTTP status: a dropped connection 403 µs in
    # was taken for a 403 and not retried (seen in the fault-proxy test)
    head = re.sub(r"\bin [0-9.]+\s*(?:[µu]s|ms|ns|s)\b", "", text.split("Debug source")[0])
    if _PERMANENT.search(head) and not re.search(r"\b5\d\d\b|\b429\b", head):
        return False
    return bool(_TRANSIENT.search(head))


def _delay(attempt: int) -> float:
    return random.uniform(0, min(_BACKOFF[1], _BACKOFF[0] * 2**attempt))


def retry(fn: Callable[[], Any], what: str, *, retries: int | None = None) -> Any:
    """``fn()``, retried with backoff on transient failures (counted); the last failure is raised."""
    n = RETRIES if retries is None else retries
    for attempt in range(n + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == n or not transient(e):
                raise
            _COUNT.add(what)
            logger.debug("retrying %s after %s", what, type(e).__name__)
            time.sleep(_delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


async def _aretry(fn: Callable[[], Any], what: str) -> Any:
    for attempt in range(RETRIES + 1):
        try:
            return await fn()
        except Exception as e:
            if attempt == RETRIES or not transient(e):
                raise
            _COUNT.add(what)
            logger.debug("retrying %s after %s", what, type(e).__name__)
            await asyncio.sleep(_delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


class RetryingStore(WrapperStore):
    """A zarr store whose requests are retried on transient failures, each retry counted."""

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:  # noqa: D102
        return await _aretry(lambda: self._store.get(key, prototype, byte_range), key)

    async def get_partial_values(self, prototype: Any, key_ranges: Iterable[tuple[str, Any]]) -> Any:  # noqa: D102
        key_ranges = list(key_ranges)
        return await _aretry(lambda: self._store.get_partial_values(prototype, key_ranges), "partial values")

    async def _get_many(self, requests: Iterable[tuple[str, Any, Any]]) -> Any:
        for req in requests:  # the wrapped store's own _get_many would bypass self.get
            yield (req[0], await self.get(*req))

    async def getsize(self, key: str) -> int:  # noqa: D102
        return await _aretry(lambda: self._store.getsize(key), key)

    async def exists(self, key: str) -> bool:  # noqa: D102
        return await _aretry(lambda: self._store.exists(key), key)

    async def set(self, key: str, value: Any) -> None:  # noqa: D102
        return await _aretry(lambda: self._store.set(key, value), key)

    async def delete(self, key: str) -> None:  # noqa: D102
        return await _aretry(lambda: self._store.delete(key), key)

    async def set_if_not_exists(self, key: str, value: Any) -> None:  # noqa: D102
        return await _aretry(lambda: self._store.set_if_not_exists(key, value), key)

    async def delete_dir(self, prefix: str) -> None:  # noqa: D102
        return await _aretry(lambda: self._store.delete_dir(prefix), prefix)

    async def _listed(self, method: str, prefix: str) -> list[str]:
        async def collect() -> list[str]:
            return [k async for k in getattr(self._store, method)(prefix)]

        return await _aretry(collect, f"list {prefix}")

    async def list_prefix(self, prefix: str):  # noqa: D102  (a listing cut short is listed again, whole)
        for k in await self._listed("list_prefix", prefix):
            yield k

    async def list_dir(self, prefix: str):  # noqa: D102
        for k in await self._listed("list_dir", prefix):
            yield k


# -------------------------------------------------------------------------------- stores
def _obstore(url: str, *, read_only: bool) -> Any:
    """An obstore store for an s3:// or gs:// URL, credentials and endpoint from the environment."""
    from datetime import timedelta

    require("obstore", f"reading {url!r}")
    from obstore.store import GCSStore, S3Store

    scheme, bucket, key = split_url(url)
    # pssr retries (and counts) every failed request itself: obstore's own retries are off
    rc = {"max_retries": 0, "retry_timeout": timedelta(seconds=60)}
    client: dict[str, Any] = {"timeout": timedelta(seconds=120), "connect_timeout": timedelta(seconds=10)}
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and endpoint.startswith("http://"):
            client["allow_http"] = True
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kw: dict[str, Any] = {"region": region} if region else {}
        if endpoint:
            kw["endpoint"] = endpoint
        creds = _aws_profile_credentials()
        if creds is not None:
            kw["credential_provider"] = creds
        return S3Store(bucket, prefix=key or None, client_options=client, retry_config=rc, **kw)
    return GCSStore(bucket, prefix=key or None, client_options=client, retry_config=rc)


def _aws_profile_credentials() -> Any:
    """The botocore credential chain (profiles, SSO, ~/.aws) when the environment holds no keys."""
    if os.environ.get("AWS_ACCESS_KEY_ID") or not (
        os.environ.get("AWS_PROFILE") or os.path.exists(os.path.expanduser("~/.aws/credentials"))
    ):
        return None  # obstore reads the environment (and instance metadata) itself
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return None
    try:
        return Boto3CredentialProvider()
    except Exception:  # no boto3 or no usable profile: obstore's own chain
        return None


def zarr_store(url: str, *, storage_options: dict[str, Any] | None = None, read_only: bool = True) -> Any:
    """A zarr store for a URL: obstore for s3/gs, fsspec for http(s) or with ``storage_options``."""
    import zarr.storage

    scheme, _, _ = split_url(url)
    if storage_options is not None:
        _check_client_kwargs(storage_options)
    if storage_options is not None or scheme in ("http", "https"):
        require("fsspec", f"reading {url!r}")
        if scheme in ("http", "https"):
            require("aiohttp", f"reading {url!r}")
        elif scheme == "s3":
            require("s3fs", f"reading {url!r} with --storage-options")
        else:
            require("gcsfs", f"reading {url!r} with --storage-options")
        fs_url = url.replace("gcs://", "gs://", 1)
        inner = zarr.storage.FsspecStore.from_url(
            fs_url, storage_options=dict(storage_options or {}), read_only=read_only
        )
    else:
        inner = zarr.storage.ObjectStore(_obstore(url, read_only=read_only), read_only=read_only)
    return RetryingStore(inner)


# -------------------------------------------------------------------------------- errors
def _status(text: str) -> tuple[int | None, str]:
    """The HTTP status and S3/GCS error code in a library's error text."""
    m = re.search(r"status(?: code)?[:= ]+(\d{3})", text) or re.search(r"\b(40\d|41\d|429|5\d\d)\b", text)
    code = re.search(r"<Code>([A-Za-z]+)</Code>", text)
    return (int(m.group(1)) if m else None), (code.group(1) if code else "")


_WHY = {
    "NoSuchBucket": "the bucket does not exist",
    "AccessDenied": "access denied",
    "InvalidAccessKeyId": "the access key is not valid",
    "SignatureDoesNotMatch": "the secret key does not match",
    "NoSuchKey": "no such object",
}


def fs_option_names(scheme: str) -> list[str]:
    """The keyword options that fsspec's filesystem for ``scheme`` names in its constructors."""
    import inspect

    try:
        import fsspec

        cls = fsspec.get_filesystem_class({"gs": "gcs"}.get(scheme, scheme))
    except (ImportError, ValueError):
        return []
    names: set[str] = set()
    for k in cls.__mro__:
        if "__init__" in vars(k):
            params = inspect.signature(k.__init__).parameters.values()
            names |= {
                q.name
                for q in params
                if q.name != "self" and q.kind in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD)
            }
    return sorted(names)


def bad_option(url: str, e: BaseException, storage_options: dict[str, Any] | None) -> PssrIOError | None:
    """A ``--storage-options`` key that the storage library refused (its ``TypeError``), named; else None."""
    m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
    if not storage_options or not isinstance(e, TypeError) or m is None or m.group(1) not in storage_options:
        return None
    scheme = split_url(url)[0]
    names = ", ".join(fs_option_names(scheme))
    return PssrIOError(
        f"--storage-options key {m.group(1)!r} is not an option of the {scheme}:// filesystem (fsspec "
        f"refused it reading {url!r}); remove or correct it. Its options: {names}."
    )


def explain(url: str, e: BaseException, what: str = "read") -> PssrIOError:
    """One line naming ``url``, the HTTP status and the likely fix for a failed request."""
    text = f"{e}"
    status, code = _status(text)
    if status is None and isinstance(e, FileNotFoundError | KeyError):
        status = 404
    status = status or getattr(e, "status", None)
    why = _WHY.get(code, "")
    if not why:
        why = {
            403: "access denied",
            401: "not authenticated",
            404: "not found",
            400: "bad request",
        }.get(status or 0, "")
    if not why and status and status >= 500:
        why = "the server failed"
    if not why:
        why = type(e).__name__ + (": " + text.splitlines()[0][:200] if text else "")
    fix = {
        403: "check the credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID or --storage-options) and the bucket "
        "policy",
        401: "give credentials (AWS_PROFILE / AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS or "
        "--storage-options)",
        404: "check the URL (and AWS_ENDPOINT_URL / --storage-options endpoint_url for a non-AWS server)",
    }.get(status or 0, "check the URL, the network and the credentials, then run the same command again")
    st = f"HTTP {status}{' ' + code if code else ''}: " if status else ""
    return PssrIOError(f"cannot {what} {url!r}: {st}{why}; {fix}.")


_ACCESS = {"PermissionDeniedError": 403, "UnauthenticatedError": 401, "NotFoundError": 404}


def access_failure(e: BaseException) -> BaseException | None:
    """The obstore permission / authentication / not-found error in ``e``'s chain (causes), else None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if type(cur).__module__.startswith("obstore") and type(cur).__name__ in _ACCESS:
            return cur
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return None


@contextlib.contextmanager
def explained(*urls: str | None, what: str = "read or write") -> Iterator[None]:
    """Turn an obstore 403/401/404 escaping the block into one :func:`explain` line naming a URL.

    Of ``urls`` (a run's object-store output and input), the one whose key the error names, else
    the first.  Anything else passes unchanged.
    """
    try:
        yield
    except PssrError:  # pssr's own message already
        raise
    except Exception as e:
        found = access_failure(e)
        named = [u for u in urls if isinstance(u, str) and is_url(u)]
        if found is None or not named:
            raise
        text = str(found)
        url = next((u for u in named if split_url(u)[2] and split_url(u)[2] in text), named[0])
        if _status(text)[0] is None:
            found = _HTTPStatus(_ACCESS[type(found).__name__])
        raise explain(url, found, what) from None


def probe(url: str, storage_options: dict[str, Any] | None = None) -> PssrIOError | None:
    """After a not-found: the bucket (or server) is missing or refuses us (one line), else None."""
    scheme, bucket, key = split_url(url)
    try:
        if scheme in ("s3", "gs") and storage_options is None:
            import obstore

            st = _obstore(f"{scheme}://{bucket}", read_only=True)
            retry(lambda: obstore.list(st, prefix=key or None, chunk_size=1).collect(), url)
        elif scheme in ("http", "https"):
            import urllib.error
            import urllib.request

            try:
                req = urllib.request.Request(url.rstrip("/") + "/", method="HEAD")
                urllib.request.urlopen(req, timeout=30)
            except urllib.error.HTTPError as e:
                if e.code in (401, 403) or e.code >= 500:
                    return PssrIOError(str(explain(url, _HTTPStatus(e.code), "read"))[:-1] + ".")
    except Exception as e:
        return explain(url, e)
    return None


class _HTTPStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


def content_stamp(url: str, keys: Iterable[str], storage_options: dict[str, Any] | None = None) -> str:
    """What identifies a remote input for resuming: the ETag / size / date of its first metadata object."""
    scheme, _, _ = split_url(url)
    for key in keys:
        try:
            if scheme in ("s3", "gs") and storage_options is None:
                import obstore

                meta = retry(lambda k=key: obstore.head(_obstore(url, read_only=True), k), url)
                return f"{key}:{meta['size']}:{meta.get('e_tag') or meta['last_modified'].isoformat()}"
            import fsspec

            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
            info = retry(lambda k=key, fs=fs, root=root: fs.info(f"{root.rstrip('/')}/{k}"), url)
            tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
            return f"{key}:{info.get('size')}:{tag}"
        except Exception:
            continue
    return ""


# ------------------------------------------------------------------------------- writing
def object_store(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """An obstore store rooted at an ``s3://`` / ``gs://`` URL, for writing outputs.

    Credentials: the environment/profile chain, or fsspec-style ``storage_options`` (``key``,
    ``secret``, ``token``, ``endpoint_url``, ``client_kwargs.region_name``) mapped onto obstore's.
    """
    scheme, bucket, key = split_url(url)
    if scheme not in ("s3", "gs"):
        raise PssrIOError(
            f"output {url!r}: {scheme}:// is read-only here; write outputs to a local path, s3:// or gs://."
        )
    if not storage_options:
        return _obstore(url, read_only=False)
    from datetime import timedelta

    require("obstore", f"writing {url!r}")
    from obstore.store import GCSStore, S3Store

    o = dict(_check_client_kwargs(storage_options))
    used = {"gs": ("token",), "s3": ("key", "secret", "token", "endpoint_url", "anon", "client_kwargs")}[
        scheme
    ]
    unknown = sorted(k for k in o if k not in used and k not in fs_option_names(scheme))
    if unknown:
        raise PssrIOError(
            f"--storage-options key {unknown[0]!r} is not an option of the {scheme}:// filesystem; remove or "
            f"correct it. Writing {url!r} uses {', '.join(used)}."
        )
    if ignored := sorted(k for k in o if k not in used):
        logger.warning("--storage-options %s: not used when writing %s (only %s are)", ignored, url, used)
    rc = {"max_retries": 0, "retry_timeout": timedelta(seconds=60)}
    client: dict[str, Any] = {"timeout": timedelta(seconds=120)}
    if scheme == "gs":
        kw = {"service_account_path": o["token"]} if isinstance(o.get("token"), str) else {}
        return GCSStore(bucket, prefix=key or None, client_options=client, retry_config=rc, **kw)
    kw: dict[str, Any] = {}
    endpoint = o.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        kw["endpoint"] = endpoint
        client["allow_http"] = endpoint.startswith("http://")
    region = (o.get("client_kwargs") or {}).get("region_name") or os.environ.get("AWS_REGION")
    if region:
        kw["region"] = region
    for src, dst in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token")):
        if o.get(src):
            kw[dst] = o[src]
    if o.get("anon"):
        kw["skip_signature"] = True
    return S3Store(bucket, prefix=key or None, client_options=client, retry_config=rc, **kw)


_OPTIONS: dict[str, dict[str, Any] | None] = {}
_WRITE_STORES: dict[tuple[str, ...], Any] = {}
_WRITE_LOCK = threading.Lock()


def set_storage_options(url: str, storage_options: dict[str, Any] | None) -> None:
    """Remember the credentials of an output URL in this process (never in a job, never logged).

    The engine opens an output by its URL alone (a job holds no secrets); a run and each dask
    worker register the ``--storage-options`` that came beside the job here first.
    """
    url = url.rstrip("/")
    with _WRITE_LOCK:
        if _OPTIONS.get(url) != storage_options:
            _OPTIONS[url] = storage_options
            for k in [k for k in _WRITE_STORES if k[1] == url or k[1].startswith(url + "/")]:
                del _WRITE_STORES[k]


def _options_for(url: str) -> dict[str, Any] | None:
    best = None
    for k in _OPTIONS:
        if (url == k or url.startswith(k + "/")) and (best is None or len(k) > len(best)):
            best = k
    return _OPTIONS[best] if best is not None else None


def writable_store(url: str) -> Any:
    """A zarr store (retried, counted) at an ``s3://`` / ``gs://`` URL that can be written, cached per URL.

    obstore underneath (one request per chunk, no HEAD before a GET); credentials from the
    environment/profile chain or the ``storage_options`` registered for the URL or a folder above.
    """
    import zarr.storage

    key = ("zarr", *_cache_key(url))
    with _WRITE_LOCK:
        st = _WRITE_STORES.get(key)
        if st is None:
            inner = raw_store(url)
            st = _WRITE_STORES[key] = RetryingStore(zarr.storage.ObjectStore(inner, read_only=False))
        return st


def _cache_key(url: str) -> tuple[str, ...]:
    env = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION")
    return (url.rstrip("/"), *(os.environ.get(k, "") for k in env), str(id(_options_for(url.rstrip("/")))))


def raw_store(url: str) -> Any:
    """The obstore store (for conditional puts, lists, deletes) at a URL, with its registered credentials."""
    key = ("raw", *_cache_key(url))
    st = _WRITE_STORES.get(key)
    if st is None:
        st = _WRITE_STORES[key] = object_store(url.rstrip("/"), _options_for(url.rstrip("/")))
    return st


def put_create(store: Any, key: str, data: bytes) -> dict[str, Any] | None:
    """Write ``key`` only if it does not exist (``If-None-Match: *``); its put result, or None if it did."""
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    try:
        return retry(lambda: obstore.put(store, key, data, mode="create"), key)
    except (AlreadyExistsError, PreconditionError):
        return None


def head(store: Any, key: str) -> dict[str, Any] | None:
    """The object's metadata (``size``, ``e_tag``, ...), or None when there is none."""
    import obstore

    try:
        return retry(lambda: obstore.head(store, key), key)
    except FileNotFoundError:
        return None


class Lease:
    """One writer per output on object storage, where there is no file lock and no rename.

    The lease is the object ``.pssr-lease`` under the output: created with ``If-None-Match: *``
    (only one writer can), holding its owner (host, pid, process start) and an expiry; renewed
    every ``ttl / 3`` seconds with ``If-Match`` on its ETag, so a writer that lost it learns so.  A
    lease past its expiry, or held by a process of this host that is no longer running, is taken
    over with ``If-Match`` on the stale ETag (of two writers racing for it, one wins).
    """

    KEY = ".pssr-lease"

    def __init__(
        self, store: Any, url: str, ttl: float = 60.0, *, key: str | None = None, extra: dict | None = None
    ) -> None:
        self.store, self.url, self.ttl = store, url, ttl
        self.key = key or self.KEY
        self.extra = dict(extra or {})
        self.etag: str | None = None
        self.lost = False
        self._confirm_lock = threading.Lock()
        self.expires = 0.0  # the expiry in the last lease object this writer put (its ownership ends then)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        import socket

        pid = os.getpid()
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": pid,
                "start": _proc_start(pid),
                "taken": self.extra.get("taken", time.time()),
                "expires": time.time() + self.ttl,
                **{k: v for k, v in self.extra.items() if k != "taken"},
            }
        ).encode()

    def _stale(self, info: dict[str, Any]) -> bool:
        import socket

        if not isinstance(info, dict) or float(info.get("expires", 0)) < time.time():
            return True
        if info.get("host") != socket.gethostname():
            return False
        pid = info.get("pid")
        return not isinstance(pid, int) or _proc_start(pid) != info.get("start")

    def acquire(self, wait: float = 0.0) -> Lease:
        """Take the lease or raise :class:`~pssr.errors.LockedError` naming its holder.

        ``wait``: seconds to keep trying while another writer holds it (a run that holds it only
        to claim a region or to finish an output lets go within seconds).
        """
        from pssr.errors import LockedError

        deadline = time.monotonic() + wait
        while True:
            try:
                return self._acquire()
            except LockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(random.uniform(0.2, 1.0))

    def _acquire(self) -> Lease:
        import obstore
        from obstore.exceptions import PreconditionError

        from pssr.errors import LockedError

        self._stop.clear()  # taken again after a release (a mutex held only for moments)
        self.lost, self.etag = False, None

        for _ in range(3):
            t0 = time.time()
            res = put_create(self.store, self.key, self._body())
            if res is not None:
                self.etag, self.expires = res.get("e_tag"), t0 + self.ttl
                break
            try:
                got = retry(lambda: obstore.get(self.store, self.key), self.key)
            except FileNotFoundError:
                continue  # released in between: try again
            try:
                info = json.loads(bytes(got.bytes()))
            except ValueError:
                info = {}
            if not self._stale(info):
                raise LockedError(
                    f"output {self.url!r} is being written by another run ({info.get('host')}, pid "
                    f"{info.get('pid')}; its lease {self.url}/{self.key} expires in "
                    f"{float(info.get('expires', 0)) - time.time():.0f} s); wait for it, or rerun after it "
                    "ends."
                )
            try:
                etag, t0 = got.meta["e_tag"], time.time()
                res = retry(
                    lambda etag=etag: obstore.put(self.store, self.key, self._body(), mode={"e_tag": etag}),
                    self.key,
                )
                why = (
                    "expired"
                    if not isinstance(info, dict) or float(info.get("expires", 0)) < time.time()
                    else "left by a process that no longer runs on this host"
                )
                logger.warning("took over the lease of %s, %s (was %s)", self.url, why, info)
                self.etag, self.expires = res.get("e_tag"), t0 + self.ttl
                break
            except PreconditionError:
                continue  # another writer took it first: look again
        else:
            raise LockedError(
                f"output {self.url!r}: could not take its lease {self.key}; run the command again."
            )
        self._thread = threading.Thread(target=self._renew, daemon=True, name="pssr-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if self.lost:
                return
            try:
                self.confirm()
            except Exception as e:  # lost (logged by confirm), or a network failure: retried until expiry
                if self.lost:
                    return
                logger.warning("could not renew the lease of %s: %s", self.url, type(e).__name__)

    def confirm(self) -> None:
        """Renew the lease now, conditionally on its ETag: on return this writer owns it for ``ttl`` s.

        Raises :class:`~pssr.errors.LockedError` when another writer took it (this writer must stop),
        or the network error when ownership could not be confirmed.
        """
        import obstore
        from obstore.exceptions import PreconditionError

        from pssr.errors import LockedError

        with self._confirm_lock:
            if self.lost:
                self.check()
            etag, t0 = self.etag, time.time()
            try:
                res = retry(
                    lambda: obstore.put(self.store, self.key, self._body(), mode={"e_tag": etag}), self.key
                )
            except (PreconditionError, FileNotFoundError):
                self.lost = True
                logger.error("lost the lease of %s to another writer; this run stops writing", self.url)
                raise LockedError(
                    f"output {self.url!r}: another run took over its lease; this run stops."
                ) from None
            self.etag, self.expires = res.get("e_tag"), t0 + self.ttl

    def check(self) -> None:
        """Raise unless this writer still owns the lease (taken over, or past its expiry unrenewed).

        A writer stalled past its lease's expiry (stopped, swapped out, cut off from the store) may
        have been taken over without knowing: it counts as lost until :meth:`confirm` succeeds.
        """
        from pssr.errors import LockedError

        if self.lost:
            raise LockedError(f"output {self.url!r}: another run took over its lease; this run stops.")
        if self.etag is not None and time.time() >= self.expires:
            raise LockedError(
                f"output {self.url!r}: this run's lease expired {time.time() - self.expires:.0f} s ago "
                "without renewal (the run stalled or lost the store), so another run may own the output; "
                "this run stops. Run the command again to resume."
            )

    def release(self) -> None:
        """Stop renewing and delete the lease."""
        import obstore

        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.etag is not None and not self.lost and time.time() < self.expires:  # else maybe not ours
            try:
                retry(lambda: obstore.delete(self.store, self.key), self.key)
            except Exception:  # it expires by itself
                pass

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim_conflict(
    region: list[list[int]], info: dict[str, Any], *, full_output: bool, overwrite: bool, describe
) -> str | None:
    """Why a live region claim ``info`` forbids claiming ``region``, or None if both may write at once.

    One rule for region claims on local disk (:mod:`pssr.blockwise.integrity`) and object storage:
    one writer per block, and only ``--full-output`` runs over disjoint regions share an output.
    """
    overlap = all(a[0] < b[1] and b[0] < a[1] for a, b in zip(region, info["region"], strict=False))
    if overlap:
        return (
            f"its region {describe(info['region'])} overlaps this one ({describe(region)}): one writer "
            "per block"
        )
    if not (info.get("full_output") and full_output and not overwrite):
        return (
            "only runs with --full-output over regions that do not overlap may share an output, and "
            "never with --overwrite"
        )
    return None


class Claims:
    """One writer per block on object storage: the regions that live runs write in one output.

    The object-store counterpart of :class:`pssr.blockwise.integrity.RegionClaims`: each run
    claims its region with a lease object ``.pssr-regions/<random>.json`` (region, owner, expiry;
    renewed while the run lives, so a killed run's claim expires by itself), made and checked while
    the run holds the output's :class:`Lease` for that moment only.
    """

    PREFIX = ".pssr-regions/"

    def __init__(self, store: Any, url: str, ttl: float = 60.0) -> None:
        self.store, self.url, self.ttl = store, url, ttl

    def live(self) -> list[tuple[Lease, dict[str, Any]]]:
        """Claims of live runs (stale ones deleted); call with the output's lease held."""
        import obstore

        keys = retry(
            lambda: [m["path"] for b in obstore.list(self.store, prefix=self.PREFIX[:-1]) for m in b],
            self.url,
        )
        res = []
        for key in keys:
            probe = Lease(self.store, self.url, self.ttl, key=key)
            try:
                info = json.loads(bytes(retry(lambda k=key: obstore.get(self.store, k).bytes(), key)))
            except FileNotFoundError:
                continue
            except ValueError:
                info = {}
            if not isinstance(info, dict) or probe._stale(info) or not info.get("region"):
                logger.warning(
                    "dropped the stale region claim %s/%s (its run is no longer running)", self.url, key
                )
                retry(lambda k=key: obstore.delete(self.store, k), key)
                continue
            res.append((probe, info))
        return res

    def claim(self, region: list[list[int]], *, full_output: bool, overwrite: bool, describe) -> Lease:
        """Claim ``region`` or raise :class:`~pssr.errors.LockedError`; call with the output's lease held."""
        import uuid

        from pssr.errors import LockedError

        for _, info in self.live():
            why = claim_conflict(
                region, info, full_output=full_output, overwrite=overwrite, describe=describe
            )
            if why:
                raise LockedError(
                    f"output {self.url!r} is being written by another pssr run (pid {info.get('pid')} on "
                    f"host {info.get('host')!r}); {why}. Wait for it to finish, or choose another region "
                    f"(a dead run's claim expires {self.ttl:.0f} s after it stopped)."
                )
        extra = {"region": [list(map(int, r)) for r in region], "full_output": full_output}
        lease = Lease(
            self.store, self.url, self.ttl, key=f"{self.PREFIX}{uuid.uuid4().hex}.json", extra=extra
        )
        return lease.acquire()

    def release(self, claim: Lease | None) -> None:
        """Drop a claim."""
        if claim is not None:
            claim.release()


def _proc_start(pid: int) -> float | None:
    try:
        import psutil

        return round(psutil.Process(pid).create_time(), 2)
    except Exception:
        return None
