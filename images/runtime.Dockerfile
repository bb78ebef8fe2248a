# syntax=docker/dockerfile:1.7
#
# The kubetune runtime: `kubetune-runtime`, the program of every FineTuneJob and EvalJob pod,
# with the [runtime] extra (torch, transformers, peft, trl, accelerate, datasets, bitsandbytes,
# deepspeed, boto3) on CUDA.
#
#   docker build -f images/runtime.Dockerfile -t ghcr.io/kubetune/runtime:0.1.0 .
#   docker build -f images/runtime.Dockerfile --build-arg EXTRAS=runtime,eval ...   # + lm-eval
#
# The build context is the repository root; /.dockerignore lets in only what the build needs.
#
# CUDA comes with torch, not with the base image. PyTorch's Linux wheels on PyPI are CUDA
# builds that carry their CUDA runtime, cuDNN and NCCL as nvidia-* wheels, and the node's
# NVIDIA container runtime injects the driver. So the base is a plain Python 3.11, the same
# interpreter as the operator image and as CI, and torch is the exact version the runtime was
# verified with (scripts/setup-env.sh), which a pytorch/pytorch base image would not guarantee.
# TORCH_EXTRA_INDEX_URL selects another CUDA build, e.g. https://download.pytorch.org/whl/cu126
# for older drivers. It is an extra index, not a replacement: pip takes torch's `+cu126` build
# from it (a local version sorts above the plain one) and torch's own dependencies, pinned by
# constraints.txt at versions the PyTorch index may lack, from PyPI.
#
# torch is installed first and alone, as scripts/setup-env.sh does, and is never reinstalled:
# constraints.txt deliberately has no torch line (it is regenerated without one), and the
# [runtime] install gets an extra constraint torch==$TORCH_VERSION. pip finds torch already
# satisfied; a dependency asking for another torch fails the build instead of replacing it.
#
# The base is pinned by tag. Release builds should pin it by digest as well (see
# images/operator.Dockerfile).

# ---------------------------------------------------------------------------- builder
FROM python:3.11.13-slim-bookworm AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_EXTRA_INDEX_URL=
ARG EXTRAS=runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# torch (several GB with its CUDA libraries) in a layer of its own. Its own dependencies
# (filelock, sympy, networkx, jinja2, fsspec, ...) are held to constraints.txt too.
COPY constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -c constraints.txt \
        ${TORCH_EXTRA_INDEX_URL:+--extra-index-url "$TORCH_EXTRA_INDEX_URL"} \
        "torch==${TORCH_VERSION}"

# The rest of the dependencies: rebuilt only when pyproject.toml or constraints.txt change.
COPY pyproject.toml ./
COPY images/requirements.py images/
RUN --mount=type=cache,target=/root/.cache/pip \
    echo "torch==${TORCH_VERSION}" > /tmp/torch.txt \
    && python images/requirements.py "${EXTRAS}" > /tmp/requirements.txt \
    && pip install -c constraints.txt -c /tmp/torch.txt -r /tmp/requirements.txt \
    && pip check

# kubetune itself, as a wheel installed in the final stage (the venv layer above stays cached).
COPY README.md ./
COPY operator operator
COPY runtime runtime
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---------------------------------------------------------------------------- final
FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kubetune-runtime" \
      org.opencontainers.image.description="kubetune-runtime: fine-tuning and evaluation in kubetune Job pods" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.documentation="https://github.com/kubetune/kubetune/tree/main/docs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# The account the operator's pods run as: runAsUser 1000, runAsGroup 1000, fsGroup 1000
# (kubetune_operator.manifests.common.restricted_pod_security). Its home is /workspace, the
# emptyDir the operator mounts; the root filesystem is read-only in the pod.
RUN groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --home-dir /workspace --no-create-home \
       --shell /usr/sbin/nologin kubetune \
    && mkdir /workspace \
    && chown 1000:1000 /workspace

COPY --from=builder /opt/venv /opt/venv
# The wheel is bind-mounted from the builder, so no copy of it is left in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    /opt/venv/bin/pip install --no-deps --no-index --disable-pip-version-check /tmp/wheels/*.whl

# HOME and every cache under /workspace, the same values the operator sets on its pods
# (kubetune_operator.manifests.jobs), so `docker run` behaves like a pod. /tmp is the other
# writable place (an emptyDir in the pod).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KUBETUNE_WORKDIR=/workspace \
    HOME=/workspace \
    XDG_CACHE_HOME=/workspace/.cache \
    HF_HOME=/workspace/.cache/huggingface \
    TORCH_EXTENSIONS_DIR=/workspace/.cache/torch_extensions \
    TRITON_CACHE_DIR=/workspace/.cache/triton \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /workspace
USER 1000:1000
# No HEALTHCHECK: a run is a batch Job; Kubernetes ignores HEALTHCHECK anyway.
ENTRYPOINT ["kubetune-runtime"]
CMD ["--help"]
