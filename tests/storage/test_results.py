"""The S3 result store against a real SeaweedFS (it checks SigV4, so auth and presign tests are real)."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

from zimage_platform.storage.results import (
    ObjectNotFound,
    ResultStore,
    StorageError,
    StorageIntegrityError,
)
from zimage_platform.storage.seaweedfs import SeaweedFS, free_ports

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
CREATED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_store(s3: SeaweedFS, **kwargs: object) -> ResultStore:
    options: dict = {"access_key": s3.access_key, "secret_key": s3.secret_key, "backoff_s": 0.001, **kwargs}
    return ResultStore("results", endpoint_url=options.pop("endpoint_url", s3.endpoint_url), **options)


@pytest.fixture
def store(s3: SeaweedFS) -> ResultStore:
    return make_store(s3)


@pytest.fixture
def tenant() -> str:
    """A tenant id per test, so keys never collide between tests."""
    return f"t-{uuid.uuid4().hex[:12]}"


def count_sends(store: ResultStore, operation: str) -> list[str]:
    """Record every HTTP request the store's client sends for ``operation`` (retries included)."""
    sent: list[str] = []
    store._client.meta.events.register(f"before-send.s3.{operation}", lambda request, **_: sent.append(request.url))
    return sent


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- keys ---------------------------------------------------------------------------------------


def test_image_key_uses_the_utc_creation_date() -> None:
    # 01:30 in UTC+2 is still the previous day in UTC: the key follows UTC, not the replica's zone.
    created = datetime(2025, 3, 1, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    assert ResultStore.image_key("acme", "job-1", 3, created) == "tenants/acme/2025/02/28/job-1/3.png"
    assert ResultStore.image_key("acme", "job-1", 0, CREATED) == "tenants/acme/2025/03/01/job-1/0.png"


@pytest.mark.parametrize(
    ("tenant_id", "job_id", "index", "created"),
    [
        ("acme", "job", 0, datetime(2025, 3, 1)),  # naive: the day would depend on the host
        ("../acme", "job", 0, CREATED),
        ("acme", "a/b", 0, CREATED),
        ("", "job", 0, CREATED),
        ("acme", "job", -1, CREATED),
    ],
)
def test_image_key_refuses_unsafe_parts(tenant_id: str, job_id: str, index: int, created: datetime) -> None:
    with pytest.raises(ValueError):
        ResultStore.image_key(tenant_id, job_id, index, created)


# -- writes and reads ---------------------------------------------------------------------------


def test_put_head_get_round_trip(store: ResultStore, s3: SeaweedFS, tenant: str) -> None:
    key = store.image_key(tenant, "job-1", 0, CREATED)
    stored = store.put_image(key, PNG, {"job-id": "job-1", "Seed": "42", "trace-id": "abc123"})

    digest = hashlib.sha256(PNG).hexdigest()
    assert stored.sha256 == digest and stored.size == len(PNG) and stored.etag
    # Keys come back lower-cased from S3; the store normalises them up front so both sides agree.
    assert stored.metadata == {"job-id": "job-1", "seed": "42", "trace-id": "abc123", "sha256": digest}
    assert store.head(key) == stored
    assert store.get_bytes(key) == PNG

    raw = s3.client().head_object(Bucket="results", Key=key, ChecksumMode="ENABLED")
    assert raw["ContentType"] == "image/png"
    # The server kept (and checked) the sha256 checksum we sent with the body.
    assert raw["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(PNG).digest()).decode()


def test_head_and_get_of_a_missing_key(store: ResultStore, tenant: str) -> None:
    assert store.head(f"tenants/{tenant}/nothing.png") is None
    with pytest.raises(ObjectNotFound) as info:
        store.get_bytes(f"tenants/{tenant}/nothing.png")
    assert info.value.code == "storage_not_found" and info.value.status == 404


def test_repeat_put_with_same_bytes_does_not_overwrite(store: ResultStore, tenant: str) -> None:
    """The common path is one conditional PUT (no HEAD first); a repeat is refused by the server
    (412) and answered with the stored object. Without conditional writes a HEAD asks first."""
    key = store.image_key(tenant, "job-1", 0, CREATED)
    heads = count_sends(store, "HeadObject")
    first = store.put_image(key, PNG, {"trace-id": "first"})
    assert heads == []  # the first write costs one round trip
    again = store.put_image(key, PNG, {"trace-id": "retry"})
    # The first writer's metadata stays: the stored object is what was billed.
    assert again == first and again.metadata["trace-id"] == "first"
    assert store.head(key).metadata["trace-id"] == "first"
    store.conditional_writes = False
    puts = count_sends(store, "PutObject")
    assert store.put_image(key, PNG, {"trace-id": "third"}) == first and puts == []


def test_repeat_put_with_different_bytes_is_an_integrity_error(store: ResultStore, tenant: str) -> None:
    key = store.image_key(tenant, "job-1", 0, CREATED)
    store.put_image(key, PNG, {})
    with pytest.raises(StorageIntegrityError) as info:
        store.put_image(key, PNG + b"x", {})
    assert info.value.code == "storage_integrity"
    assert store.get_bytes(key) == PNG


@pytest.mark.parametrize("same_bytes", [True, False])
def test_a_writer_racing_between_head_and_put(s3: SeaweedFS, tenant: str, same_bytes: bool) -> None:
    """Another replica writes the key after our HEAD: If-None-Match makes our PUT fail, never overwrite."""
    ours, theirs = make_store(s3), make_store(s3)
    key = ours.image_key(tenant, "job-1", 0, CREATED)
    their_bytes = PNG if same_bytes else PNG + b"other"

    def other_replica_writes_first(**_: object) -> None:
        if theirs.head(key) is None:
            theirs.put_image(key, their_bytes, {"writer": "theirs"})

    ours._client.meta.events.register("before-send.s3.PutObject", other_replica_writes_first)
    if same_bytes:
        assert ours.put_image(key, PNG, {"writer": "ours"}).metadata["writer"] == "theirs"
    else:
        with pytest.raises(StorageIntegrityError):
            ours.put_image(key, PNG, {"writer": "ours"})
    assert ours.get_bytes(key) == their_bytes


def test_put_bytes_replaces_and_keeps_content_type(store: ResultStore, s3: SeaweedFS, tenant: str) -> None:
    key = f"tenants/{tenant}/manifests/batch.json"
    store.put_bytes(key, b'{"v": 1}', "application/json", {"Kind": "manifest"})
    stored = store.put_bytes(key, b'{"v": 2}', "application/json")
    assert store.get_bytes(key) == b'{"v": 2}'
    assert stored.sha256 == hashlib.sha256(b'{"v": 2}').hexdigest() == store.head(key).sha256
    assert s3.client().head_object(Bucket="results", Key=key)["ContentType"] == "application/json"


def test_metadata_must_be_header_safe(store: ResultStore) -> None:
    sends = count_sends(store, "PutObject")
    with pytest.raises(ValueError, match="ASCII"):
        store.put_bytes("x", b"1", "text/plain", {"prompt": "un café"})
    with pytest.raises(ValueError):
        store.put_bytes("x", b"1", "text/plain", {"note": "two\nlines"})
    assert sends == []


def test_ensure_bucket_and_delete_prefix(s3: SeaweedFS) -> None:
    store = ResultStore(
        f"fresh-{uuid.uuid4().hex[:8]}",
        endpoint_url=s3.endpoint_url,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
    )
    store.ensure_bucket()
    store.ensure_bucket()  # already there: no error
    for i in range(3):
        store.put_bytes(f"p/{i}", b"x", "text/plain")
    store.put_bytes("keep/0", b"x", "text/plain")
    assert store.delete_prefix("p/") == 3
    assert store.head("p/0") is None and store.head("keep/0") is not None
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_credentials_from_the_environment(s3: SeaweedFS, monkeypatch: pytest.MonkeyPatch, tenant: str) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    store = ResultStore("results", endpoint_url=s3.endpoint_url)
    store.put_bytes(f"tenants/{tenant}/env", b"ok", "text/plain")
    assert store.get_bytes(f"tenants/{tenant}/env") == b"ok"


# -- presigned URLs -----------------------------------------------------------------------------


@pytest.fixture
def stored_key(store: ResultStore, tenant: str) -> str:
    key = store.image_key(tenant, "job-1", 0, CREATED)
    store.put_image(key, PNG, {})
    store.put_image(store.image_key(tenant, "job-1", 1, CREATED), b"another image", {})
    return key


def test_presigned_url_downloads(store: ResultStore, stored_key: str) -> None:
    url = store.presign_get(stored_key)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url
    response = httpx.get(url)
    assert response.status_code == 200 and response.content == PNG


def test_presigned_url_for_a_public_endpoint(s3: SeaweedFS, stored_key: str) -> None:
    """Clients may reach the store under another name than the platform does; SigV4 signs the host."""
    public = f"http://localhost:{s3.s3_port}"
    url = make_store(s3, presign_endpoint_url=public).presign_get(stored_key)
    assert url.startswith(public + "/results/")
    assert httpx.get(url).content == PNG
    # The same signature under the internal name is refused: the host is part of what was signed.
    assert httpx.get(url.replace(public, s3.endpoint_url)).status_code == 403


def _flip_signature(url: str) -> str:
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    return with_query(url, **{"X-Amz-Signature": ("0" if signature[0] != "0" else "1") + signature[1:]})


def _extend_expiry(url: str) -> str:
    return with_query(url, **{"X-Amz-Expires": "604800"})


def _other_key(url: str) -> str:
    return url.replace("/0.png?", "/1.png?")


@pytest.mark.parametrize("tamper", [_flip_signature, _extend_expiry, _other_key])
def test_tampered_presigned_url_is_refused(store: ResultStore, stored_key: str, tamper: Callable[[str], str]) -> None:
    url = store.presign_get(stored_key, ttl_s=60)
    tampered = tamper(url)
    assert tampered != url
    response = httpx.get(tampered)
    assert response.status_code == 403, response.text
    assert "SignatureDoesNotMatch" in response.text


def test_expired_presigned_url_is_refused(store: ResultStore, stored_key: str) -> None:
    url = store.presign_get(stored_key, ttl_s=1)
    time.sleep(2.1)
    response = httpx.get(url)
    assert response.status_code == 403 and "expired" in response.text


def test_presign_ttl_bounds(store: ResultStore) -> None:
    for ttl in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError):
            store.presign_get("k", ttl_s=ttl)


# -- failures and retries -----------------------------------------------------------------------


def test_unreachable_store_is_retried_then_unavailable() -> None:
    (port,) = free_ports(1)  # nothing listens there
    store = ResultStore(
        "results",
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key="a",
        secret_key="b",
        max_attempts=4,
        backoff_s=0.001,
        connect_timeout_s=0.5,
    )
    sends = count_sends(store, "PutObject")
    with pytest.raises(StorageError) as info:
        store.put_bytes("k", b"data", "text/plain")
    assert info.value.code == "storage_unavailable" and info.value.status == 503
    assert info.value.attempts == 4 and len(sends) == 4
    assert "after 4 attempts" in info.value.message


def test_wrong_credentials_fail_at_once(s3: SeaweedFS, tenant: str) -> None:
    store = make_store(s3, secret_key="not-the-secret", max_attempts=5, backoff_s=1.0)
    sends = count_sends(store, "PutObject")
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.put_bytes(f"tenants/{tenant}/k", b"data", "text/plain")
    assert time.monotonic() - started < 1.0  # one backoff would already take 1 s
    assert info.value.attempts == 1 and len(sends) == 1
    assert "SignatureDoesNotMatch" in info.value.message and "not retryable" in info.value.message


class FlakyS3:
    """A stand-in S3 endpoint that answers a scripted list of statuses and counts the requests."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once

            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(self.path)
                status = outer.statuses[min(len(outer.requests), len(outer.statuses)) - 1]
                body = b"" if status == 200 else b"<Error><Code>SlowDown</Code><Message>busy</Message></Error>"
                self.send_response(status)
                self.send_header("ETag", '"abc"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def store(self, max_attempts: int) -> ResultStore:
        return ResultStore(
            "results", endpoint_url=self.url, access_key="a", secret_key="b", max_attempts=max_attempts, backoff_s=0.001
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def flaky() -> Iterator[Callable[[list[int]], FlakyS3]]:
    servers: list[FlakyS3] = []

    def start(statuses: list[int]) -> FlakyS3:
        servers.append(FlakyS3(statuses))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_server_errors_are_retried_until_success(flaky: Callable[[list[int]], FlakyS3]) -> None:
    server = flaky([503, 500, 200])
    stored = server.store(max_attempts=5).put_bytes("k", b"data", "text/plain")
    assert stored.etag == '"abc"'
    assert server.requests == ["/results/k"] * 3


def test_throttling_exhausts_the_attempts(flaky: Callable[[list[int]], FlakyS3]) -> None:
    """Exactly ``max_attempts`` requests reach the server: botocore's own retries are off."""
    server = flaky([503])
    with pytest.raises(StorageError) as info:
        server.store(max_attempts=3).put_bytes("k", b"data", "text/plain")
    assert len(server.requests) == 3 and info.value.attempts == 3
    assert "SlowDown" in info.value.message
