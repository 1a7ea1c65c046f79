"""Decode speed under exit policies and KV modes: `python benchmarks/bench_exit.py --help`."""

from looplm.bench_exit import main

if __name__ == "__main__":
    raise SystemExit(main())
