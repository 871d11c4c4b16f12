# Shared by the benchmark scripts (sourced, not run): the fast mock upstream and a Sluice
# configuration that proxies one model to it with request logging on (SQLite).

# bench_config FILE SLUICE_PORT UPSTREAM_PORT DB_PATH: writes the configuration.
bench_config() {
  cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
[store]
url = "sqlite://$4"
[providers.upstream]
type = "openai"
base_url = "http://127.0.0.1:$3/v1"
api_key = "env::UPSTREAM_KEY"
[models."bench-model"]
deployments = [{ provider = "upstream", model = "gpt-4o-mini" }]
TOML
}

# bench_upstream PORT: starts the fast mock upstream in the background; its pid lands in UP_PID.
bench_upstream() {
  ./target/release/examples/fast_upstream "127.0.0.1:$1" >/dev/null &
  UP_PID=$!
}

# bench_start_three WORK UPSTREAM_PORT BARE_PROXY_PORT SLUICE_PORT: starts the fast mock upstream,
# the bare proxy in front of it and Sluice (the benchmark configuration, its store and output in
# WORK), waits until Sluice answers, and sets UP_PID, BP_PID and SL_PID (with a cleanup on exit
# that stops them and removes WORK).
bench_start_three() {
  local work=$1 up=$2 bp=$3 sl=$4
  BENCH_WORK=$work
  trap 'kill "${UP_PID:-}" "${SL_PID:-}" "${BP_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$BENCH_WORK"' EXIT
  bench_upstream "$up"
  ./target/release/examples/bare_proxy "127.0.0.1:$bp" "http://127.0.0.1:$up" >/dev/null &
  BP_PID=$!
  bench_config "$work/sluice.toml" "$sl" "$up" "$work/sluice.db"
  UPSTREAM_KEY=bench SLUICE_LOG=warn ./target/release/sluice serve --config "$work/sluice.toml" >"$work/sluice.out" 2>&1 &
  SL_PID=$!
  bench_wait_ready "$sl"
}

# bench_wait_ready SLUICE_PORT: waits (up to 20 s) until Sluice answers its health check.
bench_wait_ready() {
  for _ in $(seq 200); do
    curl -s -o /dev/null "http://127.0.0.1:$1/health" && return 0
    sleep 0.1
  done
  echo "Sluice did not start on port $1" >&2
  return 1
}

# bench_lua FILE STREAM(true|false): a wrk script posting one small chat completion.
bench_lua() {
  cat > "$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
wrk.body = '{"model":"bench-model","stream":$2,"messages":[{"role":"user","content":"Hello, how are you?"}]}'
LUA
}

# bench_need TOOL...: installs each missing tool from Debian (the package has the tool's name).
bench_need() {
  local tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null && continue
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
  done
}

# bench_watch_start SLUICE_PORT FILE: until bench_watch_stop, samples Sluice's log queue
# (`sluice_log_queue_records` on /metrics) every 0.2 s and notes how late this shell's own 50 ms
# sleeps wake up, so that a slow cell can be told apart: a full log queue (the record writer fell
# behind) or the whole machine pausing (a late wake-up outside Sluice).
bench_watch_start() {
  ( while :; do
      curl -s -m 1 "http://127.0.0.1:$1/metrics" | awk '/^sluice_log_queue_records / {print "queue", $2}'
      sleep 0.2
    done ) >"$2.queue" 2>/dev/null &
  WATCH_Q=$!
  ( last=${EPOCHREALTIME/./}
    while :; do
      sleep 0.05
      now=${EPOCHREALTIME/./}
      echo "late $(( (now - last) / 1000 - 50 ))"
      last=$now
    done ) >"$2.late" 2>/dev/null &
  WATCH_L=$!
}

# bench_watch_stop FILE: stops the samplers; prints "QUEUE_PEAK LATE_MS" (the most records
# queued, and the latest wake-up in milliseconds).
bench_watch_stop() {
  kill "$WATCH_Q" "$WATCH_L" 2>/dev/null || true
  wait "$WATCH_Q" "$WATCH_L" 2>/dev/null || true
  echo "$(awk '$2+0 > m {m = $2+0} END {print m+0}' "$1.queue") $(awk '$2+0 > m {m = $2+0} END {print m+0}' "$1.late")"
}
