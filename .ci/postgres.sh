# Sourced by .ci/run: start a throwaway PostgreSQL cluster and export KILN_TEST_POSTGRES_URL.
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -n "$PG_BIN" ]; then
  PGDIR=$(mktemp -d /tmp/kiln-pg.XXXXXX)
  chown postgres "$PGDIR"
  su postgres -c "$PG_BIN/initdb -D $PGDIR/data -A trust -U postgres" >/dev/null
  su postgres -c "$PG_BIN/pg_ctl -D $PGDIR/data -o '-k $PGDIR -p 55432 -c listen_addresses=127.0.0.1' -l $PGDIR/log -w start" >/dev/null
  export KILN_TEST_POSTGRES_URL="postgresql+psycopg://postgres@127.0.0.1:55432/postgres"
  trap 'su postgres -c "$PG_BIN/pg_ctl -D $PGDIR/data -m fast stop" >/dev/null 2>&1 || true' EXIT
  echo "PostgreSQL for tests at $KILN_TEST_POSTGRES_URL"
else
  echo "PostgreSQL not available: store tests run on SQLite only"
fi
