#!/bin/bash
# Entry point of flexcore-postgres:15 (docker/build-postgres-image.sh): Debian's
# PostgreSQL 15 behind the part of the official `postgres` image's contract that
# docker/compose.yml uses, so the compose file runs with either image:
#   POSTGRES_PASSWORD (required), POSTGRES_USER (default postgres), POSTGRES_DB (default
#   the user), PGDATA (default /var/lib/postgresql/data); on the first start *.sql and
#   *.sh files in /docker-entrypoint-initdb.d run against POSTGRES_DB; then postgres
#   listens on all addresses with scram-sha-256 password authentication.
set -euo pipefail
export PATH=/usr/lib/postgresql/15/bin:$PATH
PGDATA=${PGDATA:-/var/lib/postgresql/data}
POSTGRES_USER=${POSTGRES_USER:-postgres}
POSTGRES_DB=${POSTGRES_DB:-$POSTGRES_USER}
export PGDATA

if [[ "${1:-postgres}" != postgres ]]; then
    exec "$@"
fi
if [[ "$(id -u)" == 0 ]]; then
    mkdir -p "$PGDATA" /run/postgresql
    chown -R postgres:postgres "$PGDATA" /run/postgresql
    chmod 700 "$PGDATA"
    exec runuser -u postgres -- "$0" "$@"
fi

if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    if [[ -z "${POSTGRES_PASSWORD:-}" ]]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD is not set; refusing to start a database without a password" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust \
        --encoding=UTF8 --locale=C.UTF-8 \
        --auth-host=scram-sha-256 -D "$PGDATA" >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    if [[ "$POSTGRES_DB" != postgres ]]; then
        psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
            -c "CREATE DATABASE \"$POSTGRES_DB\"" >/dev/null
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sql) echo "postgres-entrypoint: running $f"
                   psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f "$f" >/dev/null ;;
            *.sh)  echo "postgres-entrypoint: running $f"; . "$f" ;;
            *)     if [[ -e "$f" ]]; then echo "postgres-entrypoint: ignoring $f"; fi ;;
        esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "postgres-entrypoint: database initialised"
fi
shift || true
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
