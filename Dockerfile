# The manager's image (default target) and an agent image with the PostgreSQL client tools
# (target agent-postgresql), both from the pinned package (pyproject.toml's exact pins), run
# as a non-root user with a numeric id (so Kubernetes' runAsNonRoot can verify it).
#
#   docker build -t osb-backup-manager:0.1.0 .
#   docker build --target agent-postgresql -t osb-backup-agent-postgresql:0.1.0 .
#
# tests/deploy/test_image.py checks that what this copies and runs exists.

FROM python:3.11.7-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# catalog.yml too: broker/osb/catalog.yml links to it, and the wheel carries its content.
COPY pyproject.toml README.md catalog.yml ./
COPY broker/ broker/
COPY backup/ backup/
COPY storage/ storage/
COPY scheduler/ scheduler/
COPY agent/ agent/
COPY webguard/ webguard/
COPY cli/ cli/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

FROM python:3.11.7-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
RUN groupadd --gid 10001 backup \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin backup

# The agent beside a PostgreSQL server: its scripts call pg_dump and psql.
FROM runtime AS agent-postgresql
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["osb-backup-agent"]

FROM runtime AS manager
# The package carries the catalog; the image also puts it at a fixed path, where an operator
# replaces it by mounting another (a ConfigMap) without rebuilding.
COPY catalog.yml /etc/osb-backup-manager/catalog.yml
ENV CATALOG_PATH=/etc/osb-backup-manager/catalog.yml LISTEN_HOST=0.0.0.0
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["osb-backup-manager"]
