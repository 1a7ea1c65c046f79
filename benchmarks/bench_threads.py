"""Decode speed by thread count, on an idle machine and beside other busy processes.

torch's CPU ops and looplm's kernels split each op over the intra-op threads and wait for all of
them at its end. A small model runs thousands of short ops per token, so when another process
holds a core, a thread that the scheduler has set aside keeps every other one waiting. This
measures what that costs, side by side in one run: each cell is a fresh process (its own
`torch.set_num_threads`) generating greedy tokens with eos off, while 0..N spinning processes
("other load") hold cores; cells take turns over the rounds.

    python benchmarks/bench_threads.py                        # embedded model, 1 and 2 threads, load 0 and 1
    python benchmarks/bench_threads.py --model smollm2 --tokens 64
    python benchmarks/bench_threads.py --threads 2 --env "" OMP_WAIT_POLICY=PASSIVE   # OpenMP's wait policy

`--env` gives environment settings to compare (each cell's process gets one; "" is none), e.g.
OpenMP's `OMP_WAIT_POLICY` (a thread that finished its share spins, or sleeps, until the rest
are done) or libgomp's `GOMP_SPINCOUNT`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

MODELS = {"tiny-ouro": "-", "smollm2": "asset:smollm2-gguf"}  # else --model is a checkpoint directory

CELL = """
import json, sys, torch, looplm
from looplm.assets import fetch_asset
threads, source, tokens = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
if source.startswith("asset:"):
    source = str(fetch_asset(source[len("asset:"):]))
model = looplm.load(source if source != "-" else None)
ids = model.tokenizer.encode("Once upon a time")
model.generate(ids, 4, eos_token_ids=[])  # warm up
_, stats = model.generate(ids, tokens, eos_token_ids=[], return_stats=True)
print(json.dumps({"decode_tok_s": stats.decode_tok_s}))
"""


def spin() -> None:
    while True:
        pass


def run_cell(threads: int, env: str, source: str, tokens: int) -> float:
    settings = dict(item.split("=", 1) for item in env.split(",") if item)
    out = subprocess.run([sys.executable, "-c", CELL, str(threads), source, str(tokens)],
                         capture_output=True, text=True, check=True, env={**os.environ, **settings})
    return json.loads(out.stdout.strip().splitlines()[-1])["decode_tok_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-ouro", help=f"{', '.join(MODELS)} or a checkpoint directory")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1], help="spinning processes beside the cell")
    parser.add_argument("--env", nargs="+", default=[""], help="environment settings to compare: "
                        "KEY=VALUE[,KEY=VALUE] per cell, \"\" for none")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    source = MODELS.get(args.model, args.model)
    columns = [(t, e) for t in args.threads for e in args.env]
    speeds: dict[tuple[int, str, int], list[float]] = {(t, e, n): [] for n in args.loads for t, e in columns}
    for _ in range(args.rounds):
        for load in args.loads:
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(load)]
            for process in spinners:
                process.start()
            time.sleep(0.5)
            try:
                for threads, env in columns:
                    speeds[threads, env, load].append(run_cell(threads, env, source, args.tokens))
            finally:
                for process in spinners:
                    process.kill()
                    process.join()
    print(f"{args.model}: decode tok/s, {args.tokens} greedy tokens, median [min-max] over {args.rounds} rounds; "
          f"{os.cpu_count()} logical CPUs")
    print("| other load (busy processes) | "
          + " | ".join(f"{t} thread{'s' if t > 1 else ''}{', ' + e if e else ''}" for t, e in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for load in args.loads:
        cells = [speeds[t, e, load] for t, e in columns]
        print(f"| {load} | " + " | ".join(f"{statistics.median(c):.1f} [{min(c):.1f}-{max(c):.1f}]" for c in cells)
              + " |")
    print(json.dumps({"model": args.model, "tokens": args.tokens,
                      "speeds": {f"{t}t{'-' + e if e else ''}-load{n}": v for (t, e, n), v in speeds.items()}}))


if __name__ == "__main__":
    main()
