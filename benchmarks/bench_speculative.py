"""Self-speculative decoding, acceptance and round costs: `python benchmarks/bench_speculative.py --help`."""

from looplm.bench_speculative import main

if __name__ == "__main__":
    raise SystemExit(main())
