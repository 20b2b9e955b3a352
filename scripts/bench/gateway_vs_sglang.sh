#!/usr/bin/env bash
# kvroute's gateway side by side with SGLang's router (PyPI sglang-router, cache_aware policy)
# in front of the same simulated workers, all on loopback, in one run:
#   added latency (p50/p99 versus calling a worker directly) for a text and a ~500 KB image
#   chat request, streamed and not, at concurrency 1, the targets alternating request by
#   request; then throughput at concurrency 64. Each scenario also prints the share of CPU time
#   the hypervisor stole from this machine meanwhile: latency tails under steal are the host's.
# Prints markdown tables (docs/benchmarks.md has the figures and how to read them).
#
# Not part of CI: it installs sglang-router into a virtualenv and takes minutes.
#
# Environment (all optional):
#   SGLANG_VENV      virtualenv with sglang-router (default /work/venv-sglang; created if absent)
#   SGLANG_ROUTER    sglang-router version pip installs (default 0.3.2)
#   WORKERS          simulated workers (default 2)
#   LAT_REQUESTS     measured requests per target, text latency scenarios (default 2000)
#   IMG_REQUESTS     measured requests per target, image latency scenarios (default 1000)
#   TPUT_REQUESTS    measured requests per target, throughput scenarios (default 6000; image: a quarter)
#   MAX_TOKENS       max_tokens of every request (default 4)
#   OUT              also write the tables to this file
#   ONLY             run only the scenarios whose title matches this bash regex (e.g. 'text')
#   MAX_STEAL        percent of CPU time the hypervisor may steal during a scenario before it is
#                    measured again (default 5; every attempt is printed)
#   ATTEMPTS         runs of a scenario at most (default 3)
#
# If socat is installed, the latency scenarios also measure a plain TCP relay to the same
# worker (`tcp-relay`): no parsing, no routing, the floor of what any router's extra hop adds
# on this machine.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${SGLANG_VENV:-/work/venv-sglang}"
SGLANG_ROUTER="${SGLANG_ROUTER:-0.3.2}"
WORKERS="${WORKERS:-2}"
LAT_REQUESTS="${LAT_REQUESTS:-2000}"
IMG_REQUESTS="${IMG_REQUESTS:-1000}"
TPUT_REQUESTS="${TPUT_REQUESTS:-6000}"
MAX_TOKENS="${MAX_TOKENS:-4}"
OUT="${OUT:-}"
MAX_STEAL="${MAX_STEAL:-5}"
ATTEMPTS="${ATTEMPTS:-3}"

if ! "$VENV/bin/python" -c 'import sglang_router' 2>/dev/null; then
  echo "installing sglang-router $SGLANG_ROUTER into $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "sglang-router==$SGLANG_ROUTER"
fi
# shellcheck source=scripts/bench/fleet.sh
. "$ROOT/benches/fleet.sh"
start_fleet "$WORKERS"

start_gateway kvroute "$KVROUTE"
KVROUTE_PID=$GATEWAY_PID

SGLANG_PORT="$(free_port)"
"$VENV/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port "$SGLANG_PORT" \
  --policy cache_aware --worker-urls "${WORKER_URLS[@]}" \
  --prometheus-host 127.0.0.1 --prometheus-port "$(free_port)" --log-level warn \
  >"$TMP/sglang.log" 2>&1 &
SGLANG_PID=$!
PIDS+=($!)
wait_ok "http://127.0.0.1:$SGLANG_PORT/health"

RELAY=()
if command -v socat >/dev/null; then
  RELAY_PORT="$(free_port)"
  socat "TCP-LISTEN:$RELAY_PORT,bind=127.0.0.1,fork,reuseaddr,nodelay" \
    "TCP:${WORKER_URLS[0]#http://},nodelay" >"$TMP/socat.log" 2>&1 &
  PIDS+=($!)
  wait_ok "http://127.0.0.1:$RELAY_PORT/health"
  RELAY=(--target "tcp-relay=http://127.0.0.1:$RELAY_PORT")
fi

DIRECT="direct=${WORKER_URLS[0]}"
KV="kvroute=$GATEWAY_URL"
SG="sglang-router=http://127.0.0.1:$SGLANG_PORT"
COMMON=(--max-tokens "$MAX_TOKENS")

report() { if [ -n "$OUT" ]; then tee -a "$OUT"; else cat; fi; }
[ -n "$OUT" ] && : >"$OUT"

{
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "kvroute $(git -C "$ROOT" rev-parse --short HEAD), sglang-router $("$VENV/bin/pip" show sglang-router | sed -n 's/^Version: //p'), $WORKERS simulated workers"
  echo
} | report

# CPU ticks of the whole machine: "total stolen" (stolen: time the hypervisor ran something
# else while a vCPU had work; tails measured under steal are the host's, not the routers').
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $9 }' /proc/stat; }


# scenario TITLE REQUESTS_PER_TARGET WARMUP LOADGEN_ARGS...: one loadgen run, then the share of
# CPU time the hypervisor stole meanwhile and the CPU each router process used per request it
# received (its own turns plus, for kvroute, the KV events it ingests while the others run).
# A run with more steal than MAX_STEAL is printed, then measured again (ATTEMPTS runs at most).
scenario() {
  local title="$1" requests="$2" warmup="$3"
  shift 3
  if [ -n "${ONLY:-}" ] && ! [[ "$title" =~ $ONLY ]]; then return 0; fi
  echo "#### $title"
  echo
  local attempt kv0 sg0 ticks0 steal
  for attempt in $(seq "$ATTEMPTS"); do
    kv0="$(cpu_seconds "$KVROUTE_PID")"
    sg0="$(cpu_seconds "$SGLANG_PID")"
    ticks0="$(cpu_ticks)"
    "$LOADGEN" "${COMMON[@]}" --requests "$requests" --warmup "$warmup" "$@"
    echo
    steal="$(echo "$ticks0 $(cpu_ticks)" | awk '{ printf "%.1f", ($4 - $2) / ($3 - $1 + 1e-9) * 100 }')"
    echo "CPU time stolen by the hypervisor: $steal%"
    awk -v kv="$(cpu_seconds "$KVROUTE_PID")" -v kv0="$kv0" -v sg="$(cpu_seconds "$SGLANG_PID")" -v sg0="$sg0" \
      -v n="$((requests + warmup))" 'BEGIN { printf "router CPU per request: kvroute %.0f µs, sglang-router %.0f µs\n", (kv - kv0) / n * 1e6, (sg - sg0) / n * 1e6 }'
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
    if awk -v s="$steal" -v max="$MAX_STEAL" 'BEGIN { exit !(s <= max) }'; then break; fi
    if [ "$attempt" -lt "$ATTEMPTS" ]; then
      echo "More than $MAX_STEAL% stolen: measuring again (attempt $((attempt + 1)) of $ATTEMPTS)."
    else
      echo "More than $MAX_STEAL% stolen in every attempt: these tails include the hypervisor's."
    fi
    echo
  done
}

{
  T3=(--target "$DIRECT" --target "$KV" --target "$SG")
  LAT=("${T3[@]}" "${RELAY[@]}")
  scenario "Added latency, text" "$LAT_REQUESTS" 50 "${LAT[@]}" --kind text --concurrency 1 --rounds "$LAT_REQUESTS"
  scenario "Added latency, text, streamed" "$LAT_REQUESTS" 50 "${LAT[@]}" --kind text --stream --concurrency 1 --rounds "$LAT_REQUESTS"
  scenario "Added latency, image" "$IMG_REQUESTS" 20 "${LAT[@]}" --kind image --concurrency 1 --rounds "$IMG_REQUESTS"
  scenario "Added latency, image, streamed" "$IMG_REQUESTS" 20 "${LAT[@]}" --kind image --stream --concurrency 1 --rounds "$IMG_REQUESTS"
  scenario "Throughput, text, concurrency 64" "$TPUT_REQUESTS" 256 "${T3[@]}" --kind text --concurrency 64
  scenario "Throughput, text, streamed, concurrency 64" "$TPUT_REQUESTS" 256 "${T3[@]}" --kind text --stream --concurrency 64
  scenario "Throughput, image, concurrency 64" "$((TPUT_REQUESTS / 4))" 128 "${T3[@]}" --kind image --concurrency 64
} | report
