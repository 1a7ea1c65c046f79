"""Training: objective math on hand-computed examples, the loop, checkpoints, resume and DDP."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import signal
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import looplm
from looplm import assets
from looplm.assets import Asset, fetch_asset
from looplm.errors import ConfigError, LooplmError
from looplm.exit import exit_distribution
from looplm.train.data import TokenBatches, answer_mask, arithmetic_documents, train_tokenizer, write_data_dir
from looplm.train.objective import exit_log_probs, per_step_token_loss, stage1_loss, stage2_loss, stage2_targets
from looplm.train.trainer import TrainConfig, lr_at, read_log, train

TINY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 128, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-6, "total_ut_steps": 3}


# -- objective -----------------------------------------------------------------------------------


def test_exit_distribution_from_logits_matches_sigmoid_recursion() -> None:
    z = torch.tensor([[0.0, 2.0], [0.0, -1.0], [0.0, 3.0]])  # (T=3, 2 positions)
    p = exit_log_probs(z).exp()
    assert torch.allclose(p[:, 0], torch.tensor([0.5, 0.25, 0.25]))  # lambda = 1/2 everywhere; last takes the rest
    assert torch.allclose(p, exit_distribution(torch.sigmoid(z)), atol=1e-6)
    assert torch.allclose(p.sum(0), torch.ones(2))


def test_stage1_hand_computed() -> None:
    # T=2, one position, vocab 2, target 0. Step 1 logits [0, 0]: CE = log 2. Step 2 [log 3, 0]: CE = log(4/3).
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).view(2, 1, 1, 2)
    gate = torch.zeros(2, 1, 1)  # lambda_1 = 1/2 -> p = (1/2, 1/2), entropy log 2
    targets = torch.zeros(1, 1, dtype=torch.long)
    out = stage1_loss(logits, gate, targets, beta=0.1)
    expected_ce = 0.5 * math.log(2) + 0.5 * math.log(4 / 3)
    assert out.expected_ce.item() == pytest.approx(expected_ce, abs=1e-6)
    assert out.entropy.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.loss.item() == pytest.approx(expected_ce - 0.1 * math.log(2), abs=1e-6)
    assert torch.allclose(out.step_ce, torch.tensor([math.log(2), math.log(4 / 3)]))


def test_stage1_mask_and_saturated_gates() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, 7, requires_grad=True)
    gate = torch.full((3, 2, 4), 60.0, requires_grad=True)  # sigmoid rounds to 1: log space keeps it finite
    targets = torch.randint(0, 7, (2, 4))
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    out = stage1_loss(logits, gate, targets, mask=mask, beta=0.05)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(gate.grad).all() and torch.isfinite(logits.grad).all()
    ce = per_step_token_loss(logits.detach(), targets)[0]  # all mass exits at step 1
    assert out.expected_ce.item() == pytest.approx(((ce * mask).sum() / 3).item(), abs=1e-5)
    assert logits.grad[:, 0, 2:].abs().max() == 0 and logits.grad[:, 1, 1:].abs().max() == 0  # masked: no gradient


def test_stage2_hand_computed() -> None:
    # Per-step losses 2.0, 1.0, 1.0: step 2 improves by 1 (w ~ 1), step 3 by 0 (w = sigmoid(-0.25)).
    token_loss = torch.tensor([2.0, 1.0, 1.0]).view(3, 1, 1)
    gate = torch.tensor([5.0, 1.0, -2.0]).view(3, 1, 1).requires_grad_()
    w2, w3 = 1 / (1 + math.exp(-50 * (1.0 - 0.005))), 1 / (1 + math.exp(-50 * (0.0 - 0.005)))
    assert torch.allclose(stage2_targets(token_loss).flatten(), torch.tensor([w2, w3]))

    def bce(w: float, z: float) -> float:
        lam = 1 / (1 + math.exp(-z))
        return -(w * math.log(1 - lam) + (1 - w) * math.log(lam))

    out = stage2_loss(gate, token_loss)
    assert out.loss.item() == pytest.approx((bce(w2, 1.0) + bce(w3, -2.0)) / 3, abs=1e-6)  # 1/T, sum over t = 2..T
    out.loss.backward()
    assert gate.grad[0].item() == 0.0  # the first step's gate gets no Stage II signal


def test_lr_schedule_warmup_then_cosine() -> None:
    config = TrainConfig(data_dir=Path("."), out_dir=Path("."), steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55) and lr_at(100, config) == pytest.approx(0.1)


# -- the loop ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    docs = arithmetic_documents(3000, seed=0, max_digits=2)
    text = ["The quick brown fox jumps over the lazy dog.\n" * 3, "To be, or not to be, that is the question.\n"] * 20
    tokenizer = train_tokenizer(docs[:200] + text, vocab_size=300)
    write_data_dir(out, {"arithmetic": (docs, 0.7), "text": (text, 0.3)}, tokenizer)
    return out


@pytest.fixture(scope="module")
def masked_data_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`data_dir` with a loss mask on the arithmetic source: only the answers count."""
    import shutil

    from looplm.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("masked")
    shutil.copytree(data_dir, out, dirs_exist_ok=True)
    np.save(out / "arithmetic.mask.npy", answer_mask(np.load(out / "arithmetic.npy"), Tokenizer.from_dir(out)))
    meta = json.loads((out / "data.json").read_text())
    meta["sources"]["arithmetic"]["loss_mask"] = "arithmetic.mask.npy"
    (out / "data.json").write_text(json.dumps(meta))
    return out


def test_answer_mask_marks_answers_and_line_ends(data_dir: Path) -> None:
    from looplm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(data_dir)
    text = "12+3=15\n7-2=5\n"
    ids = tokenizer.encode(text)
    mask = answer_mask(np.asarray(ids, dtype=np.uint16), tokenizer)
    counted = "".join(tokenizer.decode([i]) for i, m in zip(ids, mask) if m)
    assert counted == "15\n5\n"


def test_masked_batches_count_only_answers(masked_data_dir: Path) -> None:
    batches = TokenBatches(masked_data_dir, 32, seed=1)
    tokens, mask = batches.global_batch_with_mask(3, 8)
    assert torch.equal(tokens, batches.global_batch(3, 8)) and mask.shape == tokens.shape and mask.dtype == torch.bool
    arithmetic = [row for row in range(8) if not mask[row].all()]  # text rows count every token
    assert arithmetic and all(0 < mask[row].sum() < 24 for row in arithmetic)


def _config(data_dir: Path | None, out: Path, **overrides: object) -> TrainConfig:
    base = dict(data_dir=data_dir, out_dir=out, model_config=dict(TINY_MODEL), steps=6, batch_size=4, seq_len=32,
                lr=3e-3, warmup_steps=2, progress=False, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def test_unsupported_device_is_refused_before_training(data_dir: Path, tmp_path: Path) -> None:
    bad = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])  # never a silent fall back to the CPU
    for device in bad:
        with pytest.raises(ConfigError, match=f"device '{device}'"):
            train(_config(data_dir, tmp_path / device, device=device))
        assert not (tmp_path / device).exists()


@pytest.mark.parametrize(("setting", "needle"), [
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"), ({"steps": 0}, "steps must be at least 1"),
    ({"stage": 3}, "stage must be 1 or 2"), ({"lr": -1.0}, "lr must be > 0"), ({"seq_len": 1}, "seq_len must be"),
    ({"min_lr_ratio": 2.0}, "min_lr_ratio must be in"), ({"micro_batch": -1}, "micro_batch must be >= 0"),
    ({"stop_at": 0}, "stop_at must be at least 1"),
    ({"resume": True, "overwrite": True}, "--resume continues the run in --out and --overwrite replaces it"),
    ({"init_from": Path("base")}, "--model-config \\(a new model\\) and --init-from \\(a checkpoint\\) both give"),
    ({"stop_at": 7}, "--stop-at 7 is past --steps 6"),
    ({"seq_len": 200}, "--seq-len 200 is longer than the model's max_position_embeddings 128"),
])
def test_bad_settings_are_refused_before_any_work(data_dir: Path, tmp_path: Path, setting: dict, needle: str) -> None:
    with pytest.raises(LooplmError, match=needle):
        train(_config(data_dir, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_needs_a_data_directory(tmp_path: Path) -> None:
    with pytest.raises(LooplmError, match=r"give a data directory \(--data\)"):
        train(_config(None, tmp_path / "run"))


def test_a_warmup_as_long_as_the_run_is_a_warning(data_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"--warmup 4 is not below --steps 3: the learning rate rises for the whole "
                                         r"run \(to 0.00225 of the peak 0.003\) and never decays"):
        train(_config(data_dir, tmp_path, steps=3, warmup_steps=4))


def test_a_loss_mask_that_marks_nothing_is_one_error(masked_data_dir: Path, tmp_path: Path) -> None:
    def blank(d: Path) -> None:
        np.save(d / "arithmetic.mask.npy", np.zeros_like(np.load(d / "arithmetic.mask.npy")))

    broken = _broken_copy(masked_data_dir, tmp_path / "data", blank)
    with pytest.raises(LooplmError, match=r"the loss mask of 'arithmetic' \(arithmetic.mask.npy\) marks no token"):
        train(_config(broken, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_data_builder_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from looplm.errors import exit_code_of
    from looplm.train.data import main

    assert exit_code_of(lambda: main([str(tmp_path / "out"), "--like", str(tmp_path / "missing")])) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing' / 'tokenizer.json'} not found; point to a model " \
                                      "directory that contains tokenizer.json\n"
    with pytest.raises(SystemExit):  # argparse's usage error
        main([str(tmp_path / "out"), "--max-terms", "1"])
    assert "--max-terms at least 2" in capsys.readouterr().err


def test_data_builder_refuses_an_unwritable_out_before_building(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm.train.data as data

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built before the output was checked")

    monkeypatch.setattr(data, "build_tiny_corpus", no_build)
    (tmp_path / "a-file").write_text("")
    from looplm.errors import exit_code_of

    assert exit_code_of(lambda: data.main([str(tmp_path / "a-file" / "out")])) == 1
    assert "cannot write there" in capsys.readouterr().err


def test_an_out_directory_that_cannot_be_made_is_one_error(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(LooplmError, match="--out .*: cannot create the directory"):
        train(_config(data_dir, tmp_path / "a-file" / "run"))


def test_data_builder_checks_the_like_directory_before_writing(data_dir: Path, tmp_path: Path) -> None:
    from looplm.train.data import build_arithmetic_phase

    no_text = _broken_copy(data_dir, tmp_path / "like", lambda d: (d / "data.json").write_text(
        '{"sources": {"arithmetic": {"weight": 1.0}}}'))
    with pytest.raises(LooplmError, match="has no 'text' source to reuse"):
        build_arithmetic_phase(no_text, tmp_path / "out", 0.5, 100, 1, 2, seed=0)
    assert not (tmp_path / "out").exists()
    meta = build_arithmetic_phase(data_dir, tmp_path / "out", 0.5, 100, 1, 2, seed=0)
    assert sorted(meta["sources"]) == ["arithmetic", "text"] and meta["sources"]["text"]["weight"] == 0.5
    assert TokenBatches(tmp_path / "out", 16).names == ["arithmetic", "text"]


def _broken_copy(data_dir: Path, dest: Path, edit) -> Path:  # noqa: ANN001
    import shutil

    shutil.copytree(data_dir, dest)
    edit(dest)
    return dest


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: (d / "data.json").write_text("{oops"), "data.json is not a data directory's index \\(JSONDecodeError"),
    (lambda d: (d / "data.json").write_text("[1]"), "data.json is not a data directory's index"),
    (lambda d: (d / "data.json").write_text('{"sources": {}}'), "data.json lists no sources"),
    (lambda d: (d / "data.json").write_text('{"sources": {"text": {"weight": "x"}}}'),
     "source 'text' needs a \"weight\" >= 0, got 'x'"),
    (lambda d: (d / "data.json").write_text('{"sources": {"text": {"weight": 0}}}'), "every source has weight 0"),
    (lambda d: (d / "text.npy").unlink(), "text.npy: cannot read it"),
    (lambda d: (d / "text.npy").write_bytes(b"not numpy"), "text.npy: cannot read it"),
    (lambda d: np.save(d / "text.npy", np.zeros(500, dtype=np.float32)), "text.npy holds a float32 array"),
    (lambda d: np.save(d / "text.npy", np.full(500, 100_000, dtype=np.int64)), "holds token id 100000, past the"),
])
def test_a_broken_data_directory_is_one_error_before_any_work(data_dir: Path, tmp_path: Path, edit,  # noqa: ANN001
                                                               needle: str) -> None:
    broken = _broken_copy(data_dir, tmp_path / "data", edit)
    with pytest.raises(LooplmError, match=needle):
        train(_config(broken, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_init_from_needs_a_full_precision_checkpoint_directory(data_dir: Path, tmp_path: Path) -> None:
    from looplm.quant.export import save_quantized
    from looplm.quant.model import QuantSpec

    train(_config(data_dir, tmp_path / "base", steps=1))
    with pytest.raises(LooplmError, match="not a checkpoint directory with a config.json"):
        train(_config(data_dir, tmp_path / "run", model_config=None, init_from=tmp_path / "missing"))
    save_quantized(str(tmp_path / "base"), tmp_path / "q8", QuantSpec(bits=8))
    with pytest.raises(LooplmError, match="a quantized checkpoint cannot be trained"):
        train(_config(data_dir, tmp_path / "run", model_config=None, init_from=tmp_path / "q8"))
    assert not (tmp_path / "run").exists()
    train(_config(data_dir, tmp_path / "run", model_config=None, init_from=tmp_path / "base", steps=1))
    assert looplm.load(tmp_path / "run").config.vocab_size == looplm.load(tmp_path / "base").config.vocab_size


def test_resume_from_a_corrupt_or_foreign_state_is_one_error(data_dir: Path, tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path, steps=1))
    state = (tmp_path / "trainer_state.pt").read_bytes()
    (tmp_path / "trainer_state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(LooplmError, match="trainer_state.pt: cannot resume from it"):
        train(_config(data_dir, tmp_path, steps=2, resume=True))
    (tmp_path / "trainer_state.pt").write_bytes(state)
    wider = {**TINY_MODEL, "hidden_size": 64}
    with pytest.raises(LooplmError, match="cannot resume from it .*from another model"):
        train(_config(data_dir, tmp_path, steps=2, resume=True, model_config=wider))


def test_a_fresh_run_does_not_write_over_an_earlier_one(data_dir: Path, tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path, steps=1))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable as any new file
    earlier = (tmp_path / "trainer_state.pt").read_bytes(), (tmp_path / "train_log.jsonl").read_text()
    with pytest.raises(LooplmError, match="already holds a run .*--resume continues it, --overwrite"):
        train(_config(data_dir, tmp_path, steps=2, seed=5))
    assert ((tmp_path / "trainer_state.pt").read_bytes(), (tmp_path / "train_log.jsonl").read_text()) == earlier
    train(_config(data_dir, tmp_path, steps=2, seed=5, overwrite=True))
    assert read_log(tmp_path / "train_log.jsonl")[-1]["step"] == 2


def test_ctrl_c_finishes_the_step_saves_and_resume_continues(data_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The first Ctrl-C (SIGINT) lets the running step finish, saves a checkpoint and stops with
    KeyboardInterrupt; --resume then gives the uninterrupted run's losses."""
    train(_config(data_dir, tmp_path / "full"))
    real_batch = TokenBatches.global_batch_with_mask

    def batch_then_ctrl_c(self, step: int, batch_size: int):  # noqa: ANN001, ANN202
        if step == 2:  # the signal arrives while step 3 (0-based 2) is running
            signal.raise_signal(signal.SIGINT)
        return real_batch(self, step, batch_size)

    monkeypatch.setattr(TokenBatches, "global_batch_with_mask", batch_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(_config(data_dir, tmp_path / "split"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert torch.load(tmp_path / "split" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert [r["step"] for r in read_log(tmp_path / "split" / "train_log.jsonl")] == [1, 2, 3]
    monkeypatch.setattr(TokenBatches, "global_batch_with_mask", real_batch)
    train(_config(data_dir, tmp_path / "split", resume=True))
    full = [r["loss"] for r in read_log(tmp_path / "full" / "train_log.jsonl")]
    split = [r["loss"] for r in read_log(tmp_path / "split" / "train_log.jsonl")]
    assert split == pytest.approx(full, rel=1e-5)


def test_a_full_disk_while_saving_is_one_error_and_keeps_the_last_checkpoint(data_dir: Path, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import looplm.train.saving as saving

    out = tmp_path / "run"
    train(_config(data_dir, out, steps=2, save_every=1))
    before = torch.load(out / "trainer_state.pt", weights_only=True)["step"]
    real_save = torch.save

    def no_space(obj, path):  # noqa: ANN001, ANN202
        real_save(obj, path)  # a part of the file is written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving.torch, "save", no_space)
    with pytest.raises(LooplmError, match=r"could not write the checkpoint of step 4 in .*No space left on device.*"
                                          r"--resume continues"):
        train(_config(data_dir, out, steps=4, save_every=2, resume=True))
    assert torch.load(out / "trainer_state.pt", weights_only=True)["step"] == before == 2
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left


def test_batches_depend_only_on_seed_and_step(data_dir: Path) -> None:
    a, b = TokenBatches(data_dir, 32, seed=1), TokenBatches(data_dir, 32, seed=1)
    assert torch.equal(a.global_batch(5, 4), b.global_batch(5, 4))
    assert not torch.equal(a.global_batch(5, 4), a.global_batch(6, 4))
    assert a.global_batch(0, 3).shape == (3, 33)


def test_training_reduces_loss_and_checkpoint_loads(data_dir: Path, tmp_path: Path) -> None:
    final = train(_config(data_dir, tmp_path, steps=30, micro_batch=2, grad_checkpointing=True))
    rows = read_log(tmp_path / "train_log.jsonl")
    assert len(rows) == 30 and final["step"] == 30
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 0.5
    assert (tmp_path / "train_loss.png").stat().st_size > 0

    model = looplm.load(tmp_path, dtype="float32")
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)["model"]
    for name, param in model.named_parameters():
        assert torch.equal(param, state[name].to(torch.bfloat16).float()), name  # bf16 on disk
    assert model.config.total_ut_steps == 3 and model.tokenizer is not None
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ids = model.tokenizer.encode("12+3=")
    assert len(model.generate(ids, max_new_tokens=3)[0]) == 3


def test_micro_batches_with_a_loss_mask_match_one_batch(masked_data_dir: Path, tmp_path: Path) -> None:
    train(_config(masked_data_dir, tmp_path / "one", steps=3, bf16=False))
    train(_config(masked_data_dir, tmp_path / "four", steps=3, bf16=False, micro_batch=1))
    one = [r["loss"] for r in read_log(tmp_path / "one" / "train_log.jsonl")]
    four = [r["loss"] for r in read_log(tmp_path / "four" / "train_log.jsonl")]
    assert four == pytest.approx(one, rel=1e-5, abs=1e-6)


def test_resume_gives_identical_next_losses(data_dir: Path, tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path / "full"))
    train(_config(data_dir, tmp_path / "split", stop_at=3))
    assert len(read_log(tmp_path / "split" / "train_log.jsonl")) == 3
    with (tmp_path / "split" / "train_log.jsonl").open("a") as f:  # a row an interrupted run logged after the save
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    train(_config(data_dir, tmp_path / "split", resume=True))
    full = [r["loss"] for r in read_log(tmp_path / "full" / "train_log.jsonl")]
    split = [r["loss"] for r in read_log(tmp_path / "split" / "train_log.jsonl")]
    assert split == full


def test_resume_drops_a_cut_short_last_log_line_and_refuses_a_broken_one_before_it(data_dir: Path,
                                                                                  tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path / "full"))
    out, log = tmp_path / "split", tmp_path / "split" / "train_log.jsonl"
    train(_config(data_dir, out, stop_at=3))
    with log.open("a") as f:  # what a crash or a full disk leaves: half a row
        f.write('{"step": 4, "lr": 0.1, "lo')
    assert [r["step"] for r in read_log(log)] == [1, 2, 3]
    train(_config(data_dir, out, resume=True))
    assert [r["loss"] for r in read_log(log)] == [r["loss"] for r in read_log(tmp_path / "full" / "train_log.jsonl")]
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:20]  # the row of step 2, cut short in the middle of the file
    log.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(LooplmError, match=r"train_log.jsonl:3 is not a JSON row; the training log is corrupt"):
        train(_config(data_dir, out, steps=8, resume=True))
    assert log.read_text() == "".join(line + "\n" for line in lines)


def test_resume_of_a_run_at_its_last_step_says_so(data_dir: Path, tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path, steps=3))
    for steps in (3, 2):
        with pytest.raises(LooplmError, match=f"is at step 3, already at --steps {steps}: nothing to train; give "
                                              "--steps above 3 to continue the run"):
            train(_config(data_dir, tmp_path, steps=steps, resume=True))
    with pytest.raises(LooplmError, match="--stop-at 2: .* is already at step 3"):
        train(_config(data_dir, tmp_path, steps=5, stop_at=2, resume=True))


def test_resume_may_change_steps_and_data_with_a_warning_but_no_other_setting(data_dir: Path, masked_data_dir: Path,
                                                                              tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path, steps=4, stop_at=3))
    with pytest.raises(LooplmError, match=r"--lr 0.01 differs from the run's --lr 0.003 \(.*trainer_state.pt\); --lr "
                                          r"cannot change on --resume: drop it to continue with --lr 0.003"):
        train(_config(data_dir, tmp_path, lr=1e-2, resume=True))
    with pytest.warns(UserWarning, match=r"--steps 8 \(the run was set for 4\) re-spans the cosine: the learning "
                                         r"rate of step 4 is"):
        train(_config(data_dir, tmp_path, steps=8, stop_at=4, resume=True))
    with pytest.warns(UserWarning, match="--data .*masked.*: the run trained on .*data.* so far; its batches from step 5"):
        train(_config(masked_data_dir, tmp_path, steps=8, stop_at=5, micro_batch=2, save_every=1, resume=True))
    settings = torch.load(tmp_path / "trainer_state.pt", weights_only=True)["settings"]
    assert settings["steps"] == 8 and settings["data_dir"] == str(masked_data_dir.resolve()) and settings["lr"] == 3e-3
    events = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    resumes = [event for event in events if event.get("event") == "resume"]
    assert [(event["step"], event["changed"]) for event in resumes] == [
        (3, {"steps": [4, 8]}), (4, {"data_dir": [str(data_dir.resolve()), str(masked_data_dir.resolve())]})]


def test_resume_from_a_state_without_settings_uses_the_config_with_a_warning(data_dir: Path, tmp_path: Path) -> None:
    """What a trainer_state.pt saved before the settings were recorded does: the config as given."""
    train(_config(data_dir, tmp_path / "full"))
    out = tmp_path / "old"
    train(_config(data_dir, out, stop_at=3))
    state = torch.load(out / "trainer_state.pt", weights_only=True)
    del state["settings"]
    torch.save(state, out / "trainer_state.pt")
    with pytest.warns(UserWarning, match="trainer_state.pt holds no training settings"):
        train(_config(data_dir, out, resume=True))
    full = [r["loss"] for r in read_log(tmp_path / "full" / "train_log.jsonl")]
    assert [r["loss"] for r in read_log(out / "train_log.jsonl")] == full
    assert json.loads((out / "train_log.jsonl").read_text().splitlines()[4])["saved_settings"] is False


def _cli(*args: object):  # noqa: ANN202
    from typer.testing import CliRunner

    from looplm.cli import app

    return CliRunner().invoke(app, ["train", "--no-progress", "--device", "cpu", *map(str, args)])


def _one_line_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert needle in result.stderr


def test_cli_resume_continues_with_the_runs_settings_and_model(data_dir: Path, tmp_path: Path) -> None:
    """`--resume` alone (no --data, --model-config, --warmup, ...): the run's saved settings and model, so the
    learning rates and losses are the uninterrupted run's; a flag set to another value is an error."""
    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))
    run = ("--data", data_dir, "--model-config", tmp_path / "model.json", "--steps", 6, "--batch-size", 4,
           "--seq-len", 32, "--lr", 3e-3, "--warmup", 3, "--seed", 7)
    assert _cli(*run, "--out", tmp_path / "full").exit_code == 0
    assert _cli(*run, "--out", tmp_path / "split", "--stop-at", 2).exit_code == 0
    log = (tmp_path / "split" / "train_log.jsonl").read_text()
    for args, needle in [(("--warmup", 50), "--warmup 50 differs from the run's --warmup 3"),
                         (("--lr", 0.1), "--lr 0.1 differs from the run's --lr 0.003"),
                         (("--seed", 0), "--seed 0 differs from the run's --seed 7"),
                         (("--no-bf16",), "--no-bf16 differs from the run's --bf16"),
                         (("--stage", 2), "--stage 2 differs from the run's --stage 1")]:
        _one_line_error(_cli("--out", tmp_path / "split", "--resume", *args), needle)
    assert (tmp_path / "split" / "train_log.jsonl").read_text() == log
    result = _cli("--out", tmp_path / "split", "--resume")
    assert result.exit_code == 0, result.output
    full, split = (read_log(tmp_path / name / "train_log.jsonl") for name in ("full", "split"))
    assert [r["lr"] for r in split] == [r["lr"] for r in full] and [r["loss"] for r in split] == [r["loss"] for r in full]
    events = [row for row in map(json.loads, (tmp_path / "split" / "train_log.jsonl").read_text().splitlines())
              if "event" in row]
    assert [(event["event"], event.get("step")) for event in events] == [("start", None), ("resume", 2)]
    assert events[1]["config"]["warmup_steps"] == 3 and events[1]["config"]["seed"] == 7


def test_stage2_trains_only_the_gate(data_dir: Path, tmp_path: Path) -> None:
    train(_config(data_dir, tmp_path / "s1", steps=3))
    train(_config(data_dir, tmp_path / "s2", init_from=tmp_path / "s1", model_config=None, stage=2, steps=3))
    before, after = looplm.load(tmp_path / "s1"), looplm.load(tmp_path / "s2")
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)}
    assert changed and changed <= {"model.early_exit_gate.weight", "model.early_exit_gate.bias"}
    assert "step_bce" in read_log(tmp_path / "s2" / "train_log.jsonl")[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config: TrainConfig) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config)


def test_ddp_two_processes_match_one(masked_data_dir: Path, tmp_path: Path) -> None:
    # fp32 so that only the all-reduce order differs; 2 processes x 2 sequences = the same global batch of 4.
    # The answers-only loss mask gives the two processes different token counts: the loss must still be the
    # global batch's masked mean.
    single = _config(masked_data_dir, tmp_path / "single", steps=4, bf16=False)
    train(single)
    double = _config(masked_data_dir, tmp_path / "ddp", steps=4, bf16=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), double), nprocs=2, join=True)
    one = [r["loss"] for r in read_log(tmp_path / "single" / "train_log.jsonl")]
    two = [r["loss"] for r in read_log(tmp_path / "ddp" / "train_log.jsonl")]
    assert json.loads((tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()[0])["world_size"] == 2
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)


# -- assets: sdist members -----------------------------------------------------------------------


def test_fetch_asset_reads_a_folder_from_an_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"To be, or not to be"

    def fake_download(requirement: str, dest: Path, sdist: bool = False) -> None:
        assert sdist
        with tarfile.open(dest / "pkg-1.0.tar.gz", "w:gz") as tf:
            for name, data in (("pkg-1.0/texts/hamlet.txt", payload), ("pkg-1.0/setup.py", b"")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_pip_download", fake_download)
    asset = Asset("pkg==1.0", "pkg-1.0/texts/", "hamlet.txt", hashlib.sha256(payload).hexdigest(), sdist=True)
    monkeypatch.setitem(assets.ASSETS, "test-sdist", asset)
    path = fetch_asset("test-sdist")
    assert [p.name for p in path.iterdir()] == ["hamlet.txt"] and (path / "hamlet.txt").read_bytes() == payload


# -- the packaged default model ------------------------------------------------------------------


def test_default_model_is_the_packaged_tiny_ouro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from looplm import default_model

    assert default_model.default_model_dir() == default_model.PACKAGED_DIR
    assert (default_model.PACKAGED_DIR / "model.safetensors").stat().st_size <= 25 * 1024 * 1024
    model = looplm.load()
    assert model.config.num_hidden_layers == 4 and model.config.total_ut_steps == 4
    assert model.tokenizer is not None and model.tokenizer.vocab_size == model.config.vocab_size
    monkeypatch.setattr(default_model, "PACKAGED_DIR", tmp_path / "missing")
    with pytest.warns(UserWarning, match="RANDOM"):
        fallback = default_model.default_model_dir()
    assert fallback.name == default_model.DEFAULT_NAME


def test_cli_model_config_tiny_ouro_is_the_embedded_architecture(data_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model-config tiny-ouro` needs no file from the repository (a wheel install has none); the
    vocabulary and token ids come from the run's tokenizer, not the embedded model's."""
    from looplm.default_model import PACKAGED_DIR
    from looplm.tokenizer import Tokenizer

    monkeypatch.chdir(tmp_path)  # no ./tiny-ouro here
    result = _cli("--data", data_dir, "--model-config", "tiny-ouro", "--steps", 1, "--batch-size", 2,
                  "--seq-len", 16, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    embedded = json.loads((PACKAGED_DIR / "config.json").read_text())
    tokenizer = Tokenizer.from_dir(data_dir)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "total_ut_steps"):
        assert saved[key] == embedded[key], key
    assert saved["vocab_size"] == tokenizer.vocab_size and saved["eos_token_id"] == tokenizer.eos_id
