#!/usr/bin/env bash
# Instructions per request in the kvroute gateway, measured with callgrind (stable on a noisy
# machine, unlike wall-clock time): nats-server, 2 `kvroute worker-sim` with infinite speeds and
# `kvroute serve --no-snapshots` under `valgrind --tool=callgrind --instr-atstart=no`, as in
# benches/gateway_vs_sglang.sh. After an uninstrumented warm-up, instrumentation is switched on
# for IMG_REQUESTS image requests (the 704 KB JPEG data URL request of loadgen) and dumped, then
# for TEXT_REQUESTS text requests and dumped. Prints instructions per request; the dumps stay
# in OUT for callgrind_annotate.
#
# Not part of CI (valgrind slows the gateway about 50x; it takes about a minute).
#
# Environment (all optional):
#   OUT            directory for callgrind.out.* (default: a new temporary directory)
#   IMG_REQUESTS   measured image requests (default 100)
#   TEXT_REQUESTS  measured text requests (default 200)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$(mktemp -d)}"
IMG_REQUESTS="${IMG_REQUESTS:-100}"
TEXT_REQUESTS="${TEXT_REQUESTS:-200}"
mkdir -p "$OUT"
for tool in valgrind callgrind_control nats-server; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

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
wait_ok() {
  for _ in $(seq 600); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ]; then return 0; fi
    sleep 0.1
  done
  echo "$1 did not become ready; logs in $TMP:" >&2
  tail -n 20 "$TMP"/*.log >&2
  exit 1
}

NATS_PORT="$(free_port)"
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$TMP/js" >"$TMP/nats.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break
  sleep 0.1
done
NATS="nats://127.0.0.1:$NATS_PORT"

WORKER_FLAGS=()
for i in 1 2; do
  port="$(free_port)"
  RUST_LOG=warn "$KVROUTE" worker-sim --worker-id "$i" --listen "127.0.0.1:$port" --nats-url "$NATS" \
    --prefill-tokens-per-second inf --decode-tokens-per-second inf >"$TMP/worker$i.log" 2>&1 &
  PIDS+=($!)
  WORKER_FLAGS+=(--worker "$i=http://127.0.0.1:$port")
  wait_ok "http://127.0.0.1:$port/health"
done

GATEWAY_PORT="$(free_port)"
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out.%p" \
  "$KVROUTE" serve --listen "127.0.0.1:$GATEWAY_PORT" --nats-url "$NATS" --no-snapshots \
  "${WORKER_FLAGS[@]}" >"$TMP/kvroute.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=($!)
wait_ok "http://127.0.0.1:$GATEWAY_PORT/ready"
TARGET=(--target "kvroute=http://127.0.0.1:$GATEWAY_PORT" --warmup 0 --rounds 1 --concurrency 1)

"$LOADGEN" "${TARGET[@]}" --kind image --requests 20 >/dev/null
"$LOADGEN" "${TARGET[@]}" --kind text --requests 50 >/dev/null
callgrind_control -z "$GATEWAY_PID" >/dev/null
callgrind_control -i on "$GATEWAY_PID" >/dev/null
"$LOADGEN" "${TARGET[@]}" --kind image --requests "$IMG_REQUESTS" >/dev/null
callgrind_control -d image "$GATEWAY_PID" >/dev/null
"$LOADGEN" "${TARGET[@]}" --kind text --requests "$TEXT_REQUESTS" >/dev/null
callgrind_control -d text "$GATEWAY_PID" >/dev/null
callgrind_control -i off "$GATEWAY_PID" >/dev/null

echo "kvroute $(git -C "$ROOT" rev-parse --short HEAD), $(date -u '+%Y-%m-%d %H:%M UTC'), dumps in $OUT"
for dump in "$OUT"/callgrind.out.*.*; do
  what="$(sed -n 's/^desc: Trigger: dump //p' "$dump")"
  total="$(sed -n 's/^totals: //p' "$dump")"
  case "$what" in
    image) n="$IMG_REQUESTS" ;;
    text) n="$TEXT_REQUESTS" ;;
    *) continue ;;
  esac
  awk -v w="$what" -v t="$total" -v n="$n" 'BEGIN { printf "%s request: %.2f M instructions (%d requests)\n", w, t / n / 1e6, n }'
done
echo "breakdown: callgrind_annotate --inclusive=no $OUT/callgrind.out.<pid>.1 (image) or .2 (text)"
