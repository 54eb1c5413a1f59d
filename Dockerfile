# syntax=docker/dockerfile:1
# Images of mla-train for Ray clusters: the official rayproject/ray image of the pinned Ray and
# Python with torch, DeepSpeed and this project installed by scripts/install.sh, the same script
# `make` and CI run. Two targets:
#
#   docker build --target gpu -t REGISTRY/mla-train:0.1.0-gpu .    # CUDA 12.8, DeepSpeed ops prebuilt
#   docker build --target cpu -t REGISTRY/mla-train:0.1.0-cpu .    # CPU only
#   docker push REGISTRY/mla-train:0.1.0-gpu
#
# Ray's images run as the non-root user `ray` (uid 1000, gid 100) with Python in
# /home/ray/anaconda3; the final stages run as that user too. Each target is two stages: a build
# stage with compilers (DeepSpeed's CUDA ops are compiled there) and a runtime stage that copies
# only the finished Python environment onto a clean base, so no compiler, pip cache or source
# tree ships in the image.
#
# RAY_VERSION and PYTHON_TAG must match pyproject.toml (ray==..., requires-python);
# tests/test_image.py checks that they do.
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG CUDA_TAG=cu128
ARG PYTHON_PREFIX=/home/ray/anaconda3

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-cpu AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG} AS base-gpu

# ---- build stages -------------------------------------------------------------------------------
FROM base-cpu AS build-cpu
ARG PYTHON_PREFIX
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
USER root
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/src
COPY --chown=ray:users . .
ENV PIP_NO_CACHE_DIR=1
RUN python -c "import sys; assert sys.prefix == '${PYTHON_PREFIX}', sys.prefix" \
    && TORCH_INDEX_URL=${TORCH_INDEX_URL} scripts/install.sh python --extras train

FROM base-gpu AS build-gpu
ARG PYTHON_PREFIX
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Prebuild the DeepSpeed ops a GPU run can use (fused Adam; CPU Adam for ZeRO optimizer offload),
# for A100 (8.0), L4/L40 (8.9) and H100/H200 (9.0), instead of a JIT build on every node.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"
USER root
RUN apt-get update && apt-get install -y --no-install-recommends build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/src
COPY --chown=ray:users . .
ENV PIP_NO_CACHE_DIR=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN python -c "import sys; assert sys.prefix == '${PYTHON_PREFIX}', sys.prefix" \
    && TORCH_INDEX_URL=${TORCH_INDEX_URL} scripts/install.sh python --extras train

# ---- runtime stages -----------------------------------------------------------------------------
FROM base-cpu AS cpu
ARG PYTHON_PREFIX
COPY --from=build-cpu --chown=ray:users ${PYTHON_PREFIX} ${PYTHON_PREFIX}
USER ray
WORKDIR /home/ray
RUN mla --help > /dev/null \
    && python -c "import orchestrator.cli, workers.train_loop, deepspeed, ray.train.torch"

FROM base-gpu AS gpu
ARG PYTHON_PREFIX
COPY --from=build-gpu --chown=ray:users ${PYTHON_PREFIX} ${PYTHON_PREFIX}
USER ray
WORKDIR /home/ray
RUN mla --help > /dev/null \
    && python -c "import orchestrator.cli, workers.train_loop, deepspeed, ray.train.torch" \
    && python -c "from deepspeed.git_version_info import installed_ops as o; assert o['fused_adam'] and o['cpu_adam'], o"
