"""Publish verified engines to S3, and pull them onto serving nodes.

Why: compiled engines (TensorRT plans) are built once, on a GPU, by the chart's engine-build
Job, then served by many replicas on many nodes. S3 carries them between the two. The layout
mirrors the local build folder, ``s3://bucket/prefix/<variant>/<backend>-<precision>/``, with
the engine's ``manifest.json`` beside its files.

- Only a verified engine is published (every bucket it was built for passed ``verify``).
- The manifest is uploaded last, so a reader that finds it finds every file it names; a file
  already stored with the same sha256 is not uploaded again (re-running the Job is cheap).
- A pull downloads into a staging folder, checks every file against the manifest's hashes,
  then swaps the folder in whole (as a build does): a cut-off pull never looks like an engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from zimage_platform.engines.engine import engine_folder, is_compiled
from zimage_platform.engines.folders import link_or_copy, staged_folder
from zimage_platform.engines.manifest import MANIFEST_NAME, EngineManifest, check_manifest, read_manifest, sha256_file
from zimage_platform.errors import EngineError, InvalidRequest
from zimage_platform.storage.results import ObjectNotFound, ResultStore

if TYPE_CHECKING:
    from zimage_platform.config import PlatformConfig

#: (variant, backend, precision): one compiled engine the pools serve.
Target = tuple[str, str, str]


def engine_targets(config: PlatformConfig, pools: Iterable[str] | None = None) -> list[Target]:
    """Every compiled engine ``pools`` (default: all) serve, once each; none for the torch backend."""
    backend = config.engine.backend
    if not is_compiled(backend):
        return []
    targets: list[Target] = []
    for pool in pools or config.pools:
        if pool not in config.pools:
            raise InvalidRequest(
                f"unknown pool {pool!r}", code="unknown_pool", param="pool", choices=list(config.pools)
            )
        for variant in config.pool_variants(pool):
            target = (variant, backend, config.precision_in(pool, variant))
            if target not in targets:
                targets.append(target)
    return targets


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise InvalidRequest(f"not an s3://bucket/prefix URI: {uri!r}", code="invalid_s3_uri", param="uri")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _store(config: PlatformConfig, bucket: str) -> ResultStore:
    """The model store's endpoint and region; credentials from the standard AWS environment."""
    return ResultStore(bucket, endpoint_url=config.model_store.endpoint_url, region=config.model_store.region)


def _key(prefix: str, target: Target, name: str) -> str:
    variant, backend, precision = target
    return f"{prefix}{variant}/{backend}-{precision}/{name}"


def publish_engine(config: PlatformConfig, target: Target, uri: str) -> list[str]:
    """Upload a verified engine and its manifest; returns the keys actually written."""
    variant, backend, precision = target
    folder = engine_folder(config, variant, backend, precision)
    manifest = read_manifest(folder)
    if manifest is None:
        raise EngineError(f"no engine built in {folder}", code="engine_not_built")
    verified = {v.bucket for v in manifest.verification if v.passed}
    unverified = sorted(set(manifest.buckets) - verified)
    if unverified:
        raise EngineError(
            f"{folder} is not verified for buckets {unverified}; run `engines verify` first",
            code="engine_unverified",
        )
    check_manifest(folder, manifest, checkpoint_fingerprint=manifest.checkpoint_fingerprint, buckets=manifest.buckets)
    bucket, prefix = split_s3_uri(uri)
    store = _store(config, bucket)
    written: list[str] = []
    for name, digest in sorted(manifest.files.items()):
        key = _key(prefix, target, name)
        stored = store.head(key)
        if stored is None or stored.sha256 != digest:
            store.put_file(key, folder / name, digest)
            written.append(key)
    key = _key(prefix, target, MANIFEST_NAME)
    store.put_file(key, folder / MANIFEST_NAME, sha256_file(folder / MANIFEST_NAME))
    return [*written, key]


def pull_engine(config: PlatformConfig, target: Target, uri: str) -> bool:
    """Make the local engine folder equal the published one; False if it already was."""
    bucket, prefix = split_s3_uri(uri)
    store = _store(config, bucket)
    try:
        raw = store.get_bytes(_key(prefix, target, MANIFEST_NAME))
    except ObjectNotFound:
        raise EngineError(
            f"engine {'/'.join(target)} is not published under {uri} (has the engine-build Job run?)",
            code="engine_not_published",
        ) from None
    remote = EngineManifest.model_validate_json(raw)
    folder = engine_folder(config, *target)
    try:
        local = read_manifest(folder)
    except EngineError:
        local = None
    if local == remote and _intact(folder, remote):
        return False
    with staged_folder(folder, prefix=f".pull-{folder.name}-") as staging:
        for name, digest in sorted(remote.files.items()):
            have = folder / name
            if have.is_file() and sha256_file(have) == digest:
                link_or_copy(have, staging / name)  # unchanged since the last pull: no download
            else:
                store.get_file(_key(prefix, target, name), staging / name)
        check_manifest(staging, remote, checkpoint_fingerprint=remote.checkpoint_fingerprint, buckets=remote.buckets)
        (staging / MANIFEST_NAME).write_bytes(raw)
    return True


def _intact(folder: Path, manifest: EngineManifest) -> bool:
    try:
        check_manifest(folder, manifest, checkpoint_fingerprint=manifest.checkpoint_fingerprint, buckets=[])
    except EngineError:
        return False
    return True
