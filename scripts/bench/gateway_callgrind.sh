#!/usr/bin/env bash
# Instructions per request in the kvroute gateway, measured with callgrind (stable on a noisy
# machine, unlike wall-clock time): nats-server, 2 `kvroute worker-sim` with infinite speeds and
# `kvroute serve --no-snapshots` under `valgrind --tool=callgrind --instr-atstart=no`, as in
# scripts/bench/gateway_vs_sglang.sh. After an uninstrumented warm-up, instrumentation is switched on
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

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUT:-$(mktemp -d)}"
IMG_REQUESTS="${IMG_REQUESTS:-100}"
TEXT_REQUESTS="${TEXT_REQUESTS:-200}"
mkdir -p "$OUT"
for tool in valgrind callgrind_control; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

# shellcheck source=scripts/bench/fleet.sh
. "$ROOT/benches/fleet.sh"
start_fleet 2

start_gateway kvroute valgrind --tool=callgrind --instr-atstart=no \
  --callgrind-out-file="$OUT/callgrind.out.%p" "$KVROUTE"
TARGET=(--target "kvroute=$GATEWAY_URL" --warmup 0 --rounds 1 --concurrency 1)

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
