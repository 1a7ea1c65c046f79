"""The evaluation loop: configurations, per-item records (JSONL, resumable), sharding, results.

A run evaluates one task under several configurations at once: each loop count of `steps`
read at its last step (`exit_policy="last"`), and each exit policy at the largest loop count.
Log-likelihood tasks get every configuration from one pass per batch (`loglik.py`); generation
tasks decode once per configuration through the serving engine (continuous batching; a static
decoder uses `looplm.generate` in static batches), so exits and `skip_compute` act as in serving.

Every scored (item, configuration) pair is appended to a JSONL records file as soon as it is
known, so a killed run started again with the same records file skips what is done. Records
from shards (`shard=(i, n)`: every n-th item from i) merge into one result with `merge_records`.

results.json (public, stable): `{"task", "model", "metric", "results": [{"steps", "exit_policy",
"exit_threshold", "accuracy", "mean_steps", "n"}, ...]}`, one entry per configuration.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from looplm.errors import LooplmError
from looplm.eval.loglik import Config, encode_pair, score_choices, score_requests
from looplm.eval.tasks import Item, Task, get_task, select_items
from looplm.exit import POLICY_NAMES, make_policy
from looplm.server import DEFAULT_PREFIX_CACHE_MB

Progress = Callable[[int], None]  # called with the number of units just finished


@dataclass
class EvalSettings:
    task: str
    steps: list[int]
    policies: list[tuple[str, float | None]] = field(default_factory=list)  # (name, threshold) at max steps
    limit: int | None = None
    batch_size: int = 8
    shard: tuple[int, int] | None = None
    chat: bool | None = None  # None: chat template for generation tasks, plain text for loglik tasks
    num_fewshot: int = 0
    max_new_tokens: int | None = None
    allow_code_execution: bool = False
    skip_compute: bool = False
    kv_mode: str = "full"  # generation tasks: "shared" keeps one K/V per layer for decoded tokens
    decoder: str = "dynamic"  # generation tasks: the decode step (looplm.generate.DECODERS)
    # Generation tasks on the dynamic step: MiB of finished answers' K/V kept for prompts that start
    # the same way (few-shot examples), so only the rest of a prompt is prefilled; 0: off.
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB
    code_timeout_s: float = 10.0

    def configs(self) -> list[Config]:
        configs = [Config(s) for s in self.steps]
        configs += [Config(max(self.steps), name, threshold) for name, threshold in self.policies]
        seen: dict[str, Config] = {}
        for config in configs:
            seen.setdefault(config.key, config)
        return list(seen.values())


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise LooplmError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise LooplmError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return index, count


def parse_policies(text: str | None, default_threshold: float | None = None) -> list[tuple[str, float | None]]:
    """`"gate:0.5,gate:0.9,confidence,weighted"` -> [(name, threshold), ...]."""
    policies = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, value = part.partition(":")
        if name not in POLICY_NAMES:
            raise LooplmError(f"--exit-policy names must be among {', '.join(POLICY_NAMES)}, got {name!r}")
        try:
            threshold = float(value) if value else default_threshold
        except ValueError:
            raise LooplmError(f"--exit-policy threshold must be a number, got {part!r}") from None
        if name in ("last", "fixed", "weighted"):
            threshold = None
        policies.append((name, threshold))
    return policies


# -- records -----------------------------------------------------------------------------------


# Header keys that change the answers: records made under other values are not this run's.
# (Loop counts and exit policies are per row: a resumed run may add or drop configurations.)
# A key an older records file lacks is not compared.
SETTINGS_KEYS = ("task", "model", "metric", "chat", "num_fewshot", "max_new_tokens", "skip_compute", "kv_mode",
                 "decoder", "dtype", "quantization")
ROW_KEYS = ("id", "key", "steps", "exit_policy", "exit_threshold", "correct", "step_sum", "step_count")


class Records:
    """Append-only JSONL: a header line, then one line per scored (item, configuration)."""

    def __init__(self, path: Path | None, header: dict) -> None:
        self.path, self.header = path, header
        self.rows: list[dict] = []
        if path is not None and path.exists() and path.stat().st_size:
            lines = read_records(path)
            if not lines or not isinstance(lines[0].get("header"), dict):
                raise LooplmError(f"{path} is not a looplm eval records file (its first line is no header); "
                                  "delete it or pass another --records file")
            old = lines[0]["header"]
            for key in SETTINGS_KEYS:
                if key in old and old[key] != header.get(key):
                    raise LooplmError(f"{path} holds records made with {key} {old[key]!r}, not {header.get(key)!r}; "
                                      "rerun with the same settings, or delete it or pass another --records file")
            self.rows = record_rows(path, lines)
            if not path.read_bytes().endswith(b"\n"):  # a killed run left half a line: drop it
                text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in [lines[0], *self.rows])
                path.write_text(text, encoding="utf-8")
        elif path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LooplmError(f"cannot create the folder of the records file {path} "
                                  f"({exc.strerror or exc})") from None
            self._append(json.dumps({"header": header}) + "\n", mode="w")
        self.done = {(row["id"], row["key"]) for row in self.rows}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.done.add((row["id"], row["key"]))
        if self.path is not None:  # one line per write: a crash loses one row at most
            self._append(json.dumps(row, ensure_ascii=False) + "\n")

    def _append(self, text: str, mode: str = "a") -> None:
        try:
            with self.path.open(mode, encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:  # e.g. the disk is full
            raise LooplmError(f"could not write the records file {self.path} ({exc.strerror or exc}); the items "
                              "scored before are in it, and a rerun with it goes on from them") from None


def record_rows(path: Path, lines: list[dict]) -> list[dict]:
    """The scored rows after the header; a LooplmError naming the line of a row that lacks a field."""
    rows = []
    for number, row in enumerate(lines[1:], 2):
        if not isinstance(row, dict) or any(key not in row for key in ROW_KEYS):
            missing = [key for key in ROW_KEYS if not isinstance(row, dict) or key not in row]
            raise LooplmError(f"{path}:{number} is not a looplm eval record (no {', '.join(missing)}); "
                              "the records file is corrupt")
        rows.append(row)
    return rows


def read_records(path: Path) -> list[dict]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            if number < len(lines):
                raise LooplmError(f"{path}:{number} is not JSON; the records file is corrupt") from None
    return rows


def summarize(task: str, model: str, metric: str, configs: list[Config], rows: list[dict],
              ids: set[str] | None = None) -> dict:
    """results.json from records (`ids`: only these items; duplicates of an (item, config) count once)."""
    unique: dict[tuple[str, str], dict] = {}
    for row in rows:
        if ids is None or row["id"] in ids:
            unique.setdefault((row["id"], row["key"]), row)
    results = []
    for config in configs:
        picked = [row for (_, key), row in unique.items() if key == config.key]
        count = sum(row["step_count"] for row in picked)
        results.append({
            **config.as_dict(),
            # None when nothing was scored (an empty shard): 0.0 would read as a measured zero
            "accuracy": sum(bool(row["correct"]) for row in picked) / len(picked) if picked else None,
            "mean_steps": sum(row["step_sum"] for row in picked) / count if count else None,
            "n": len(picked),
        })
    return {"task": task, "model": model, "metric": metric, "results": results}


def merge_records(paths: list[Path]) -> dict:
    """One results dict from the records files of several shards (or resumed runs)."""
    if not paths:
        raise LooplmError("looplm eval merge needs at least one records (.jsonl) file")
    header, rows = None, []
    for path in paths:
        if not path.is_file():
            raise LooplmError(f"{path} not found; pass the records .jsonl files the shards wrote")
        lines = read_records(path)
        this = lines[0].get("header") if lines and isinstance(lines[0], dict) else None
        if not isinstance(this, dict) or not {"task", "model"} <= this.keys():
            raise LooplmError(f"{path} has no header line; is it a looplm eval records file?")
        if header is not None:
            for key in SETTINGS_KEYS:
                if key in this and key in header and this[key] != header[key]:
                    raise LooplmError(f"{path} was made with {key} {this[key]!r}, {paths[0]} with {header[key]!r}; "
                                      "merge runs of one task, model and settings")
        header = header or this
        rows += record_rows(path, lines)
    configs, seen = [], set()
    for row in rows:
        if row["key"] not in seen:
            seen.add(row["key"])
            configs.append(Config(row["steps"], row["exit_policy"], row["exit_threshold"]))
    configs.sort(key=lambda c: (c.exit_policy != "last", c.steps, c.exit_policy, c.exit_threshold or 0.0))
    return summarize(header["task"], header["model"], header.get("metric", ""), configs, rows)


# -- the run -----------------------------------------------------------------------------------


def plan(settings: EvalSettings) -> tuple[Task, list[Item]]:
    task = get_task(settings.task)
    if task.kind == "loglik":  # one scoring pass, no decoding: these would be silently ignored
        ignored = [flag for flag, given in (("--skip-compute", settings.skip_compute),
                                            ("--kv-mode shared", settings.kv_mode != "full"),
                                            ("--max-new-tokens", settings.max_new_tokens is not None)) if given]
        if ignored:
            raise LooplmError(f"{task.name} is scored by log-likelihood, with no decoding: {', '.join(ignored)} "
                              "applies to generation tasks only")
    if task.needs_code_execution and not settings.allow_code_execution:
        raise LooplmError(f"{task.name} runs model-written code; pass --allow-code-execution to allow it "
                          "(each program runs in a subprocess with a timeout and no network)")
    items = select_items(task.load(settings.num_fewshot), settings.limit, settings.shard)
    return task, items


def run_eval(model, settings: EvalSettings, records_path: Path | None = None,  # noqa: ANN001
             progress: Callable[[int], Progress] | None = None) -> dict:
    """Evaluate; `progress(total_units)` returns the callback advanced as units finish."""
    task, items = plan(settings)
    if model.tokenizer is None:
        raise LooplmError("evaluation needs the model's tokenizer; this model was loaded without one")
    configs = [_with_threshold(model, config) for config in settings.configs()]
    for config in configs:
        model.resolve_steps(config.steps)  # validates the range before any work
    _policies(model, configs)  # thresholds are checked before any work, as generate checks them
    quantization = getattr(model, "quantization", None)
    header = {"task": task.name, "model": model.source, "metric": task.metric,
              "chat": settings.chat, "num_fewshot": settings.num_fewshot, "max_new_tokens": settings.max_new_tokens,
              "skip_compute": settings.skip_compute, "kv_mode": settings.kv_mode, "decoder": settings.decoder,
              "dtype": str(model.dtype).removeprefix("torch."),
              "quantization": None if quantization is None else quantization.to_json()}
    records = Records(records_path, header)
    if task.kind == "loglik":
        _run_loglik(model, task, items, configs, settings, records, progress)
    else:
        _run_generate(model, task, items, configs, settings, records, progress)
    return summarize(task.name, model.source, task.metric, configs, records.rows, {item.id for item in items})


def _with_threshold(model, config: Config) -> Config:  # noqa: ANN001
    """A policy named without a threshold gets its default (e.g. confidence 0.9), written into the results."""
    if config.exit_policy == "last" or config.exit_threshold is not None:
        return config
    policy = make_policy(config.exit_policy, None, config.steps, model.config.early_exit_threshold,
                         model.config.early_exit_step)
    return Config(config.steps, config.exit_policy, getattr(policy, "threshold", None))


def _policies(model, configs: list[Config]) -> dict:  # noqa: ANN001
    config = model.config
    return {c.key: make_policy(c.exit_policy, c.exit_threshold, c.steps, config.early_exit_threshold,
                               config.early_exit_step)
            for c in configs if c.exit_policy != "last"}


def _run_loglik(model, task: Task, items: list[Item], configs: list[Config], settings: EvalSettings,  # noqa: ANN001
                records: Records, progress: Callable[[int], Progress] | None) -> None:
    tokenizer = model.tokenizer
    pending = [item for item in items if any((item.id, c.key) not in records.done for c in configs)]
    advance = progress(len(pending)) if progress else None
    policies = _policies(model, configs)
    chunk_items = max(1, settings.batch_size // 4)  # items per progress update
    for start in range(0, len(pending), chunk_items):
        chunk = pending[start : start + chunk_items]
        scored, choice_lengths = [], []
        for item in chunk:
            context, choices = item.context, item.choices
            if settings.chat:
                context = tokenizer.apply_chat_template([{"role": "user", "content": context}])
                choices = [choice.lstrip() for choice in choices]
            choice_lengths.append([len(choice) for choice in choices])  # acc_norm divides by what was scored
            pairs = [encode_pair(tokenizer, context, choice) for choice in choices]
            context_ids = pairs[0][0]  # the same for every choice
            if len(context_ids) + max(len(c) for _, c in pairs) <= model.config.max_position_embeddings:
                scored += score_choices(model, context_ids, [c for _, c in pairs], configs, policies)
            else:  # too long: cut from the left, whole sequences
                scored += score_requests(model, pairs, configs, policies, settings.batch_size)
        begin = 0
        for item, lengths in zip(chunk, choice_lengths):
            mine = scored[begin : begin + len(item.choices)]
            begin += len(item.choices)
            for config in configs:
                if (item.id, config.key) in records.done:
                    continue
                logprobs = [s.logprob[config.key] for s in mine]
                normed = [lp / max(1, length) for lp, length in zip(logprobs, lengths)]
                pick = _argmax(normed if task.metric == "acc_norm" else logprobs)
                records.add({
                    "id": item.id, "key": config.key, **config.as_dict(), "correct": pick == item.label,
                    "pred": pick, "label": item.label, "acc": _argmax(logprobs) == item.label,
                    "acc_norm": _argmax(normed) == item.label, "logprobs": [round(lp, 4) for lp in logprobs],
                    "step_sum": sum(s.step_sum[config.key] for s in mine), "step_count": sum(s.tokens for s in mine),
                })
        if advance:
            advance(len(chunk))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _run_generate(model, task: Task, items: list[Item], configs: list[Config], settings: EvalSettings,  # noqa: ANN001
                  records: Records, progress: Callable[[int], Progress] | None) -> None:
    """Greedy answers for every pending (item, configuration). The dynamic decode step runs them
    continuously batched (the serving engine: a finished row is replaced at once, so no row waits
    on the longest answer of a static batch); a static decoder (`settings.decoder`) runs static
    batches of `batch_size`."""
    from looplm.generate import resolve_decoder

    max_new = settings.max_new_tokens or task.max_new_tokens
    jobs = [(config, item) for config in configs for item in items if (item.id, config.key) not in records.done]
    prompts = [model.tokenizer.encode(_render(model.tokenizer, item, settings.chat)) for _, item in jobs]
    context = model.config.max_position_embeddings
    longest = max(range(len(jobs)), key=lambda j: len(prompts[j]), default=None)
    if longest is not None and len(prompts[longest]) + max_new > context:
        raise LooplmError(f"item {jobs[longest][1].id}'s prompt ({len(prompts[longest])} tokens) + {max_new} new tokens "
                          f"exceeds the model's context of {context}; lower --num-fewshot or --max-new-tokens")
    advance = progress(len(jobs)) if progress else None
    if not jobs:  # all done by an earlier run
        return
    if resolve_decoder(settings.decoder, model, True, settings.kv_mode, settings.skip_compute) == "dynamic":
        answers = _answers_continuously(model, jobs, prompts, max_new, settings)
    else:
        answers = _answers_in_static_batches(model, jobs, prompts, max_new, settings)
    for index, tokens, steps_used in answers:  # each as soon as it is known: a killed run keeps it
        config, item = jobs[index]
        text = model.tokenizer.decode(tokens)
        correct, prediction = _check(task, item, text, settings.code_timeout_s)
        records.add({"id": item.id, "key": config.key, **config.as_dict(), "correct": correct,
                     "prediction": prediction, "answer": item.answer if task.name != "humaneval" else None,
                     "output": text, "step_sum": float(sum(steps_used)), "step_count": len(steps_used)})
        if advance:
            advance(1)


Answer = tuple[int, list[int], list[int]]  # (job index, new token ids, 1-based loops of each token)


def _answers_in_static_batches(model, jobs: list[tuple[Config, Item]], prompts: list[list[int]],  # noqa: ANN001
                               max_new: int, settings: EvalSettings) -> Iterator[Answer]:
    """`looplm.generate` over consecutive jobs of one configuration, `batch_size` at a time."""
    from looplm.generate import generate

    start = 0
    while start < len(jobs):
        config = jobs[start][0]
        end = start
        while end < len(jobs) and end - start < settings.batch_size and jobs[end][0] == config:
            end += 1
        new_ids, stats = generate(
            model, prompts[start:end], max_new, steps=config.steps, exit_policy=config.exit_policy,
            exit_threshold=config.exit_threshold, skip_compute=settings.skip_compute, kv_mode=settings.kv_mode,
            return_stats=True, decoder=settings.decoder,
        )
        yield from zip(range(start, end), new_ids, stats.steps_per_token)
        start = end


def _answers_continuously(model, jobs: list[tuple[Config, Item]], prompts: list[list[int]],  # noqa: ANN001
                          max_new: int, settings: EvalSettings) -> Iterator[Answer]:
    """Every job through one serving engine of `batch_size` rows, yielded in the order they finish."""
    from looplm.server.jobs import Job, run_jobs

    engine_jobs = [Job(prompt, max_new, config.steps, config.exit_policy, config.exit_threshold, settings.kv_mode,
                       settings.skip_compute) for (config, _), prompt in zip(jobs, prompts)]
    for result in run_jobs(model, engine_jobs, settings.batch_size, settings.prefix_cache_mb << 20):
        yield result.index, result.tokens, result.loops


def _render(tokenizer, item: Item, chat: bool | None) -> str:  # noqa: ANN001
    if chat is False:  # plain text: the turns joined, the model continues after the last
        return "\n\n".join(m["content"] for m in item.messages) + "\n"
    return tokenizer.apply_chat_template(item.messages)


def _check(task: Task, item: Item, text: str, timeout_s: float) -> tuple[bool, str | None]:
    if task.name == "humaneval":
        from looplm.eval.code_exec import humaneval_program, run_program
        from looplm.eval.scoring import extract_code

        program = humaneval_program(item.meta["prompt"], extract_code(text), item.answer, item.meta["entry_point"])
        passed, reason = run_program(program, timeout_s)
        return passed, reason
    from looplm.eval.scoring import extract_answer, math_equal

    prediction = extract_answer(text)
    return math_equal(prediction, item.answer), prediction
