# syntax=docker/dockerfile:1.7
# rsafe training image: the retraining job (`rsafe train dataset`, `rsafe train grpo` under
# `accelerate launch` with DeepSpeed ZeRO-3 and TRL's vLLM rollouts) from
# infra/requirements-train.lock, with the accelerate/GRPO configs of infra/accelerate/ at
# /opt/rsafe/accelerate/. No weights inside: the base model and the outputs live on the model
# registry volume. A batch job, so no health check (HEALTHCHECK NONE).
#
#   docker build -f infra/docker/train.Dockerfile -t rsafe-train:dev .        (from the repo root)
ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never PIP_NO_CACHE_DIR=1
RUN pip install "uv==${UV_VERSION}" && python -m venv /opt/rsafe
WORKDIR /src
COPY infra/requirements-train.lock infra/requirements-train.lock
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip sync --python /opt/rsafe/bin/python infra/requirements-train.lock
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
    && /opt/rsafe/bin/python -c "import rsafe.training.cli; print('rsafe training image ok')"

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 rsafe \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin rsafe
COPY --from=build /opt/rsafe /opt/rsafe
COPY infra/accelerate/ /opt/rsafe/accelerate/
ENV PATH=/opt/rsafe/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/rsafe
HEALTHCHECK NONE
ENTRYPOINT ["tini", "--"]
CMD ["rsafe", "train", "--help"]
