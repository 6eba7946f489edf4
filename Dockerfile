# syntax=docker/dockerfile:1
# Sameseed service image: `docker compose up` on a team GPU server (README "Deploy on a team GPU server").
# The same file builds the CPU test image of `make container-test` from a local base (build arguments
# below); there is no second Dockerfile.
#
# Base: NVIDIA's official CUDA 13.0.3 image for Ubuntu 24.04, pinned by tag and digest. torch==2.13.0
# (requirements.lock) is PyPI's CUDA 13.0 build; it loads cuBLAS, cuDNN 9.20 and the rest from the
# pip wheels pinned in requirements-cuda.lock. The `base` flavour adds no second copy of those
# libraries (the `runtime`/`cudnn-runtime` flavours would put other cuBLAS/cuDNN builds on the library
# path, and which one loads would then depend on search order). It brings Ubuntu, the driver check of
# the NVIDIA container toolkit (NVIDIA_REQUIRE_CUDA: driver >= 580) and its NVIDIA_* variables.
# Digests were read from public references, not from the registry: `docker buildx imagetools
# inspect <image:tag>` confirms them; override with --build-arg to move to another base.
ARG BASE_IMAGE=nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:7c7413a56200486f71f181cad9310f6fd31b6bb21816ade15fc9c1e1e927a5c1
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.12.23@sha256:61d393e44e249f2e4b526b6c7ddcecce245946826e608e11c93ad4f5bba55b21
# Where Python comes from (recorded in the io.sameseed.python.source label):
#   uv    the CPython 3.11.17 build uv 0.12.23 downloads and checks by sha256 (Ubuntu 24.04 ships 3.12);
#   base  the base image's own /usr/bin/python3.11 (the local Debian 12 base of `make container-test`).
ARG PYTHON_SOURCE=uv
# The lock files installed; the CPU test image leaves out requirements-cuda.lock.
ARG LOCKS="requirements.lock requirements-cuda.lock"

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------- build: Python and the locked packages
FROM ${BASE_IMAGE} AS build
ARG PYTHON_SOURCE
ARG LOCKS
COPY --from=uv /uv /usr/local/bin/uv
# No uv cache: the layers hold only what runs.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy
RUN mkdir -p /opt/python \
    && case "${PYTHON_SOURCE}" in \
        uv) UV_PYTHON_PREFERENCE=only-managed uv python install 3.11.17 \
            && UV_PYTHON_PREFERENCE=only-managed uv venv --python 3.11.17 /opt/venv ;; \
        base) UV_PYTHON_PREFERENCE=only-system uv venv --python /usr/bin/python3.11 /opt/venv ;; \
        *) echo "PYTHON_SOURCE must be uv or base, not ${PYTHON_SOURCE}" >&2; exit 1 ;; \
    esac
COPY requirements.lock requirements-cuda.lock /tmp/lock/
# local-build/ is empty on a team server. Where the registry is reached through a proxy with its own
# CA, or a package comes from a local wheel (the torch CPU build), `make container-test` puts them there:
# its wheels are installed first, and the locks then find them installed.
COPY local-build/ /tmp/local-build/
# --no-deps: nothing the locks do not name is installed; `pip check` then fails the build if they are
# incomplete (a dependency missing or at another version).
# hadolint ignore=SC2046,SC2086
RUN if [ -f /tmp/local-build/ca-certificates.crt ]; then export SSL_CERT_FILE=/tmp/local-build/ca-certificates.crt; fi \
    && wheels=$(find /tmp/local-build -name '*.whl') \
    && if [ -n "${wheels}" ]; then uv pip install --python /opt/venv/bin/python --no-deps --offline ${wheels}; fi \
    && uv pip install --python /opt/venv/bin/python --no-deps --compile-bytecode \
        $(for lock in ${LOCKS}; do printf -- '-r /tmp/lock/%s ' "${lock}"; done) \
    && uv pip check --python /opt/venv/bin/python

# ---------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --gid 10001 sameseed \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin sameseed \
    && mkdir -p /data /cache/huggingface \
    && chown sameseed:sameseed /data /cache/huggingface
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv

# Labels and ENV after the big layers: a new revision rebuilds only what follows.
ARG BASE_IMAGE
ARG PYTHON_SOURCE
ARG SAMESEED_VERSION=0.1.0
ARG SAMESEED_REVISION=unknown
LABEL org.opencontainers.image.title="sameseed" \
      org.opencontainers.image.description="Deterministic Stable Diffusion generation with provenance manifests" \
      org.opencontainers.image.version="${SAMESEED_VERSION}" \
      org.opencontainers.image.revision="${SAMESEED_REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      io.sameseed.python.source="${PYTHON_SOURCE}"

# CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts (the workers set it too); PYTHONHASHSEED
# fixes set/dict iteration order; the SAMESEED_IMAGE_* values reach every manifest as runtime.image
# (provenance, not part of the reproducibility key).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONHASHSEED=0 \
    PYTHONDONTWRITEBYTECODE=1 \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    HF_HOME=/cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    SAMESEED_HOST=0.0.0.0 \
    SAMESEED_PORT=8000 \
    SAMESEED_DATA_DIR=/data \
    SAMESEED_IMAGE_VERSION=${SAMESEED_VERSION} \
    SAMESEED_IMAGE_REVISION=${SAMESEED_REVISION} \
    SAMESEED_IMAGE_BASE=${BASE_IMAGE}

WORKDIR /srv/sameseed
COPY app ./app
COPY deploy ./deploy
USER 10001:10001

EXPOSE 8000
VOLUME ["/data", "/cache/huggingface"]
# Healthy = /readyz answers 200: a worker has its model loaded. The first start may download models
# (SAMESEED_ALLOW_DOWNLOAD) or hash them: the start period is long.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('SAMESEED_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "app", "serve"]
