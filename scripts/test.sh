#!/usr/bin/env bash
# Runs Sluice's whole test suite on a fresh machine: installs what the tests need (the PostgreSQL
# server binaries, used by tests that start their own throwaway PostgreSQL), then builds and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg() {
  command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
  [ -x /usr/local/bin/initdb ] && return 0
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && return 0
  return 1
}

if ! have_pg; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing the PostgreSQL server for the store tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "scripts/test.sh: the PostgreSQL server (initdb, pg_ctl) is missing; install it (e.g. apt-get install postgresql) and rerun" >&2
    exit 1
  fi
fi
if ! command -v psql >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null
fi

# Tests that need PostgreSQL fail (instead of skipping) when it cannot be started.
export SLUICE_REQUIRE_PG=1
cargo test --workspace --locked "$@"
