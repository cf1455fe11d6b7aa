# Portvakt container image.
#
#   docker build -t portvakt .                  # or: make docker
#   portvakt dev-certs deploy/certs             # try it with development certificates (git-ignored)
#   docker run --rm -p 8443:8443 -p 127.0.0.1:9090:9090 \
#     -v "$PWD/deploy/portvakt.yaml:/etc/portvakt/portvakt.yaml:ro" \
#     -v "$PWD/deploy/certs:/etc/portvakt/certs:ro" \
#     -e PORTVAKT_AUDIT_KEY="$(openssl rand -hex 32)" -e PORTVAKT_ADMIN_TOKEN="$(openssl rand -hex 32)" \
#     portvakt
#
# The config is read from /etc/portvakt/portvakt.yaml (mount it; relative paths inside it resolve
# against /etc/portvakt). deploy/portvakt.yaml is a starting point: listeners on 0.0.0.0 (inside a
# container they must be, to be reachable), TLS from /etc/portvakt/certs, JSON logs.
# Publish the admin port (9090: metrics, health, reload) only to the monitoring network.
# The HEALTHCHECK calls the admin /healthz on 127.0.0.1:9090 (override with PORTVAKT_HEALTH_URL).
# Writable state goes under /var/lib/portvakt (a volume, owned by the non-root user): give such
# paths absolutely, e.g. audit: {path: /var/lib/portvakt/audit/audit.jsonl}, since /etc/portvakt
# is mounted read-only. Secrets: ${ENV_VAR} in the YAML, passed with `docker run -e`.
#
# OWASP CRS is NOT in the image (the built-in rule pack is). To run CRS, mount a CRS v4 checkout
# (its rules/ directory with *.conf and *.data) read-only and point the config at it:
#   -v /srv/coreruleset-4:/opt/crs:ro      waf: {rules: crs, crs_path: /opt/crs}
# File layout on a host, Kubernetes and systemd: deploy/README.md.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A compiler only for dependencies that lack a wheel on this platform; it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/portvakt
WORKDIR /src
# Every dependency comes from requirements-image.lock (`make lock`): the same pins as the
# requirements.lock that `make test` runs against, each checked against its hash, nothing resolved at
# build time. It holds the runtime dependencies, the OpenTelemetry exporter (tracing.otlp works in the
# image without a rebuild) and setuptools to build Portvakt itself; no test or dev tools.
COPY requirements-image.lock ./
# Behind a TLS-intercepting proxy, hand pip the CA bundle as a build secret (never a layer):
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && /opt/portvakt/bin/pip install --require-hashes -r requirements-image.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY filters ./filters
# Portvakt itself, as a regular (non-editable) package: no dependency resolution, no build isolation
# (the pinned setuptools above builds it).
RUN /opt/portvakt/bin/pip install --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/portvakt/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORTVAKT_HEALTH_URL=http://127.0.0.1:9090/healthz
RUN groupadd --system --gid 10001 portvakt \
 && useradd --system --uid 10001 --gid portvakt --home-dir /var/lib/portvakt --shell /usr/sbin/nologin portvakt \
 && mkdir -p /etc/portvakt /var/lib/portvakt \
 && chown portvakt:portvakt /var/lib/portvakt
COPY --from=build /opt/portvakt /opt/portvakt
USER portvakt
WORKDIR /var/lib/portvakt
VOLUME ["/var/lib/portvakt"]
EXPOSE 8443 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['PORTVAKT_HEALTH_URL'], timeout=2).status == 200 else 1)"]
# SIGTERM drains in-flight requests, SIGHUP reloads the config.
STOPSIGNAL SIGTERM
ENTRYPOINT ["portvakt"]
CMD ["run", "--config", "/etc/portvakt/portvakt.yaml"]
