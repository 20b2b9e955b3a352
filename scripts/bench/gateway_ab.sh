#!/usr/bin/env bash
# Two builds of the kvroute gateway side by side, in front of the same simulated workers, with
# the same requests interleaved (as scripts/bench/gateway_vs_sglang.sh does for routers): latency at
# concurrency 1 (text and image, the targets alternating request by request) and throughput at
# concurrency 64, REPS times; after each scenario, each gateway's CPU per request (its own turns
# plus the KV events it ingests during all of them).
#
# Usage: scripts/bench/gateway_ab.sh OLD_KVROUTE NEW_KVROUTE
#   e.g. git stash; cargo build --release -p kvroute; cp target/release/kvroute /tmp/kvroute-old
#        git stash pop; cargo build --release -p kvroute; cp target/release/kvroute /tmp/kvroute-new
#        scripts/bench/gateway_ab.sh /tmp/kvroute-old /tmp/kvroute-new
#
# Not part of CI. Environment: REPS (default 2). The fleet (nats-server, 2 `kvroute worker-sim`,
# the load generator) is built from this checkout.
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 OLD_KVROUTE NEW_KVROUTE" >&2; exit 2; }
OLD="$1"
NEW="$2"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
REPS="${REPS:-2}"

# shellcheck source=scripts/bench/fleet.sh
. "$ROOT/benches/fleet.sh"
start_fleet 2

TARGETS=(--target "direct=${WORKER_URLS[0]}")
start_gateway old "$OLD"
OLD_PID=$GATEWAY_PID
TARGETS+=(--target "old=$GATEWAY_URL")
start_gateway new "$NEW"
NEW_PID=$GATEWAY_PID
TARGETS+=(--target "new=$GATEWAY_URL")

echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores; old: $OLD, new: $NEW"
for rep in $(seq "$REPS"); do
  # kind, requests per target, concurrency, rounds
  for scenario in "text 2000 1 2000" "image 1000 1 1000" "text 6000 64 5" "image 1500 64 5"; do
    read -r kind requests concurrency rounds <<<"$scenario"
    old0="$(cpu_seconds "$OLD_PID")"
    new0="$(cpu_seconds "$NEW_PID")"
    echo
    echo "#### $kind, concurrency $concurrency (repetition $rep)"
    echo
    "$LOADGEN" --max-tokens 4 --requests "$requests" --warmup 50 --rounds "$rounds" \
      --kind "$kind" --concurrency "$concurrency" "${TARGETS[@]}"
    awk -v o="$(cpu_seconds "$OLD_PID")" -v o0="$old0" \
      -v n="$(cpu_seconds "$NEW_PID")" -v n0="$new0" -v r="$requests" \
      'BEGIN { printf "\ngateway CPU per request: old %.0f µs, new %.0f µs\n", (o - o0) / r * 1e6, (n - n0) / r * 1e6 }'
  done
done
