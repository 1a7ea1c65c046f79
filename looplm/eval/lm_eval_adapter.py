"""A `looplm` model type for EleutherAI's lm-evaluation-harness (lm-eval 0.4.x).

    pip install 'looplm[lm-eval]'
    python -m looplm.eval.lm_eval_adapter --model_args pretrained=PATH,steps=4 --tasks hellaswag
    # or, from Python (importing this module registers the model type):
    import lm_eval, looplm.eval.lm_eval_adapter
    lm_eval.simple_evaluate(model="looplm", model_args="pretrained=PATH,steps=2", tasks=[...])

Model arguments: `pretrained` (directory, hub id or .gguf; default: the embedded model),
`dtype` (default float32), `steps`, `exit_policy`, `exit_threshold`, `max_length`; from Python
also `device` and `batch_size`, which lm-eval's CLI passes itself (`--device`, `--batch_size`:
putting them in `--model_args` too is lm-eval's "multiple values" error). lm-eval's default device
is cuda:0: without a GPU the model runs on the CPU, with a warning.

`generate_until` reads `until`, `max_gen_toks`, `do_sample` (without it: greedy), `temperature`,
`top_p`, `top_k`, `min_p` and `repetition_penalty` from a task's `generation_kwargs` and refuses
others (as HF's generate does); sampling seeds come from torch's global generator (lm-eval's
`--seed`). Its requests run continuously batched through one serving engine
(`looplm.server.jobs`). A misspelt model argument is a warning.

Per-request loop settings: a request may override `steps`, `exit_policy` and `exit_threshold`.
For `generate_until` put them in the task's `generation_kwargs`; for any request type set them as
attributes `looplm_steps` / `looplm_exit_policy` / `looplm_exit_threshold` on the `Instance`.
Log-likelihood requests are grouped by their settings, and all depths of a group come from one
pass (`looplm.eval.loglik`). lm_eval is imported only by this module; looplm never needs it.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch

from looplm.errors import LooplmError, exit_code_of

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - depends on the environment
    _MISSING = "the lm-eval adapter needs lm-evaluation-harness 0.4.x: pip install 'looplm[lm-eval]'"
    if __name__ == "__main__":  # `python -m looplm.eval.lm_eval_adapter`: one line, no traceback
        raise SystemExit(f"error: {_MISSING}") from None
    raise LooplmError(_MISSING) from exc

from looplm.eval.loglik import Config, encode_pair, score_requests
from looplm.exit import make_policy

LOOP_KEYS = ("steps", "exit_policy", "exit_threshold")
# generate_until's generation_kwargs that looplm reads; others are refused, as HF's generate does.
# Without do_sample the choice is greedy (temperature, top_p, top_k and min_p unused, as in HF).
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
GENERATION_KEYS = ("until", "max_gen_toks", *SAMPLING_KEYS, *LOOP_KEYS)
# Arguments lm-eval's CLI adds to every model's own; looplm has no use for them.
LM_EVAL_PASSES = {"max_batch_size", "trust_remote_code"}


def _device(requested: str | None) -> str:
    """lm-eval passes its own default device, "cuda:0", when the user gave none: like lm-eval's
    Hugging Face model, run on the CPU where there is no GPU, and say so (a device the user named
    and this machine lacks is that default too, so the warning names how to be explicit)."""
    if not requested:
        return "auto"
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        warnings.warn(f"lm-eval asked for device '{requested}' (its default when none is given), but this machine "
                      "has no CUDA device: the model runs on the CPU; pass --device cpu to say so", stacklevel=3)
        return "cpu"
    return str(requested)


@register_model("looplm")
class LooplmLM(LM):
    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str = "cpu",
                 steps: int | str | None = None, exit_policy: str | None = None,
                 exit_threshold: float | str | None = None, batch_size: int | str = 8,
                 max_length: int | str | None = None, model=None, **unused) -> None:  # noqa: ANN001
        super().__init__()
        import looplm

        self.model = model if model is not None else looplm.load(pretrained, dtype=dtype, device=_device(device))
        if self.model.tokenizer is None:
            raise LooplmError("lm-eval needs the model's tokenizer; this checkpoint has none")
        self.tokenizer = self.model.tokenizer
        self.defaults = {
            "steps": int(steps) if steps not in (None, "") else self.model.config.total_ut_steps,
            "exit_policy": exit_policy or "last",
            "exit_threshold": float(exit_threshold) if exit_threshold not in (None, "") else None,
        }
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_length = int(max_length) if max_length else self.model.config.max_position_embeddings
        eot = self.tokenizer.eos_id
        self.prefix_token_id = eot if eot is not None else (self.model.config.eos_token_ids or [0])[0]
        ignored = sorted(set(unused) - LM_EVAL_PASSES)
        if ignored:  # most likely a misspelt model argument
            warnings.warn(f"looplm ignores the model argument(s) {', '.join(ignored)}", stacklevel=2)

    # -- what lm-eval asks of a model ------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.source).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:  # noqa: ANN001
        pairs = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            if context:
                pairs.append(encode_pair(self.tokenizer, context, continuation, lm_eval_whitespace=True))
            else:  # score from the first token: the eos token stands in for the missing context
                pairs.append(([self.prefix_token_id], self.tokenizer.encode(continuation)))
        results = self._score(requests, pairs)
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:  # noqa: ANN001
        pairs, owners = [], []
        for index, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0])
            windows = get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owners.append(index)
        totals = [0.0] * len(requests)
        window_requests = [requests[i] for i in owners]
        for owner, (logprob, _) in zip(owners, self._score(window_requests, pairs)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests) -> list[str]:  # noqa: ANN001
        """Every request through one serving engine of `batch_size` rows (`looplm.server.jobs`):
        continuous batching, and prompts that share their start (few-shot examples) prefill only
        the rest. Each request's seed comes from torch's global generator, which lm-eval's --seed sets."""
        from looplm.sampling import SamplingParams
        from looplm.server import DEFAULT_PREFIX_CACHE_MB
        from looplm.server.jobs import Job, run_jobs

        jobs = []
        for request in requests:
            kwargs = dict(request.args[1]) if len(request.args) > 1 else {}
            (steps, exit_policy, exit_threshold), until, max_new, sampling = self._gen_key(request, kwargs)
            limit = max(1, self.max_length - max_new)
            prompt = self.tokenizer.encode(request.args[0])[-limit:] or [self.prefix_token_id]
            seed = int(torch.randint(0, 1 << 62, (1,)))
            jobs.append(Job(prompt, max_new, steps, exit_policy, exit_threshold, sampling=SamplingParams(**dict(sampling)),
                            seed=seed, stop=until))
        outputs = [""] * len(requests)
        # Finished requests' K/V are kept for prompts that start the same way, as `looplm eval` does.
        for result in run_jobs(self.model, jobs, self.batch_size, DEFAULT_PREFIX_CACHE_MB << 20):
            text = self.tokenizer.decode(result.tokens)
            for stop in jobs[result.index].stop:  # the stop string itself is not part of the answer
                text = text.split(stop, 1)[0]
            outputs[result.index] = text
            self.cache_hook.add_partial("generate_until", requests[result.index].args, text)
        return outputs

    # -- helpers ---------------------------------------------------------------------------------

    def _loop(self, request, overrides: dict | None = None) -> tuple:  # noqa: ANN001
        values = dict(self.defaults)
        for key in LOOP_KEYS:
            if overrides and overrides.get(key) is not None:
                values[key] = overrides[key]
            attribute = getattr(request, f"looplm_{key}", None)
            if attribute is not None:
                values[key] = attribute
        policy = values["exit_policy"]
        threshold = None if policy in ("last", "fixed", "weighted") or values["exit_threshold"] is None \
            else float(values["exit_threshold"])
        return int(values["steps"]), policy, threshold

    def _gen_key(self, request, kwargs: dict) -> tuple:  # noqa: ANN001
        unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
        if unknown:
            raise LooplmError(f"generation_kwargs {', '.join(unknown)} not supported by looplm "
                              f"(it reads {', '.join(GENERATION_KEYS)})")
        loop = self._loop(request, kwargs)
        until = kwargs.get("until") or []
        until = tuple(stop for stop in ([until] if isinstance(until, str) else until) if stop)  # "" is in every text
        max_new = int(kwargs.get("max_gen_toks", 256))
        if max_new < 1:
            raise LooplmError(f"generation_kwargs max_gen_toks must be at least 1, got {max_new}")
        sampling = {"repetition_penalty": float(kwargs.get("repetition_penalty", 1.0))}
        if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0)) > 0:
            sampling.update(temperature=float(kwargs.get("temperature", 1.0)), top_p=float(kwargs.get("top_p", 1.0)),
                            top_k=int(kwargs.get("top_k", 0)), min_p=float(kwargs.get("min_p", 0.0)))
        return loop, until, max_new, tuple(sorted(sampling.items()))

    def _score(self, requests, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:  # noqa: ANN001
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[self._loop(request)].append(index)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        config_ = self.model.config
        for (steps, policy, threshold), indices in groups.items():
            config = Config(steps, policy, threshold)
            policies = {}
            if policy != "last":
                policies[config.key] = make_policy(policy, threshold, steps, config_.early_exit_threshold,
                                                   config_.early_exit_step)
            scored = score_requests(self.model, [pairs[i] for i in indices], [config], policies, self.batch_size,
                                    max_length=self.max_length)
            for i, result in zip(indices, scored):
                results[i] = (result.logprob[config.key], result.greedy[config.key])
        return results


def main() -> None:
    """`python -m looplm.eval.lm_eval_adapter ARGS`: lm-eval's own CLI with the looplm model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if "--model" not in sys.argv:
        sys.argv[1:1] = ["--model", "looplm"]
    cli_evaluate()


if __name__ == "__main__":
    raise SystemExit(exit_code_of(main))  # a bad model or device: one error line, not lm-eval's traceback
