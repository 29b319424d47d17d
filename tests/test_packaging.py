"""The installed package runs from any folder: its default variant specs, content policy and tenant
schema are package data (found with importlib.resources), and a checkout's engines/ overrides them."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from zimage_platform.defaults import tenant_schema
from zimage_platform.tenancy import TenantSpec

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "zimage_platform"


def run_cli(cwd: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``zimage-platform ...`` as a user runs it in ``cwd`` (no config file, no ZIMAGE_ variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZIMAGE_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [sys.executable, "-m", "zimage_platform.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_every_file_the_package_reads_is_package_data():
    """A non-Python file under src/ that pyproject does not list would be missing from the wheel."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    listed = patterns["zimage_platform"]
    data = [
        p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert {"defaults/variants/turbo.yaml", "defaults/policy/default.yaml", "defaults/tenant.schema.json"} <= set(data)
    assert [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in listed)] == []


def test_the_packaged_tenant_schema_is_the_models():
    assert tenant_schema() == TenantSpec.model_json_schema()


#: The content policy as the ingress loads it (tenancy.policy_file, else the packaged one), then a
#: policy file that is named but missing: printed as ``rule-id`` and ``code: message``.
POLICY_CHECK = """
from pathlib import Path

from zimage_platform.config import load_config
from zimage_platform.errors import PlatformError
from zimage_platform.tenancy.policy import PolicyRegistry, load_policy_spec

config = load_config()
print(PolicyRegistry(load_policy_spec(config.tenancy.policy_file)).for_tenant("t", None).match("buy cocaine").rule_id)
try:
    load_policy_spec(Path("policies/ours.yaml"))
except PlatformError as exc:
    print(f"{exc.code}: {exc.message}")
"""


def test_variants_and_policy_are_there_outside_the_checkout(tmp_path: Path):
    """Run from an empty folder (as after ``pip install``): every variant and the policy are found."""
    listed = run_cli(tmp_path, "models", "list")
    assert listed.returncode == 0, listed.stderr
    specs = {s["name"]: s for s in map(json.loads, listed.stdout.splitlines())}
    assert set(specs) == {"turbo", "base", "edit"}
    assert all(Path(s["source"]).parent == PACKAGE / "defaults" / "variants" for s in specs.values())
    assert specs["edit"]["mode"] == "img2img" and specs["turbo"]["defaults"]["steps"] == 8
    schema = run_cli(tmp_path, "tenants", "schema")
    assert schema.returncode == 0 and json.loads(schema.stdout) == TenantSpec.model_json_schema()
    policy = subprocess.run([sys.executable, "-c", POLICY_CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert policy.stdout.splitlines() == [
        "drugs.hard",
        "policy_file_missing: the content policy file policies/ours.yaml (tenancy.policy_file) does not exist; "
        "leave tenancy.policy_file unset to use the policy packaged with the platform",
    ], policy.stderr


def test_a_checkout_engines_folder_overrides_one_variant(tmp_path: Path):
    packaged = yaml.safe_load((PACKAGE / "defaults" / "variants" / "turbo.yaml").read_text())
    (tmp_path / "engines").mkdir()
    (tmp_path / "engines" / "turbo.yaml").write_text(yaml.safe_dump({**packaged, "defaults": {"steps": 4}}))
    sketch = {k: v for k, v in packaged.items() if k != "comfy_files"}  # a model file names one variant
    (tmp_path / "engines" / "sketch.yaml").write_text(yaml.safe_dump({**sketch, "name": "sketch"}))
    listed = run_cli(tmp_path, "models", "list")
    assert listed.returncode == 0, listed.stderr
    specs = {s["name"]: s for s in map(json.loads, listed.stdout.splitlines())}
    assert set(specs) == {"turbo", "base", "edit", "sketch"}
    assert specs["turbo"]["defaults"]["steps"] == 4 and specs["turbo"]["source"] == str(Path("engines/turbo.yaml"))
    assert specs["base"]["source"] == str(PACKAGE / "defaults" / "variants" / "base.yaml")


@pytest.mark.parametrize("missing", ["variants", "policy"])
def test_an_install_without_its_package_data_refuses_to_run(tmp_path: Path, missing: str):
    """A broken install (package data left out) stops with a reason code, never serves zero models."""
    broken = tmp_path / "site" / "zimage_platform"
    shutil.copytree(PACKAGE, broken, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(broken / "defaults" / missing)
    if missing == "variants":
        run = run_cli(tmp_path, "models", "list", pythonpath=tmp_path / "site")
        assert run.returncode == 1
        assert run.stderr.startswith("error [package_data_missing]: variants is missing from the installed")
    else:
        code = "from zimage_platform.tenancy.policy import load_policy_spec\nload_policy_spec()\n"
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert "package_data_missing" in run.stderr or "policy/default.yaml is missing" in run.stderr
