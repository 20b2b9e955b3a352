#!/usr/bin/env bash
# kvroute replay side by side with NVIDIA Dynamo's own mocker trace replay (ai-dynamo 1.6.1)
# on the same trace, worker count and block size, with no eviction. Not part of CI: it installs
# Dynamo's wheels (about 80 MB) into a virtualenv.
#
#   scripts/bench/dynamo_replay/run.sh [TRACE.jsonl[.gz]] [WORKERS]
#
# Writes target/dynamo-replay/{dynamo.jsonl,kvroute.json} and prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/../../.."
TRACE=${1:-tests/fixtures/traces/conversation_trace.jsonl.gz}
WORKERS=${2:-16}
BLOCK_SIZE=512
VENV=${VENV:-target/venv-dynamo}
OUT=target/dynamo-replay
mkdir -p "$OUT"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import dynamo.replay' 2>/dev/null; then
    # ai-dynamo 1.6.1 depends on aisimulate, a placeholder on PyPI that downloads the real wheel
    # from NVIDIA's own index at install time. The replay itself lives in ai-dynamo-runtime's
    # native module, so install ai-dynamo without its dependencies and add the few modules the
    # replay entry point imports.
    "$VENV/bin/pip" install -q 'ai-dynamo-runtime==1.6.1'
    "$VENV/bin/pip" install -q --no-deps 'ai-dynamo==1.6.1'
    "$VENV/bin/pip" install -q aiohttp msgspec packaging prometheus-client pyyaml pyzmq tqdm \
        typing-extensions zstandard
fi

plain="$OUT/trace.jsonl"
case "$TRACE" in
    *.gz) gzip -dc "$TRACE" > "$plain" ;;
    *) cp "$TRACE" "$plain" ;;
esac

echo "== Dynamo 1.6.1 mocker replay (kv_router, round_robin), $WORKERS workers" >&2
DYN_LOG=warn RUST_LOG=warn "$VENV/bin/python" scripts/bench/dynamo_replay/dynamo_replay.py "$plain" \
    --workers "$WORKERS" --block-size "$BLOCK_SIZE" > "$OUT/dynamo.jsonl"

echo "== kvroute replay, $WORKERS workers" >&2
cargo run -q --release -p kvroute -- replay trace "$plain" --workers "$WORKERS" \
    --block-size "$BLOCK_SIZE" --json "$OUT/kvroute.json"

python3 - "$OUT/dynamo.jsonl" "$OUT/kvroute.json" <<'PY'
import json, sys
dynamo = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
ours = json.load(open(sys.argv[2]))
ideal = ours["ideal"]["token_hit_rate"]
print(f"ideal token hit rate (one infinite cache): {ideal:.4f}\n")
print("| router | token hit rate | of ideal | TTFT p50 (ms) | TTFT p99 (ms) |")
print("|---|---:|---:|---:|---:|")
for d in dynamo:
    name = {"kv_router": "Dynamo kv", "round_robin": "Dynamo round_robin"}[d["router_mode"]]
    t = d["ttft_ms"]
    print(f"| {name} | {d['token_hit_rate']:.4f} | {d['token_hit_rate'] / ideal:.3f} | {t['p50']:.0f} | {t['p99']:.0f} |")
for r in ours["results"]:
    t = r["ttft_ms"]
    print(f"| kvroute {r['policy']} | {r['token_hit_rate']:.4f} | {r['token_hit_rate'] / ideal:.3f} | {t['p50']:.0f} | {t['p99']:.0f} |")
PY
