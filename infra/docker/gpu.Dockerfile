# syntax=docker/dockerfile:1.7
# rsafe GPU image (Linux x86_64, NVIDIA): the CUDA build of vLLM and its torch from
# infra/requirements-gpu.lock (`make lock-gpu`). Two uses, one image:
#   * the vLLM OpenAI-compatible server:  python -m vllm.entrypoints.openai.api_server --model /registry/base/current ...
#   * the worker with the in-process engine (engine.backend: vllm): rsafe worker -c ...
# No weights inside: mount them (the model registry volume) or pull them at start.
# CUDA runtime libraries come with the wheels (nvidia-* packages); the host needs the NVIDIA driver
# (>= 580 for CUDA 13) and the NVIDIA container toolkit.
#
#   docker build -f infra/docker/gpu.Dockerfile -t rsafe-gpu:dev .            (from the repo root)
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never PIP_NO_CACHE_DIR=1
RUN pip install "uv==${UV_VERSION}" && python -m venv /opt/rsafe
WORKDIR /src
COPY infra/requirements-gpu.lock infra/requirements-gpu.lock
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip sync --python /opt/rsafe/bin/python infra/requirements-gpu.lock
COPY pyproject.toml README.md __init__.py cli.py loop.py ./
COPY policies/ policies/
COPY schemas/ schemas/
COPY models/ models/
COPY stream/ stream/
COPY training/ training/
COPY evaluation/ evaluation/
COPY demo/ demo/
COPY infra/__init__.py infra/__init__.py
RUN uv pip install --python /opt/rsafe/bin/python --no-deps . \
    && /opt/rsafe/bin/python -c "import rsafe.stream.worker, rsafe.cli; print('rsafe image ok')"

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 rsafe \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rsafe
COPY --from=build /opt/rsafe /opt/rsafe
ENV PATH=/opt/rsafe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RSAFE_HTTP__HOST=0.0.0.0 \
    RSAFE_HTTP__PORT=8088 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HEALTHCHECK_URL=http://127.0.0.1:8088/healthz
USER 10001:10001
WORKDIR /home/rsafe
EXPOSE 8000 8088
# The worker's /healthz by default; the vLLM server sets HEALTHCHECK_URL=http://127.0.0.1:8000/health.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['HEALTHCHECK_URL'], timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["rsafe", "worker", "-c", "/etc/rsafe/config/worker.yaml"]
