"""The S3 result store: one object per generated image, written idempotently per (job, image index).

Why it looks the way it does:

- Keys are derived from the job's *creation* date (UTC), never "now", so a retried or recovered
  job writes to the same key and the billing audit can find the object from the ledger row.
- ``put_image`` never overwrites: it HEADs first, and PUTs with ``If-None-Match: *`` so two
  replicas racing on one key cannot both win. Same bytes under the key = success (no second
  upload, no second bill); different bytes = :class:`StorageIntegrityError`.
- Every PUT carries ``x-amz-checksum-sha256``: the server recomputes it and refuses a body that
  changed on the way (SeaweedFS, AWS and MinIO all check it). The hex sha256 also goes into user
  metadata, where the audit and the idempotency check read it back with a plain HEAD.
- tenacity owns retries (botocore's are off, so attempts are counted once): connection errors,
  timeouts, 5xx, 408/429 and throttling codes are retried with exponential backoff and jitter;
  anything else (403, SignatureDoesNotMatch, NoSuchBucket...) fails at once because retrying
  cannot fix it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from zimage_platform.errors import PlatformError
from zimage_platform.telemetry.metrics import metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

PNG_CONTENT_TYPE = "image/png"
#: SigV4 presigned URLs are valid for at most 7 days.
MAX_PRESIGN_TTL_S = 7 * 24 * 3600
#: Error codes S3-compatible servers use for "slow down", whatever HTTP status they come with.
THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout", "ServiceUnavailable"}
)
#: botocore errors raised before anything is sent: a retry would fail the same way.
_CLIENT_SIDE_ERRORS = (NoCredentialsError, PartialCredentialsError, ParamValidationError)
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageError(PlatformError):
    """The object store could not be reached or refused us; the job can be retried later."""

    code = "storage_unavailable"
    status = 503

    def __init__(self, message: str, *, attempts: int = 0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        #: How many times the failing operation was tried (1 = no retry).
        self.attempts = attempts


class StorageIntegrityError(PlatformError):
    """An idempotent key already holds different bytes: never overwrite a billed result.

    Not a :class:`StorageError`: retrying cannot fix it, a person has to look.
    """

    code = "storage_integrity"
    status = 500


class ObjectNotFound(PlatformError):
    """The key does not exist (a read of something never written, or deleted)."""

    code = "storage_not_found"
    status = 404


@dataclass(frozen=True)
class StoredObject:
    key: str
    #: Hex sha256 of the bytes; None for an object written by someone else without one.
    sha256: str | None
    size: int
    etag: str | None
    metadata: dict[str, str]
    #: The server's own SHA-256 of the stored bytes (computed at upload; None if the store keeps none).
    #: Unlike ``sha256`` from metadata, a later overwrite cannot keep it while changing the bytes.
    checksum_sha256: str | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can fix: network trouble, timeouts, 5xx, 408/429 and throttling."""
    if isinstance(exc, ClientError):
        status = _status(exc)
        return status >= 500 or status in (408, 429) or _error_code(exc) in THROTTLING_CODES
    # BotoCoreError without a response: connection refused/reset, DNS, connect/read timeouts,
    # a body stream cut off mid-read.
    return isinstance(exc, BotoCoreError) and not isinstance(exc, _CLIENT_SIDE_ERRORS)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"{error.get('Code', '?')} (HTTP {_status(exc)}): {error.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def _normalize_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Lower-case keys (S3 does it anyway) and refuse what cannot travel in an HTTP header."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata value for {key!r} must be str, got {type(value).__name__}")
        if not (key.isascii() and value.isascii()) or "\n" in value or "\r" in value:
            raise ValueError(f"metadata {key!r} must be single-line ASCII (it travels as an HTTP header)")
        out[key.lower()] = value
    return out


def _checksum_to_hex(checksum_b64: str | None) -> str | None:
    # Multipart uploads carry a composite "<b64>-<parts>" checksum, not the object's sha256.
    if not checksum_b64 or "-" in checksum_b64:
        return None
    return base64.b64decode(checksum_b64).hex()


class ResultStore:
    """Images, manifests and uploads in one bucket; safe to share between threads."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        presign_endpoint_url: str | None = None,
        presign_ttl_s: int = 3600,
        max_attempts: int = 5,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 30.0,
        conditional_writes: bool = True,
    ) -> None:
        """``presign_endpoint_url``: the address clients reach (an in-cluster endpoint is often not).

        ``conditional_writes``: send ``If-None-Match: *`` on image PUTs; turn off only for a store
        that rejects the header.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.bucket = bucket
        self.presign_ttl_s = self._check_ttl(presign_ttl_s)
        self.max_attempts = max_attempts
        self.conditional_writes = conditional_writes
        # A custom endpoint (SeaweedFS, MinIO, Ceph) almost always needs path-style addressing:
        # virtual-hosted names like ``bucket.minio.svc`` do not resolve inside a cluster.
        config = Config(
            signature_version="s3v4",
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        # A fresh Session per store: boto3's module-level default session is not thread-safe to create.
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self._client: BaseClient = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._presigner: BaseClient = (
            session.client("s3", endpoint_url=presign_endpoint_url, config=config)
            if presign_endpoint_url
            else self._client
        )
        self._retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(max_attempts),
            wait=wait_exponential_jitter(multiplier=backoff_s, max=max_backoff_s, jitter=backoff_s),
            before_sleep=self._log_retry,
            reraise=True,
        )

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def image_key(tenant_id: str, job_id: str, index: int, created_at: datetime) -> str:
        """``tenants/{tenant}/{yyyy}/{mm}/{dd}/{job}/{index}.png`` on the job's UTC creation date."""
        for name, value in (("tenant_id", tenant_id), ("job_id", job_id)):
            if not _SEGMENT.match(value):
                raise ValueError(f"{name} {value!r} is not a safe key segment ([A-Za-z0-9._-], no leading dot)")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be a non-negative int, got {index!r}")
        if created_at.tzinfo is None:
            # A naive time would put the key on a different day depending on the replica's zone.
            raise ValueError("created_at must be timezone-aware")
        day = created_at.astimezone(UTC)
        return f"tenants/{tenant_id}/{day:%Y/%m/%d}/{job_id}/{index}.png"

    # -- writes -----------------------------------------------------------------------------

    def put_image(self, key: str, png: bytes, metadata: dict[str, str]) -> StoredObject:
        """Store ``png`` under ``key`` once; a repeat with the same bytes returns the stored object.

        With conditional writes the PUT goes first (one round trip on the common path: the key is
        new) and the server refuses it if the key exists; without them a HEAD has to ask first.
        """
        digest = sha256_hex(png)
        if not self.conditional_writes:
            existing = self.head(key)
            if existing is not None:
                return self._same_or_raise(existing, digest)
        try:
            return self._put(key, png, PNG_CONTENT_TYPE, metadata, digest, if_none_match=self.conditional_writes)
        except ClientError as exc:
            # 412: another writer (or our own earlier attempt whose response was lost) got there first.
            existing = self.head(key)
            if existing is None:
                raise StorageError(f"S3 put_object {self.bucket}/{key}: {_describe(exc)}") from exc
            return self._same_or_raise(existing, digest)

    def put_bytes(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None
    ) -> StoredObject:
        """Store (or replace) ``data``: for manifests, exports and uploads that are not billed images."""
        return self._put(key, data, content_type, metadata or {}, sha256_hex(data), if_none_match=False)

    def put_file(self, key: str, path: Path, sha256: str, metadata: dict[str, str] | None = None) -> StoredObject:
        """Store (or replace) a local file, streamed (multipart when large): for engines of many GB.

        ``sha256`` (the caller already has it, e.g. from an engine manifest) goes into metadata,
        so :meth:`head` answers "is this exact file there?" without downloading it.
        """
        meta = {**_normalize_metadata(metadata or {}), "sha256": sha256}
        params = {"Bucket": self.bucket, "Key": key}
        extra = {"Metadata": meta, "ChecksumAlgorithm": "SHA256", "ContentType": "application/octet-stream"}
        self._retry("upload_file", params, lambda: self._client.upload_file(str(path), self.bucket, key, extra), ())
        return StoredObject(key=key, sha256=sha256, size=path.stat().st_size, etag=None, metadata=meta)

    def get_file(self, key: str, path: Path) -> None:
        """Download ``key`` to ``path`` through a ``.part`` file, so a cut-off transfer never looks complete."""
        staging = path.with_name(path.name + ".part")
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {"Bucket": self.bucket, "Key": key}
        try:
            self._retry(
                "download_file", params, lambda: self._client.download_file(**params, Filename=str(staging)), (404,)
            )
        except ClientError as exc:
            raise ObjectNotFound(f"s3://{self.bucket}/{key} does not exist", param="key") from exc
        staging.replace(path)

    def _put(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str], digest: str, *, if_none_match: bool
    ) -> StoredObject:
        meta = {**_normalize_metadata(metadata), "sha256": digest}
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "Body": data,
            "ContentType": content_type,
            "Metadata": meta,
            "ChecksumSHA256": base64.b64encode(bytes.fromhex(digest)).decode(),
        }
        if if_none_match:
            params["IfNoneMatch"] = "*"
        response = self._call("put_object", passthrough=(412,) if if_none_match else (), **params)
        # The server checked the body against ChecksumSHA256 (it refuses a mismatch): it holds this digest.
        return StoredObject(
            key=key, sha256=digest, size=len(data), etag=response.get("ETag"), metadata=meta, checksum_sha256=digest
        )

    def _same_or_raise(self, existing: StoredObject, digest: str) -> StoredObject:
        if existing.sha256 != digest:
            raise StorageIntegrityError(
                f"s3://{self.bucket}/{existing.key} already holds different bytes "
                f"(stored sha256 {existing.sha256 or 'unknown'}, new {digest}); refusing to overwrite",
                param="key",
            )
        return existing

    # -- reads ------------------------------------------------------------------------------

    def head(self, key: str) -> StoredObject | None:
        """The stored object's size, sha256 and metadata, or None if the key is free."""
        try:
            response = self._call(
                "head_object", passthrough=(404,), Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
            )
        except ClientError:  # only a 404 gets here
            return None
        metadata = dict(response.get("Metadata") or {})
        return StoredObject(
            key=key,
            sha256=metadata.get("sha256") or _checksum_to_hex(response.get("ChecksumSHA256")),
            size=int(response.get("ContentLength", 0)),
            etag=response.get("ETag"),
            metadata=metadata,
            checksum_sha256=_checksum_to_hex(response.get("ChecksumSHA256")),
        )

    def get_bytes(self, key: str) -> bytes:
        params = {"Bucket": self.bucket, "Key": key}
        try:
            # The read is inside the retried call: a body cut off mid-stream is retried too.
            return self._retry("get_object", params, lambda: self._client.get_object(**params)["Body"].read(), (404,))
        except ClientError as exc:
            raise ObjectNotFound(f"s3://{self.bucket}/{key} does not exist", param="key") from exc

    def presign_get(self, key: str, ttl_s: int | None = None) -> str:
        """A SigV4 URL anyone can GET until it expires; no network call, the server checks it."""
        ttl = self.presign_ttl_s if ttl_s is None else self._check_ttl(ttl_s)
        return self._presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=ttl
        )

    # -- bucket housekeeping ----------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (embedded default; production buckets come from infra)."""
        try:
            self._call("head_bucket", passthrough=(404,), Bucket=self.bucket)
        except ClientError:
            self._call("create_bucket", Bucket=self.bucket)

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (tests, tenant offboarding); returns how many."""
        if not prefix:
            raise ValueError("refusing to delete a whole bucket: prefix is empty")
        deleted = 0
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Bucket=self.bucket, Prefix=prefix, **token)
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                result = self._call("delete_objects", Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                if result.get("Errors"):
                    raise StorageError(f"could not delete under {prefix!r}: {result['Errors'][:3]}")
                deleted += len(keys)
            if not page.get("IsTruncated"):
                return deleted
            token = {"ContinuationToken": page["NextContinuationToken"]}

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, operation: str, *, passthrough: Collection[int] = (), **params: Any) -> dict[str, Any]:
        """Run one S3 client method with ``params`` under the retry policy."""
        method = getattr(self._client, operation)
        return self._retry(operation, params, lambda: method(**params), passthrough)

    def _retry(self, operation: str, params: dict[str, Any], fn: Callable[[], T], passthrough: Collection[int]) -> T:
        """Run ``fn`` with retries on transient failures.

        A ClientError whose HTTP status is in ``passthrough`` is re-raised for the caller to
        interpret (404 on HEAD = free key); every other failure becomes a :class:`StorageError`.
        """
        attempts = 0
        try:
            for attempt in self._retrying.copy():
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    return fn()
        except ClientError as exc:
            if _status(exc) in passthrough:
                raise
            raise self._error(operation, params, exc, attempts) from exc
        except BotoCoreError as exc:
            raise self._error(operation, params, exc, attempts) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _error(self, operation: str, params: dict[str, Any], exc: BaseException, attempts: int) -> StorageError:
        metrics().s3_errors.inc(operation=operation, transient=str(is_transient(exc)).lower())
        where = f"{params.get('Bucket', self.bucket)}/{params.get('Key') or params.get('Prefix') or ''}"
        tries = f"after {attempts} attempts" if is_transient(exc) else "(not retryable)"
        return StorageError(f"S3 {operation} {where} failed {tries}: {_describe(exc)}", attempts=attempts)

    def _log_retry(self, state: Any) -> None:
        exc = state.outcome.exception() if state.outcome else None
        metrics().s3_errors.inc(operation="retry", transient="true")
        log.warning(
            "S3 call failed (attempt %d/%d), retrying in %.2fs: %s",
            state.attempt_number,
            self.max_attempts,
            state.next_action.sleep if state.next_action else 0.0,
            _describe(exc) if exc else "?",
        )

    @staticmethod
    def _check_ttl(ttl_s: int) -> int:
        if not 1 <= ttl_s <= MAX_PRESIGN_TTL_S:
            raise ValueError(f"presign ttl must be 1..{MAX_PRESIGN_TTL_S} s, got {ttl_s}")
        return ttl_s
