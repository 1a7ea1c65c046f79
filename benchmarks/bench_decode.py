"""Decode benchmark: random weights with real Ouro shapes, bf16, CPU.

    python benchmarks/bench_decode.py                      # Ouro-1.4B shape, ~5 minutes on 2 cores
    python benchmarks/bench_decode.py --shape tiny --prompt-len 64 --new-tokens 8
    python benchmarks/bench_decode.py --prompt-len 128 --baseline --profile --json-out bench.json

Prints rich tables, then one JSON line (the last stdout line). See docs/benchmarks.md.
"""

import sys

from looplm.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
