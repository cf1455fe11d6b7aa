# Portvakt container image.
#
#   docker build -t portvakt .
#   docker run --rm -p 8443:8443 -p 9090:9090 \
#     -v "$PWD/deploy/portvakt.yaml:/etc/portvakt/portvakt.yaml:ro" \
#     -v "$PWD/deploy/certs:/etc/portvakt/certs:ro" portvakt
#
# The config is read from /etc/portvakt/portvakt.yaml (mount it; relative paths inside it resolve
# against /etc/portvakt). Inside a container the listeners must bind 0.0.0.0 to be reachable:
#   server: {listen: "0.0.0.0:8443", tls: {certificate: certs/server.pem, private_key: certs/server-key.pem}}
#   admin:  {listen: "0.0.0.0:9090"}     # publish 9090 only to the monitoring network
# The HEALTHCHECK calls the admin /healthz on 127.0.0.1:9090 (override with PORTVAKT_HEALTH_URL).
# Writable state goes under /var/lib/portvakt (a volume, owned by the non-root user): give such
# paths absolutely, e.g. audit: {path: /var/lib/portvakt/audit/audit.jsonl}, since /etc/portvakt
# is mounted read-only. Secrets: ${ENV_VAR} in the YAML, passed with `docker run -e`.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A compiler only for dependencies that lack a wheel on this platform; it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/portvakt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY filters ./filters
# Runtime dependencies only (no test extras), installed as a regular (non-editable) package.
RUN /opt/portvakt/bin/pip install --upgrade pip \
 && /opt/portvakt/bin/pip install .

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
