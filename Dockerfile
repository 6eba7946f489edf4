# Sameseed service image (first version; the deployment issue pins a CUDA base image by digest).
# torch==2.13.0 from requirements.lock is PyPI's CUDA build on x86_64: it carries its own CUDA
# runtime libraries, so the host needs only the NVIDIA driver and container toolkit for GPUs.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONHASHSEED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CUBLAS_WORKSPACE_CONFIG=:4096:8 \
    SAMESEED_HOST=0.0.0.0 \
    SAMESEED_PORT=8000 \
    SAMESEED_DATA_DIR=/data

WORKDIR /srv/sameseed
COPY requirements.lock ./
RUN python -m pip install --no-cache-dir -r requirements.lock

COPY app ./app
RUN useradd --create-home --uid 10001 sameseed \
    && mkdir -p /data \
    && chown sameseed /data
USER sameseed

EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
CMD ["python", "-m", "app", "serve"]
