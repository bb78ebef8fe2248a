# syntax=docker/dockerfile:1.7
#
# The kubetune operator: the `kubetune` CLI with the [operator] extra (kopf, the kubernetes
# client, aiohttp, prometheus-client). No training stack: torch and the [runtime] extra never
# enter this image (tests/unit/test_images.py checks it).
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/kubetune/operator:0.1.0 .
#
# The build context is the repository root; /.dockerignore lets in only what the build needs.
# Both stages use the same base image, so the virtual environment built in the first one finds
# its interpreter at the same path in the second.
#
# The base is pinned by tag. Release builds should pin it by digest as well, e.g.
#   python:3.11.13-slim-bookworm@sha256:<digest from `docker buildx imagetools inspect`>
# and let a bot such as Renovate move both together.

# ---------------------------------------------------------------------------- builder
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml or
# constraints.txt change, not on every source change. Versions come from constraints.txt,
# the set verified together in CI.
COPY pyproject.toml constraints.txt ./
COPY images/requirements.py images/
RUN --mount=type=cache,target=/root/.cache/pip \
    python images/requirements.py operator > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
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
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="The kubetune operator: FineTuneJobs and EvalJobs as batch Jobs" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.documentation="https://github.com/kubetune/kubetune/tree/main/docs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# A named account for the numeric UID the pod runs as (65532, the distroless "nonroot"), so
# tools that look the user up (getpass, ssh-style config loaders) find one. No home: the
# operator writes nothing to disk; the chart mounts an emptyDir at /tmp for the kubernetes
# client's temporary certificate files under a read-only root filesystem.
RUN groupadd --system --gid 65532 kubetune \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin kubetune

COPY --from=builder /opt/venv /opt/venv
# The wheel is bind-mounted from the builder, so no copy of it is left in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    /opt/venv/bin/pip install --no-deps --no-index --disable-pip-version-check /tmp/wheels/*.whl

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 65532:65532
# 8080: the progress endpoint and /metrics; 8081: kopf's liveness probe (/healthz).
# No HEALTHCHECK: Kubernetes ignores it; the chart's probes use these ports.
EXPOSE 8080 8081
ENTRYPOINT ["kubetune", "operator"]
