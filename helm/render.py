"""Chart tooling: the values schema from the platform's own config schema, and raw manifests.

- ``values.schema.json``: ``helm/schema/chart.schema.yaml`` (the chart's own values) plus the
  ``platform`` section generated from :class:`zimage_platform.config.PlatformConfig`, so Helm
  refuses at install what ``zimage-platform serve`` would refuse, with a few cluster rules on
  top (secrets only by reference, absolute container paths, no embedded S3).
- ``deploy/manifests/<profile>.yaml``: ``helm template`` of each values profile, for
  ``kubectl apply`` users.

``make manifests`` runs this; tests/deploy checks the committed files equal a fresh run.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "zimage-platform"
SCHEMA_SOURCE = REPO / "helm" / "schema" / "chart.schema.yaml"
SCHEMA_FILE = CHART / "values.schema.json"
MANIFESTS = REPO / "deploy" / "manifests"
PROFILES = ("dev", "h800-mig", "whole-gpu")
RELEASE = "zimage-platform"
NAMESPACE = "zimage"
#: The Kubernetes version manifests are rendered for and validated against (kubernetes-validate ships it).
KUBE_VERSION = "1.30.0"
#: ``scheme://user:password@`` — a password inside a URL belongs in a Secret.
URL_WITH_PASSWORD = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@]*:[^/@]*@"


def _draft07(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic writes ``$defs`` (2020-12); Helm 3.17 validates draft-07, whose home is ``definitions``."""
    text = json.dumps(schema).replace('"#/$defs/', '"#/definitions/')
    out = json.loads(text)
    out["definitions"] = out.pop("$defs")
    return out


def platform_schema() -> dict[str, Any]:
    """PlatformConfig's JSON schema (draft-07), tightened for a cluster."""
    from zimage_platform.config import PlatformConfig

    schema = _draft07(PlatformConfig.model_json_schema())
    defs = schema["definitions"]
    no_password = {"anyOf": [{"type": "null"}, {"type": "string", "not": {"pattern": URL_WITH_PASSWORD}}]}
    defs["DatabaseConfig"]["properties"]["url"].update(
        no_password, description="No password here: secrets.databasePassword (PGPASSWORD) or secrets.databaseUrl."
    )
    defs["TenancyConfig"]["properties"]["redis_url"].update(
        copy.deepcopy(no_password), description="No password here: use secrets.redisUrl."
    )
    for model, field, ref in (
        ("TenancyConfig", "key_pepper", "secrets.keyPepper"),
        ("WebhookConfig", "signing_secret", "secrets.webhookSigningSecret"),
    ):
        defs[model]["properties"][field] = {"type": "null", "description": f"A secret: use {ref}."}
    defs["TelemetryConfig"]["properties"]["otlp_headers"] = {
        "type": "object",
        "maxProperties": 0,
        "description": "Headers may carry credentials: use secrets.otlpHeaders.",
    }
    defs["StorageConfig"]["properties"]["embedded"] = {
        "const": False,
        "description": "The embedded SeaweedFS is for one machine; a cluster uses a real S3 endpoint.",
    }
    for name, prop in defs["PathsConfig"]["properties"].items():
        defs["PathsConfig"]["properties"][name] = {
            "type": "string",
            "pattern": "^/",
            "description": f"Absolute path inside the container (default {prop.get('default')!s} is relative).",
        }
    defs["TenancyConfig"]["properties"]["dirs"]["items"] = {"type": "string", "pattern": "^/"}
    defs["TenancyConfig"]["properties"]["dirs"]["minItems"] = 1
    return schema


def values_schema() -> dict[str, Any]:
    """The chart's whole values schema (draft-07)."""
    chart = yaml.safe_load(SCHEMA_SOURCE.read_text())
    platform = platform_schema()
    chart["definitions"].update(platform.pop("definitions"))
    platform.pop("title", None)
    chart["definitions"]["PlatformConfig"] = platform
    return chart


def schema_text() -> str:
    return json.dumps(values_schema(), indent=2, ensure_ascii=False) + "\n"


def helm_binary() -> str:
    """The project's pinned helm (``make tools`` puts it in .tools/bin), else one on PATH.

    The pinned one first: committed manifests are compared byte for byte with its output."""
    pinned = REPO / ".tools" / "bin" / "helm"
    found = str(pinned) if os.access(pinned, os.X_OK) else shutil.which("helm")
    if found is None:
        raise FileNotFoundError("helm is not installed: run `make tools` (scripts/install-tools.sh)")
    return found


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120, check=False)
    if check and run.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args[:2])} failed ({run.returncode}):\n{run.stderr}")
    return run


def profile_file(profile: str) -> Path:
    return CHART / f"values-{profile}.yaml"


def template_args(profile: str | None, *extra: str) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if profile:
        args += ["-f", str(profile_file(profile))]
    return [*args, *extra]


def render(profile: str | None, *extra: str) -> str:
    """``helm template`` of the chart with a profile (and extra flags such as ``--set``)."""
    return helm(*template_args(profile, *extra)).stdout


def manifest_text(profile: str) -> str:
    header = (
        f"# Rendered from helm/zimage-platform with values-{profile}.yaml by `make manifests`\n"
        f"# (release {RELEASE!r}, namespace {NAMESPACE!r}, Kubernetes {KUBE_VERSION}). Do not edit: change the\n"
        "# chart or the profile and re-render. Needs the KubeRay operator (RayService ray.io/v1).\n"
    )
    return header + render(profile, "--skip-tests")


def main(argv: list[str]) -> int:
    """Write the schema, then the manifests (rendered with it); ``--check``: exit 1 if any is stale."""
    check = "--check" in argv
    stale: list[Path] = []

    def sync(path: Path, text: str) -> None:
        if path.is_file() and path.read_text() == text:
            return
        stale.append(path.relative_to(REPO))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    sync(SCHEMA_FILE, schema_text())
    for profile in PROFILES:
        sync(MANIFESTS / f"{profile}.yaml", manifest_text(profile))
    verb = "stale" if check else "written"
    print("\n".join(f"{verb}: {p}" for p in stale) or "up to date")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
