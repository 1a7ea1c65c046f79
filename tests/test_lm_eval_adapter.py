"""The lm-evaluation-harness adapter on a tiny local task (skipped when lm-eval is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install 'looplm[lm-eval]')")

from conftest import small_config  # noqa: E402

import looplm  # noqa: E402
from looplm.default_model import write_random_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-lm-eval")
    write_random_checkpoint(path, small_config(vocab_size=259, max_position_embeddings=64), seed=5)
    return path


@pytest.fixture(scope="module")
def adapter(tiny_path: Path):  # noqa: ANN201
    from looplm.eval.lm_eval_adapter import LooplmLM

    return LooplmLM(model=looplm.load(tiny_path, dtype="float32"), steps=4, batch_size=3)


def _instance(kind: str, args: tuple, **attributes: object):  # noqa: ANN202
    from lm_eval.api.instance import Instance

    instance = Instance(request_type=kind, doc={}, arguments=args, idx=0)
    for key, value in attributes.items():
        setattr(instance, key, value)
    return instance


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the machine without a GPU")
def test_lm_evals_default_cuda_device_runs_on_the_cpu_with_a_warning(tiny_path: Path) -> None:
    from looplm.eval.lm_eval_adapter import LooplmLM

    with pytest.warns(UserWarning, match="'cuda:0' .* no CUDA device: the model runs on the CPU"):
        lm = LooplmLM(pretrained=str(tiny_path), device="cuda:0")
    assert lm.model.device.type == "cpu"
    with pytest.raises(looplm.LooplmError, match="device 'tpu' is not supported"):
        LooplmLM(pretrained=str(tiny_path), device="tpu")


def test_loglikelihood_per_request_steps(adapter) -> None:  # noqa: ANN001
    import torch

    requests = [_instance("loglikelihood", ("The sky is", " blue"), looplm_steps=steps) for steps in (1, 2, 4)]
    requests.append(_instance("loglikelihood", ("", "hello")))
    results = adapter.loglikelihood(requests)
    tok = adapter.tokenizer
    ids = torch.tensor([tok.encode("The sky is blue")])
    n = len(tok.encode(" blue"))
    for steps, (logprob, greedy) in zip((1, 2, 4), results):
        with torch.inference_mode():
            expected = adapter.model.step_logprobs(ids[:, :-1], ids[:, 1:], steps=steps)[-1, 0, -n:].sum()
        assert logprob == pytest.approx(float(expected), abs=1e-4) and isinstance(greedy, bool)
    assert results[3][0] < 0


def test_a_context_ending_in_spaces_is_scored_as_lm_eval_scores_it(adapter) -> None:  # noqa: ANN001
    """lm-eval moves a context's trailing spaces into the continuation ("A: " + "4" is "A:" + " 4");
    looplm scored a lone space token, then "4" without its space (-2.06 against -4.33 on a tiny model)."""
    spaced, moved = adapter.loglikelihood([_instance("loglikelihood", ("Q: 2+2?\nA: ", "4")),
                                           _instance("loglikelihood", ("Q: 2+2?\nA:", " 4"))])
    assert spaced == moved


def test_bad_lengths_and_stops_are_one_line_errors_or_ignored(adapter) -> None:  # noqa: ANN001
    """A continuation longer than the window raised a bare IndexError; `until: [""]` generated every
    request and then failed in str.split (all answers lost); max_gen_toks -1 generated one token."""
    from looplm.eval.lm_eval_adapter import LooplmLM

    short = LooplmLM(model=adapter.model, steps=4, batch_size=3, max_length=8)
    with pytest.raises(looplm.LooplmError, match="longer than the 8-token window"):
        short.loglikelihood([_instance("loglikelihood", ("a", "the sky is very blue today"))])
    empty_stop = adapter.generate_until([_instance("generate_until", ("Once upon", {"until": [""], "max_gen_toks": 3}))])
    plain = adapter.generate_until([_instance("generate_until", ("Once upon", {"max_gen_toks": 3}))])
    assert empty_stop == plain
    with pytest.raises(looplm.LooplmError, match="max_gen_toks must be at least 1, got -1"):
        adapter.generate_until([_instance("generate_until", ("Once upon", {"max_gen_toks": -1}))])


def test_rolling_windows_cover_every_token(adapter) -> None:  # noqa: ANN001
    text = "a long text " * 12  # 144 bytes > max_length 64: several windows
    (total,) = adapter.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    single = adapter.loglikelihood([_instance("loglikelihood", ("", text[:40]))])[0][0]
    assert total < single < 0


def test_generate_until_stops_and_honours_steps(adapter) -> None:  # noqa: ANN001
    requests = [_instance("generate_until", ("Once upon", {"until": ["e"], "max_gen_toks": 5, "steps": s}))
                for s in (1, 4)]
    outputs = adapter.generate_until(requests)
    assert len(outputs) == 2 and all(isinstance(o, str) and "e" not in o for o in outputs)
    import torch

    ids = adapter.tokenizer.encode("Once upon")
    for steps, output in zip((1, 4), outputs):
        new = looplm.generate.generate(adapter.model, ids, 5, steps=steps, exit_policy="last", stop=["e"])[0]
        assert adapter.tokenizer.decode(new).split("e", 1)[0] == output
    del torch


def test_generate_until_reads_sampling_kwargs_and_follows_the_global_seed(adapter) -> None:  # noqa: ANN001
    import torch

    def run(**kwargs: object) -> list[str]:
        base = {"until": ["\n\n"], "max_gen_toks": 8}
        return adapter.generate_until([_instance("generate_until", (p, {**base, **kwargs})) for p in ("Once", "Two")])

    from looplm.generate import generate

    ids = adapter.tokenizer.encode("Once")
    expected = generate(adapter.model, ids, 8, exit_policy="last", repetition_penalty=1.5)[0]
    assert run(repetition_penalty=1.5)[0] == adapter.tokenizer.decode(expected).split("\n\n", 1)[0]
    greedy = run()
    assert run(do_sample=True, temperature=1.2, top_k=1) == greedy  # top_k 1 keeps only the likeliest token
    assert run(do_sample=False, temperature=1.2) == greedy  # as in HF: no do_sample, no sampling
    torch.manual_seed(11)
    first = run(do_sample=True, temperature=1.5)
    torch.manual_seed(11)
    assert run(do_sample=True, temperature=1.5) == first  # lm-eval's --seed makes sampling repeatable
    with pytest.raises(looplm.LooplmError, match="generation_kwargs num_beams not supported by looplm"):
        run(num_beams=4)


def test_a_misspelt_model_argument_is_a_warning(tiny_path: Path) -> None:
    from looplm.eval.lm_eval_adapter import LooplmLM

    with pytest.warns(UserWarning, match="looplm ignores the model argument\\(s\\) stpes"):
        LooplmLM(pretrained=str(tiny_path), device="cpu", stpes=2, max_batch_size=None)


def test_simple_evaluate_on_a_local_task(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import looplm.eval.lm_eval_adapter  # noqa: F401 - registers "looplm"

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    rows = [{"question": f"Is {k} even?", "choices": ["yes", "no"], "label": k % 2, "answer": "yes"} for k in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tasks / "tiny_mc.yaml").write_text(
        "task: looplm_tiny_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    (tasks / "tiny_gen.yaml").write_text(
        "task: looplm_tiny_gen\n" + common + "output_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 3\n  steps: 2\n"
        "metric_list:\n  - metric: exact_match\n")
    results = lm_eval.simple_evaluate(
        model="looplm", model_args=f"pretrained={tiny_path},steps=4", tasks=["looplm_tiny_mc", "looplm_tiny_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), batch_size=4,
    )
    assert 0.0 <= results["results"]["looplm_tiny_mc"]["acc,none"] <= 1.0
    assert results["results"]["looplm_tiny_gen"]["exact_match,none"] == 0.0  # random weights never say "yes"
