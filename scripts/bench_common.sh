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
