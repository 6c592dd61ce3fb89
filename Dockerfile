# edgeproxy container image: `podman build -t edgeproxy .` (or docker/buildah).
#
# Two stages on the same Python base, so the virtualenv built in the first
# runs unchanged in the second:
#   build    compiles the Cython extension (EDGEPROXY_EXT=yes: a failed build
#            fails the image) and installs edgeproxy into /opt/edgeproxy;
#   runtime  that virtualenv alone: no compiler, no Cython, no sources, and a
#            non-root user.
# The proxy runs as PID 1 (exec-form ENTRYPOINT, no shell in between). It
# installs its own SIGTERM/SIGINT/SIGHUP handlers, so the stop signal of
# `docker stop` / a Kubernetes pod deletion starts the graceful drain, and with
# `workers = N` the supervisor reaps its own workers. Give the runtime a stop
# timeout above [shutdown] readiness_grace + drain_timeout (docker stop -t,
# terminationGracePeriodSeconds). SIGUSR2 binary upgrades do not apply here:
# the new supervisor would outlive PID 1; roll the container instead.
#
# PYTHON_IMAGE must provide python3 with its headers and venv (the official
# python:*-slim images do). BUILD_PACKAGES is what the build stage adds with
# apt: a plain Debian base also needs python3-dev (README, "Deploying").
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG BUILD_PACKAGES="gcc libc6-dev"
# The compiler comes from the base's own Debian release; pinning its exact
# version would break the build at every point release of that release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ${BUILD_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md config.example.toml ./
COPY ext ext
COPY edgeproxy edgeproxy
# -I: the check imports the installed package, not the sources in /src
RUN python3 -m venv /opt/edgeproxy \
    && EDGEPROXY_EXT=yes /opt/edgeproxy/bin/pip install --no-cache-dir /src \
    && /opt/edgeproxy/bin/python -I -c "import edgeproxy._speedups"

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 edgeproxy \
    && useradd --system --uid 10001 --gid edgeproxy --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin edgeproxy
COPY --from=build /opt/edgeproxy /opt/edgeproxy
COPY deploy/docker/edgeproxy.toml /etc/edgeproxy/edgeproxy.toml
ENV PATH=/opt/edgeproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 8080: the proxy listener; 9901: the admin listener (metrics, probes)
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
# /healthz answers 200 while the process runs; the image has no curl, so the
# venv's Python asks (a refused or non-2xx answer raises: exit status 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
ENTRYPOINT ["edgeproxy", "run", "--config", "/etc/edgeproxy/edgeproxy.toml"]
