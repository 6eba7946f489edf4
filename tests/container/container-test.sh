#!/usr/bin/env bash
# `make container-test`: build the image from the one Dockerfile on a local base, start it with
# `docker compose` (cpu profile, tests/container/compose.test.yml on top), and run tests/container/
# against it. Installs and starts a Docker engine when there is none (as root), and stops only a
# dockerd it started. Needs ./.venv with requirements-dev.lock (`make dev-venv`).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export WORK="$ROOT/.container" VENV="$ROOT/.venv"
mkdir -p "$WORK"
started=$SECONDS
# shellcheck source=tests/container/engine.sh
source tests/container/engine.sh
trap stop_engine EXIT
step() { printf 'container-test [%4ss] %s\n' "$((SECONDS - started))" "$*"; }

step "engine"
ensure_engine
ensure_compose

# uv: the registry image the Dockerfile names is out of reach here; the same uv release comes from its
# PyPI wheel, imported as an image holding only /uv (what the Dockerfile copies from it).
uv_version=$(sed -n 's|^ARG UV_IMAGE=.*/uv:\([0-9.]*\)@.*|\1|p' Dockerfile)
uv_image="sameseed-local/uv:$uv_version"
if ! docker image inspect "$uv_image" >/dev/null 2>&1; then
    step "uv $uv_version from PyPI -> $uv_image"
    tmp=$(mktemp -d)
    "$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: "uv==$uv_version" -d "$tmp"
    "$VENV/bin/python" - "$tmp" <<'PY'
import pathlib, sys, zipfile
folder = pathlib.Path(sys.argv[1])
with zipfile.ZipFile(next(folder.glob("uv-*.whl"))) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith(".data/scripts/uv"))
    (folder / "root").mkdir()
    (folder / "root" / "uv").write_bytes(wheel.read(member))
(folder / "root" / "uv").chmod(0o755)
PY
    tar -C "$tmp/root" -c uv | docker import - "$uv_image" >/dev/null
    rm -rf "$tmp"
fi

# The base: Debian 12 with python3.11, tagged by the content hash of its recipe (built once).
base_image="sameseed-local/bookworm-python:$(sha256sum tests/container/base.sh | cut -c1-12)"
if ! docker image inspect "$base_image" >/dev/null 2>&1; then
    step "base image $base_image (debootstrap, a few minutes, once)"
    bash tests/container/base.sh "$base_image"
fi

# What the build cannot reach by itself (local-build/README.md): the torch wheel pip resolves here
# and the CA bundle pip trusts here.
step "local-build/: torch wheel and CA bundle"
mkdir -p local-build/wheels
torch_pin=$(grep '^torch==' requirements.lock)
"$VENV/bin/python" -m pip download --quiet --no-deps --only-binary=:all: "$torch_pin" -d local-build/wheels
find local-build/wheels -name '*.whl' ! -name "torch-${torch_pin#torch==}[-+]*" -delete
cafile=$("$VENV/bin/python" -m pip config get global.cert 2>/dev/null || true)
[[ -n "$cafile" && -f "$cafile" ]] || cafile=$("$VENV/bin/python" -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')
cp -L "$cafile" local-build/ca-certificates.crt

image=sameseed:container-test
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then revision="$revision-dirty"; fi
step "docker build $image (classic builder, host network, revision $revision)"
DOCKER_BUILDKIT=0 docker build --network host --quiet \
    --build-arg BASE_IMAGE="$base_image" \
    --build-arg UV_IMAGE="$uv_image" \
    --build-arg PYTHON_SOURCE=base \
    --build-arg LOCKS=requirements.lock \
    --build-arg SAMESEED_REVISION="$revision" \
    -t "$image" . >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; exit 1; }
# images this tag replaced (their big layers stay shared with the new one)
docker image prune --force --filter label=org.opencontainers.image.title=sameseed >/dev/null
step "image size: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"

step "tests/container (compose up, checks, compose down)"
status=0
SAMESEED_CT_IMAGE="$image" SAMESEED_CT_REVISION="$revision" "$VENV/bin/python" -m pytest -p no:cacheprovider -o addopts="-ra --strict-markers" -s --durations=12 \
    tests/container "$@" || status=$?
step "done (exit $status)"
exit "$status"
