# syntax=docker/dockerfile:1.7
#
# tta-server image.
#
#   CPU (default):  docker build -t tta-server:cpu .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cuda -t tta-server:cuda .
#
# Model weights and source data are not part of the image: mount them read-only at /models and
# /data (see deploy/models.cifar10.yaml, which is installed as the default config).

# Interpreter for every stage. The CUDA runtime stage copies this same CPython build.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Runtime base for TORCH_VARIANT=cuda. Must be an Ubuntu 24.04 (glibc >= 2.36) image; the CUDA
# user-space libraries torch needs come with its wheels, the image supplies the driver glue.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
# cpu | cuda
ARG TORCH_VARIANT=cpu

FROM ${PYTHON_IMAGE} AS python


# ---------------------------------------------------------------------------------------------
# builder: the project wheel, torch for the chosen variant and every dependency in /opt/venv
# ---------------------------------------------------------------------------------------------
FROM python AS builder
ARG TORCH_VARIANT
# Index for the CPU-only torch/torchvision wheels (used when TORCH_VARIANT=cpu).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Index for everything else, and for the CUDA torch build (the default PyPI wheels are CUDA builds).
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PYPI_INDEX_URL} \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
WORKDIR /src

# torch and torchvision first, at the exact pins of pyproject.toml, from the variant's index.
COPY pyproject.toml ./
RUN python - > /tmp/torch-requirements.txt <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
pins = [d for d in deps if re.match(r"^torch(vision)?\s*==", d)]
if len(pins) != 2:
    raise SystemExit(f"expected torch and torchvision pins in pyproject.toml, found {pins}")
print("\n".join(pins))
EOF
RUN case "${TORCH_VARIANT}" in \
      cpu)  pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url "${PYPI_INDEX_URL}" \
                -r /tmp/torch-requirements.txt ;; \
      cuda) pip install -r /tmp/torch-requirements.txt ;; \
      *)    echo "TORCH_VARIANT must be 'cpu' or 'cuda', not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac

# The server distribution itself, as a wheel; its remaining dependencies come from PyPI. Only its sources:
# the client SDK (clients/) and the benchmarks with their data (bench/) are distributions of their own.
COPY README.md ./
COPY adapters ./adapters
COPY tta_server ./tta_server
RUN pip wheel --no-deps --wheel-dir /tmp/wheels . \
 && pip install /tmp/wheels/tta_service-*.whl \
 && python - <<'EOF'
import os

import torch

import tta_server

variant = os.environ["TORCH_VARIANT"]
print(f"tta_server {tta_server.__version__}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if (torch.version.cuda is not None) != (variant == "cuda"):
    raise SystemExit(f"TORCH_VARIANT={variant} but torch {torch.__version__} was installed")
EOF


# ---------------------------------------------------------------------------------------------
# runtime bases, selected by TORCH_VARIANT
# ---------------------------------------------------------------------------------------------
FROM python AS runtime-cpu
ENV TTA_DEVICE=cpu

FROM ${CUDA_IMAGE} AS runtime-cuda
ARG DEBIAN_FRONTEND=noninteractive
# The builder's CPython (same prefix, so the copied venv's interpreter links resolve).
COPY --from=python /usr/local /usr/local
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates libbz2-1.0 libexpat1 libffi8 liblzma5 libncursesw6 libreadline8t64 \
      libsqlite3-0 libssl3t64 libuuid1 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && ldconfig \
 && python3 -c "import ssl, sqlite3, ctypes, lzma, bz2; print('python ok')"
ENV LANG=C.UTF-8 \
    TTA_DEVICE=cuda


# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM runtime-${TORCH_VARIANT} AS runtime
ARG TORCH_VARIANT

LABEL org.opencontainers.image.title="tta-server" \
      org.opencontainers.image.description="Test-time adaptation inference service" \
      io.tta.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 tta \
 && useradd --system --uid 10001 --gid tta --home-dir /home/tta --create-home \
      --shell /usr/sbin/nologin tta \
 && mkdir -p /models /data /etc/tta

COPY --from=builder /opt/venv /opt/venv
COPY deploy/models.cifar10.yaml /etc/tta/models.yaml

ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/tta \
    TTA_HOST=0.0.0.0 \
    TTA_PORT=8000 \
    TTA_MODELS_CONFIG=/etc/tta/models.yaml

USER 10001:10001
WORKDIR /home/tta
EXPOSE 8000

# Liveness only (/healthz); readiness (/readyz) is for orchestrators that route traffic.
# The server listens on TTA_HOST:TTA_PORT; change the port with -e TTA_PORT=..., not with --port,
# so that this check follows it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('TTA_PORT', '8000')}/healthz\", timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# Settings come from TTA_* variables; arguments (--host, --port, --config) override them.
ENTRYPOINT ["python", "-m", "tta_server"]
CMD []
