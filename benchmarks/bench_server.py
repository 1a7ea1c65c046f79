"""Load benchmark for `looplm serve`: throughput and latency at several concurrency levels.

    python benchmarks/bench_server.py                          # the embedded model, concurrency 1, 4, 16
    python benchmarks/bench_server.py --model 1.4b --max-tokens 8 --requests 1 --time-limit 900

Starts `looplm serve` as a subprocess on 127.0.0.1 (a free port; nothing leaves loopback), then
for each concurrency level runs that many client threads, each sending streaming
/v1/completions requests back to back until the level's request count is done or its time
budget is spent. Per request it records the time to the first text chunk (TTFT) and the time
per output token after the first (TPOT = (end - first chunk) / (completion_tokens - 1), tokens
from the `usage` chunk). Prints one table row per level and, last, one JSON line.

`--model embedded` is the default tiny random model; `--model 1.4b` writes (once) a random
checkpoint with the Ouro-1.4B shape and a word-level tokenizer over its whole vocabulary, so
that every generated id decodes to text and TTFT is exact. On the byte-level embedded model a
random byte may be held back until its UTF-8 character completes, so its TTFT can include a
token or two. Everything is bounded by `--time-limit`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

SHAPE_1_4B = {
    "architectures": ["OuroForCausalLM"], "model_type": "ouro", "vocab_size": 49152, "hidden_size": 2048,
    "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 65536, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "total_ut_steps": 4, "early_exit_threshold": 1.0,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "bfloat16",
}


def word_level_tokenizer(vocab_size: int):  # noqa: ANN201
    """Token i <-> the word "w{i}": every id decodes to text (a bench-only tokenizer)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    from looplm.tokenizer import Tokenizer

    tok = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return Tokenizer(tok, bos_token=None, eos_token="w0", pad_token="w0")


def checkpoint_1_4b(workdir: Path) -> Path:
    from looplm.default_model import write_random_checkpoint

    target = workdir / "ouro-1.4b-shape-random-v1"
    if not (target / "model.safetensors").exists():
        print(f"writing the 1.4B-shape random checkpoint to {target} (2.9 GB, once)", file=sys.stderr)
        write_random_checkpoint(target, SHAPE_1_4B, seed=0, with_tokenizer=False)
        word_level_tokenizer(SHAPE_1_4B["vocab_size"]).save(target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str | None, port: int, max_batch: int, dtype: str, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "looplm", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(max_batch), "--dtype", dtype, "--device", "cpu"]
    if threads:
        command += ["--threads", str(threads)]
    if model_dir:
        command += ["-m", model_dir]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, server: subprocess.Popen, deadline: float) -> str:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).json()["model"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.5)
    raise SystemExit("the server did not come up in time")


def one_request(client: httpx.Client, url: str, name: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - start, "tpot": (end - first) / (tokens - 1) if tokens > 1 else None,
            "tokens": tokens, "latency": end - start}


def run_level(url: str, name: str, prompt: str, concurrency: int, requests: int, max_tokens: int,
              budget_s: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    issued = [0]
    stop_at = time.monotonic() + budget_s

    def client_loop() -> None:
        with httpx.Client(timeout=None) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if issued[0] >= requests:
                        return
                    issued[0] += 1
                result = one_request(client, url, name, prompt, max_tokens)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)

    def pct(key: str, q: float) -> float | None:
        values = sorted(r[key] for r in results if r[key] is not None)
        if not values:
            return None
        return values[min(len(values) - 1, round(q * (len(values) - 1)))]

    return {
        "concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": round(wall, 2),
        "tok_s": round(tokens / wall, 2) if wall else 0.0,
        "ttft_p50_s": pct("ttft", 0.5), "ttft_p99_s": pct("ttft", 0.99),
        "tpot_p50_s": pct("tpot", 0.5), "tpot_p99_s": pct("tpot", 0.99),
        "latency_mean_s": statistics.mean(r["latency"] for r in results) if results else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, 1.4b, or a model directory")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32, help="prompt length (about this many tokens)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: torch's)")
    parser.add_argument("--time-limit", type=float, default=300, help="seconds for the whole run (server start included)")
    parser.add_argument("--workdir", default=None, help="where the 1.4b checkpoint goes (default: $LOOPLM_HOME/bench)")
    args = parser.parse_args()
    deadline = time.monotonic() + args.time_limit
    levels = [int(c) for c in args.concurrency.split(",")]

    model_dir, prompt = None, " ".join(["hello"] * args.prompt_words)
    if args.model == "1.4b":
        from looplm.default_model import looplm_home

        model_dir = str(checkpoint_1_4b(Path(args.workdir) if args.workdir else looplm_home() / "bench"))
        prompt = " ".join(f"w{100 + i}" for i in range(args.prompt_words))
    elif args.model != "embedded":
        model_dir = args.model

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(model_dir, port, max(levels), args.dtype, args.threads)
    try:
        name = wait_ready(url, server, deadline)
        with httpx.Client(timeout=None) as client:  # warm-up: first-call allocations, thread pools
            one_request(client, url, name, prompt, 2)
        rows = []
        for i, concurrency in enumerate(levels):
            budget = (deadline - time.monotonic()) / (len(levels) - i)
            rows.append(run_level(url, name, prompt, concurrency, concurrency * args.requests, args.max_tokens,
                                  budget))
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(f"model {args.model} ({args.dtype}), {args.prompt_words}-word prompt, max_tokens {args.max_tokens}, "
          f"{os.cpu_count()} CPUs, server threads {args.threads or 'default'}")
    print(f"{'conc':>5} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}ms"

    for row in rows:
        print(f"{row['concurrency']:>5} {row['requests']:>5} {row['tokens']:>7} {row['tok_s']:>8.2f} "
              f"{ms(row['ttft_p50_s']):>9} {ms(row['ttft_p99_s']):>9} {ms(row['tpot_p50_s']):>9} "
              f"{ms(row['tpot_p99_s']):>9}")
    base = rows[0]["tok_s"] if rows and rows[0]["concurrency"] == 1 else None
    speedups = {r["concurrency"]: round(r["tok_s"] / base, 2) for r in rows} if base else {}
    print(json.dumps({"model": args.model, "dtype": args.dtype, "max_tokens": args.max_tokens, "threads": args.threads,
                      "levels": rows, "speedup_vs_1": speedups}))


if __name__ == "__main__":
    main()
