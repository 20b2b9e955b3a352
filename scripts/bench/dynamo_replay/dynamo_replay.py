"""Replays a Mooncake trace with NVIDIA Dynamo's own mocker trace replay (ai-dynamo 1.6.1).

Prints one JSON object per router mode: Dynamo's summary figures that compare with
`kvroute replay` (token hit rate, TTFT). Run by run.sh inside its virtualenv.
"""

import argparse
import json
import time

from dynamo.replay import run_trace_replay


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--num-gpu-blocks", type=int, default=200_000)
    parser.add_argument("--router-mode", action="append", default=[])
    args = parser.parse_args()
    for mode in args.router_mode or ["kv_router", "round_robin"]:
        start = time.time()
        report = run_trace_replay(
            args.trace,
            num_workers=args.workers,
            router_mode=mode,
            extra_engine_args={
                "engine": {
                    "block_size": args.block_size,
                    "num_gpu_blocks": args.num_gpu_blocks,
                }
            },
        )
        summary = report.summary
        print(
            json.dumps(
                {
                    "router_mode": mode,
                    "workers": args.workers,
                    "block_size": args.block_size,
                    "num_gpu_blocks": args.num_gpu_blocks,
                    "requests": summary["completed_requests"],
                    "token_hit_rate": summary["prefix_cache_reused_ratio"],
                    "ttft_ms": {
                        "mean": summary["mean_ttft_ms"],
                        "p50": summary["median_ttft_ms"],
                        "p90": summary["p90_ttft_ms"],
                        "p99": summary["p99_ttft_ms"],
                        "max": summary["max_ttft_ms"],
                    },
                    "wall_seconds": round(time.time() - start, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
