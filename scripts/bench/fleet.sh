# Shared by the benchmark scripts (sourced, not run): builds kvroute and loadgen in release,
# and starts on loopback, each on a free port, nats-server and simulated workers whose own time
# is zero (infinite prefill and decode speed), so that what a router adds is not hidden under
# modelled inference time. Everything started is stopped on exit.
#
# Expects ROOT and TARGET_DIR. Sets KVROUTE, LOADGEN, TMP (logs), PIDS; after start_fleet N:
# NATS (its URL), WORKER_FLAGS (--worker id=url ...) and WORKER_URLS; after start_gateway:
# GATEWAY_URL and GATEWAY_PID.

command -v nats-server >/dev/null || { echo "nats-server is needed (apt-get install nats-server)" >&2; exit 1; }

echo "building kvroute (release)" >&2
(cd "$ROOT" && cargo build -q --release --locked -p kvroute --bin kvroute --example loadgen)
KVROUTE="$TARGET_DIR/release/kvroute"
LOADGEN="$TARGET_DIR/release/examples/loadgen"

TMP="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until GET $1 answers 200 (60 s at most: a gateway under valgrind starts slowly).
wait_ok() {
  for _ in $(seq 600); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ]; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not become ready; logs in $TMP:" >&2
  tail -n 20 "$TMP"/*.log >&2
  exit 1
}

# start_fleet N: nats-server and N simulated workers, ready when it returns.
start_fleet() {
  local port i
  port="$(free_port)"
  nats-server -js -a 127.0.0.1 -p "$port" -sd "$TMP/js" >"$TMP/nats.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  NATS="nats://127.0.0.1:$port"
  WORKER_FLAGS=()
  WORKER_URLS=()
  for i in $(seq "$1"); do
    port="$(free_port)"
    RUST_LOG=warn "$KVROUTE" worker-sim --worker-id "$i" --listen "127.0.0.1:$port" --nats-url "$NATS" \
      --prefill-tokens-per-second inf --decode-tokens-per-second inf >"$TMP/worker$i.log" 2>&1 &
    PIDS+=($!)
    WORKER_FLAGS+=(--worker "$i=http://127.0.0.1:$port")
    WORKER_URLS+=("http://127.0.0.1:$port")
  done
  for url in "${WORKER_URLS[@]}"; do wait_ok "$url/health"; done
}

# start_gateway LOG COMMAND...: `COMMAND serve --no-snapshots` (a kvroute binary, or one behind a
# wrapper such as valgrind) on a free port in front of the fleet, logging to $TMP/LOG.log; ready
# when it returns.
start_gateway() {
  local log="$1" port
  shift
  port="$(free_port)"
  RUST_LOG=warn "$@" serve --listen "127.0.0.1:$port" --nats-url "$NATS" --no-snapshots \
    "${WORKER_FLAGS[@]}" >"$TMP/$log.log" 2>&1 &
  GATEWAY_PID=$!
  PIDS+=($!)
  GATEWAY_URL="http://127.0.0.1:$port"
  wait_ok "$GATEWAY_URL/ready"
}

# CPU seconds (user + system) process $1 has used.
cpu_seconds() { awk -v tck="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / tck}' "/proc/$1/stat"; }
