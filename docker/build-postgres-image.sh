#!/usr/bin/env bash
# Build flexcore-postgres:15 without a container registry: Debian's PostgreSQL 15 made
# with mmdebstrap and `docker import`, started by docker/postgres/entrypoint.sh, which
# honours the part of the official `postgres` image's contract docker/compose.yml uses
# (POSTGRES_PASSWORD/USER/DB, /docker-entrypoint-initdb.d). Users who can pull keep
# compose's default `postgres:16`; tests/e2e/test_compose.py sets
# POSTGRES_IMAGE=flexcore-postgres:15 to run the compose file offline.
# Usage: docker/build-postgres-image.sh     (needs docker and mmdebstrap)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${POSTGRES_IMAGE:-flexcore-postgres:15}
# Rebuilt when this script or the entry point changes (the digest is kept in the image).
digest=$(cat "$0" docker/postgres/entrypoint.sh | sha256sum | cut -c1-12)

if docker image inspect --format '{{json .Config.Env}}' "$IMAGE" 2>/dev/null \
        | grep -q "FLEXCORE_POSTGRES_IMAGE_DIGEST=$digest"; then
    echo "$IMAGE"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "build-postgres-image: mmdebstrap is needed (apt-get install mmdebstrap)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "build-postgres-image: building $IMAGE with mmdebstrap" >&2
mmdebstrap --quiet --variant=minbase --include=postgresql-15 \
    --customize-hook='copy-in docker/postgres/entrypoint.sh /usr/local/bin' \
    --customize-hook='chmod 755 "$1/usr/local/bin/entrypoint.sh"' \
    --customize-hook='mkdir -p "$1/docker-entrypoint-initdb.d"' \
    bookworm "$tmp/postgres.tar"
docker import \
    --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PGDATA=/var/lib/postgresql/data' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV FLEXCORE_POSTGRES_IMAGE_DIGEST=$digest" \
    --change 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' \
    --change 'CMD ["postgres"]' \
    --change 'EXPOSE 5432' \
    --change 'VOLUME /var/lib/postgresql/data' \
    "$tmp/postgres.tar" "$IMAGE" >/dev/null
echo "$IMAGE"
