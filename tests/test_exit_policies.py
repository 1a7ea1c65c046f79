"""Exit policies, real compute skipping and the shared KV mode."""

from __future__ import annotations

import pytest
import torch

import looplm
from looplm.errors import GenerationError
from looplm.exit import make_policy


@pytest.fixture
def model(make_checkpoint):  # noqa: ANN001, ANN201
    return looplm.load(make_checkpoint(seed=5, num_key_value_heads=2), dtype="float32")


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=gen).tolist() for n in lengths]


class LayerCounter:
    """Counts decoder-layer calls and the rows each call processed."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.calls, self.rows = 0, 0
        self.handles = [layer.register_forward_hook(self.hook) for layer in model.model.layers]

    def hook(self, module, args, output) -> None:  # noqa: ANN001
        self.calls += 1
        self.rows += output.shape[0]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_gate_policy_matches_reference_selection_on_fixture(fixture_dir, expected) -> None:  # noqa: ANN001
    """The step-by-step gate policy picks exactly the reference's steps (bf16 running sums)."""
    for dtype in ("bfloat16", "float32"):
        m = looplm.load(fixture_dir, dtype=dtype)
        with torch.inference_mode():
            out = m.forward_steps(expected["input_ids"])
            for threshold in (1.0, 0.5):
                ref = expected[f"{dtype}.steps4.exit_step_thr{threshold}"]
                for position in range(out.hidden_states.shape[2]):
                    _, steps = m.readout(out, make_policy("gate", threshold, 4, 1.0), position)
                    assert torch.equal(steps, ref[:, position]), (dtype, threshold, position)


def test_skip_equals_no_skip_when_nothing_exits_early(model) -> None:  # noqa: ANN001
    for p in prompts([7, 12]):
        full, full_stats = model.generate(p, 12, eos_token_ids=[], return_stats=True)
        skip, skip_stats = model.generate(p, 12, eos_token_ids=[], skip_compute=True, return_stats=True)
        assert full == skip
        assert skip_stats.mean_steps == 4.0


def test_skip_compute_really_skips_layers(model) -> None:  # noqa: ANN001
    p = prompts([6])[0]
    counter = LayerCounter(model)
    model.generate(p, 5, exit_policy="confidence", exit_threshold=1e-6, skip_compute=True, eos_token_ids=[])
    skipped = counter.calls
    counter.calls = 0
    model.generate(p, 5, exit_policy="confidence", exit_threshold=1e-6, skip_compute=False, eos_token_ids=[])
    counter.remove()
    layers = model.config.num_hidden_layers
    # prefill always runs 4 steps; each of the 4 decode steps runs 1 step with skipping, 4 without
    assert skipped == 4 * layers + 4 * 1 * layers
    assert counter.calls == 4 * layers + 4 * 4 * layers


def test_batched_skip_gives_each_row_its_solo_tokens(model) -> None:  # noqa: ANN001
    batch = prompts([5, 11, 8], seed=3)
    kwargs = dict(exit_policy="gate", exit_threshold=0.5, skip_compute=True, eos_token_ids=[])
    together, stats = model.generate(batch, 10, return_stats=True, **kwargs)
    alone = [model.generate(p, 10, **kwargs)[0] for p in batch]
    assert together == alone
    used = [n for row in stats.steps_per_token for n in row]
    assert min(used) < max(used), "the test needs rows exiting at different steps"


@pytest.mark.parametrize("policy", ["confidence", "kl"])
def test_batched_skip_logit_policies_match_solo(model, policy: str) -> None:  # noqa: ANN001
    batch = prompts([4, 9], seed=8)
    threshold = {"confidence": 0.02, "kl": 0.05}[policy]
    kwargs = dict(exit_policy=policy, exit_threshold=threshold, skip_compute=True, eos_token_ids=[])
    assert model.generate(batch, 8, **kwargs) == [model.generate(p, 8, **kwargs)[0] for p in batch]


def test_no_skip_readout_matches_manual_rules(model) -> None:  # noqa: ANN001
    p = prompts([9], seed=4)[0]
    with torch.inference_mode():
        out = model.forward_steps(torch.tensor([p]))
    logits = out.logits[:, 0, -1]  # (T, V)
    probs = torch.softmax(logits.float(), -1)
    top = probs.amax(-1)
    threshold = float(top[1:].min()) - 1e-4  # reached at some step >= 1; off the exact value, so float noise cannot flip it
    expected = int((top >= threshold).nonzero()[0])
    with torch.inference_mode():
        _, steps = model.readout(out, make_policy("confidence", threshold, 4, 1.0))
    assert int(steps[0]) == expected
    logp = torch.log_softmax(logits.float(), -1)
    kls = [(logp[t].exp() * (logp[t] - logp[t - 1])).sum() for t in range(1, 4)]
    kl_threshold = float(min(kls)) * 1.001  # a hair above, so float noise cannot flip the comparison
    expected_kl = 1 + min(i for i, v in enumerate(kls) if v <= kl_threshold)
    with torch.inference_mode():
        _, steps = model.readout(out, make_policy("kl", kl_threshold, 4, 1.0))
    assert int(steps[0]) == expected_kl


def test_weighted_policy_is_the_exit_probability_mixture(model) -> None:  # noqa: ANN001
    p = prompts([8], seed=9)[0]
    with torch.inference_mode():
        out = model.forward_steps(torch.tensor([p]))
        mixed, _ = model.readout(out, make_policy("weighted", None, 4, 1.0))
    expected = (out.exit_probs[:, 0, -1, None] * out.logits[:, 0, -1]).sum(0)
    assert torch.allclose(mixed[0], expected, atol=1e-5)
    first = int(expected.argmax())
    assert model.generate(p, 1, exit_policy="weighted")[0][0] == first
    assert model.generate(p, 1, exit_policy="weighted", use_cache=False)[0][0] == first


def test_last_and_fixed_policies(model) -> None:  # noqa: ANN001
    p = prompts([6], seed=2)[0]
    _, stats = model.generate(p, 6, exit_policy="last", return_stats=True, eos_token_ids=[])
    assert stats.mean_steps == 4
    fixed, stats = model.generate(p, 6, exit_policy="fixed", steps=2, return_stats=True, eos_token_ids=[])
    assert stats.mean_steps == 2
    assert fixed == model.generate(p, 6, steps=2, exit_policy="last", eos_token_ids=[])


def test_unknown_policy_and_kv_mode() -> None:
    with pytest.raises(GenerationError):
        make_policy("sometimes", None, 4, 1.0)
    m = looplm.load()
    with pytest.raises(GenerationError):
        m.generate([5, 6], 2, kv_mode="quarter")


def test_shared_kv_mode(model) -> None:  # noqa: ANN001
    p = prompts([10], seed=6)[0]
    full = model.generate(p, 12, eos_token_ids=[])[0]
    shared, stats = model.generate(p, 12, kv_mode="shared", eos_token_ids=[], return_stats=True)
    assert full[0] == shared[0][0]  # the first token comes from the (per-step) prefill
    assert len(shared[0]) == 12 and stats.kv_mode == "shared"
    full_cache = model.make_cache(1, 32)
    shared_cache = model.make_cache(1, 32, kv_mode="shared", prompt_len=10)
    assert full_cache.bytes_per_decoded_token() == 4 * shared_cache.bytes_per_decoded_token()
    assert shared_cache.nbytes() < full_cache.nbytes()


def test_shared_kv_with_one_step_equals_full(model) -> None:  # noqa: ANN001
    """With a single loop there is nothing to share: both modes compute the same thing."""
    p = prompts([7], seed=7)[0]
    with pytest.warns(UserWarning):
        a = model.generate(p, 10, steps=1, eos_token_ids=[])
        b = model.generate(p, 10, steps=1, kv_mode="shared", eos_token_ids=[])
    assert a == b


def test_shared_kv_batched_equals_solo(model) -> None:  # noqa: ANN001
    batch = prompts([4, 9], seed=10)
    kwargs = dict(kv_mode="shared", exit_policy="gate", exit_threshold=0.5, skip_compute=True, eos_token_ids=[])
    assert model.generate(batch, 8, **kwargs) == [model.generate(p, 8, **kwargs)[0] for p in batch]


def test_teacher_forced_decode_matches_full_forward(model) -> None:  # noqa: ANN001
    """The quality harness's decode path scores exactly what a full forward pass scores."""
    from looplm.exit_quality import teacher_forced

    ids = prompts([20], seed=12)[0]
    result = teacher_forced(model, ids, 8, "last", None, "full", False)
    with torch.inference_mode():
        logits = model.forward_steps(torch.tensor([ids])).logits[-1, 0]
    logp = torch.log_softmax(logits.float(), -1)
    expected = -sum(float(logp[i - 1, ids[i]]) for i in range(8, 20))
    assert result["tokens"] == 12 and result["steps"] == [4] * 12
    assert abs(result["nll"] - expected) < 1e-3
    skipped = teacher_forced(model, ids, 8, "fixed", 1.0, "full", True)
    assert skipped["steps"][1:] == [1] * 11 and skipped["nll"] != result["nll"]


def test_every_policy_reads_the_only_step_of_a_one_loop_model(make_checkpoint) -> None:  # noqa: ANN001
    """A plain Llama is a looped model with T=1: every policy, KV mode and skip setting scores the same."""
    from looplm.exit_quality import DEFAULT_GRID, teacher_forced

    llama = looplm.load(make_checkpoint(seed=3, model_type="llama", total_ut_steps=1), dtype="float32")
    ids = prompts([24], seed=13)[0]
    reference = teacher_forced(llama, ids, 8, "last", None, "full", False)
    settings = [s for s in DEFAULT_GRID if s.policy != "fixed" or s.threshold <= 1]
    assert {s.policy for s in settings} == {"last", "weighted", "gate", "fixed", "confidence", "kl"}
    for s in settings:
        result = teacher_forced(llama, ids, 8, s.policy, s.threshold, s.kv_mode, s.skip_compute)
        assert result["steps"] == [1] * 16, s.label
        if s.kv_mode == "full":
            assert result["nll"] == reference["nll"], s.label  # bit for bit: the same step is read
        else:  # the same values, attended as two segments (prompt, decoded): another summation order
            assert result["nll"] == pytest.approx(reference["nll"], rel=1e-6), s.label
        generated = llama.generate(ids[:8], 6, eos_token_ids=[], exit_policy=s.policy, kv_mode=s.kv_mode,
                                   exit_threshold=s.threshold if s.policy in ("gate", "confidence", "kl") else None,
                                   skip_compute=s.skip_compute)
        assert generated == llama.generate(ids[:8], 6, eos_token_ids=[]), s.label


def test_teacher_forced_batch_equals_one_document_at_a_time(model) -> None:  # noqa: ANN001
    """The quality measurement batches its documents; each row must score what it scores alone."""
    from looplm.exit_quality import Setting, teacher_forced, teacher_forced_batch

    docs = prompts([20, 20, 20], seed=14)
    for setting in (Setting("", "gate", 0.5, "full", True), Setting("", "kl", 0.05, "shared", True),
                    Setting("", "fixed", 2.0, "full", True)):
        batched = teacher_forced_batch(model, docs, 6, setting)
        exits = 0
        for doc, row in zip(docs, batched):
            solo = teacher_forced(model, doc, 6, setting.policy, setting.threshold, setting.kv_mode,
                                  setting.skip_compute)
            assert row["steps"] == solo["steps"], setting
            assert row["nll"] == pytest.approx(solo["nll"], rel=1e-5), setting
            exits += sum(n < 4 for n in row["steps"])
        assert exits > 0, setting  # the rows really exit early (and skip)


def test_fixed_n_after_a_full_prefill_equals_n_loops_everywhere(model) -> None:  # noqa: ANN001
    """Loop t attends only to loop-t K/V, so a prompt's extra loops change nothing for an n-loop token."""
    from looplm.exit_quality import teacher_forced

    ids = prompts([20], seed=15)[0]
    with torch.inference_mode():
        per_loop = torch.log_softmax(model.forward_steps(torch.tensor([ids])).logits[:, 0].float(), -1)
    for n in (1, 2, 3):
        result = teacher_forced(model, ids, 8, "fixed", float(n), "full", True)
        expected = -sum(float(per_loop[n - 1, i - 1, ids[i]]) for i in range(8, 20))
        assert result["steps"] == [n] * 12 and result["nll"] == pytest.approx(expected, rel=1e-4)
