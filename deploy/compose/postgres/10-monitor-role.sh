#!/bin/sh
# Run once by the postgres image's entrypoint on a fresh data directory (docker-entrypoint-initdb.d):
# the daemon's login role. pg_monitor lets it see the state of every role's backends in
# pg_stat_activity (without it they show as "insufficient privilege"); nothing more is granted.
set -eu
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v password="$DBPOOL_MONITOR_PASSWORD" <<'SQL'
CREATE ROLE dbpool_monitor LOGIN PASSWORD :'password' CONNECTION LIMIT 5;
GRANT pg_monitor TO dbpool_monitor;
SQL
