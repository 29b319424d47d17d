"""``billing audit`` and ``billing statement`` on the embedded default, as a user runs them after
``zimage-platform serve`` has stopped (or while it runs): they reach the embedded S3 of the data
folder themselves, with the credentials in var/secrets, and leave nothing running."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
import yaml
from test_ledger import deliver
from typer.testing import CliRunner

from zimage_platform.billing import entries_of
from zimage_platform.cli import app
from zimage_platform.config import load_config
from zimage_platform.serve.components import job_store
from zimage_platform.storage.embedded import embedded_s3, state_file
from zimage_platform.storage.results import ResultStore


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch) -> Path:
    """The embedded default in a data folder of its own; no AWS credentials in the environment."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "ZIMAGE_CONFIG"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever the CLI sets
    path = tmp_path / "zimage-platform.yaml"
    path.write_text(
        yaml.safe_dump({"paths": {"data_dir": str(tmp_path / "var"), "engines_dir": str(tmp_path / "engines")}})
    )
    return path


def results_of(s3, bucket: str) -> ResultStore:
    return ResultStore(bucket, endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key)


def weeds_on(folder: Path) -> list[psutil.Process]:
    marker = f"-dir={folder}"
    return [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]


def cli(config_file: Path, *args: str):
    return CliRunner().invoke(app, ["--config", str(config_file), *args])


def test_audit_reaches_the_embedded_s3_when_serve_is_not_running(config_file: Path):
    config = load_config(config_file)
    store = job_store(config, migrate=True)
    with embedded_s3(config, owner="serve") as s3:  # what an earlier `serve` left in the data folder
        results = results_of(s3, config.storage.bucket)
        job = deliver(store, results, "demo", n=2)
        lost = next(r.s3_key for r in entries_of(store.engine, job_id=job) if r.image_index == 1)
        results._client.delete_object(Bucket=config.storage.bucket, Key=lost)
    assert not weeds_on(config.paths.data_dir / "s3")

    audit = cli(config_file, "billing", "audit", "--from", "today", "--to", "today")
    findings = [json.loads(line) for line in audit.stdout.splitlines()]
    assert audit.exit_code == 1, audit.output
    assert [(f["kind"], f["image_index"]) for f in findings] == [("object_missing", 1)]  # image 0 was found
    assert not weeds_on(config.paths.data_dir / "s3") and not state_file(config).exists()


def test_statement_attaches_to_a_running_serve(config_file: Path):
    config = load_config(config_file)
    month = datetime.now(UTC).strftime("%Y-%m")
    with embedded_s3(config, owner="serve") as s3:
        job = deliver(job_store(config, migrate=True), results_of(s3, config.storage.bucket), "demo", n=1)
        (serving,) = weeds_on(config.paths.data_dir / "s3")
        statement = cli(config_file, "billing", "statement", "--tenant", "demo", "--month", month)
        assert statement.exit_code == 0, statement.output
        written = json.loads(statement.stdout)
        assert weeds_on(config.paths.data_dir / "s3") == [serving]  # the command neither started nor stopped one
        assert job in results_of(s3, config.storage.bucket).get_bytes(written["csv"]).decode()
