"""IncrementalDetokenizer: streamed text equals tokenizer.decode, stop strings, hold-back."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tokenmill.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from tokenmill.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, this is a small test corpus.",
    "The café on the corner serves naïve coffee drinkers.",
    "日本語のテキストも少し入れておきます。",
    "Emoji time 🙂🙂 and a party 🎉 with friends!",
    "Numbers 12345 and symbols #$%&* (parentheses) [brackets].",
    "  leading spaces and\nnew lines\n\nand tabs\t too",
    "Ünïcödé straße façade résumé crème brûlée",
    "한국어 텍스트와 Привет мир, γειά σου κόσμε",
    "the quick brown fox jumps over the lazy dog",
    "STOP here. Then continue; the end is near.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:])


def _stream(tok, prompt_ids, output_ids, params, chunk=1, delta=True):
    """Feed output_ids in chunks; return (list of reported texts, detokenizer, stop)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, params)
    reported, stop = [], None
    for i in range(0, len(output_ids), chunk):
        stop = detok.update(output_ids[i:i + chunk])
        finished = stop is not None or i + chunk >= len(output_ids)
        reported.append(detok.get_next_output_text(finished, delta))
        if stop is not None:
            break
    return reported, detok, stop


def test_tokenizer_splits_multibyte_chars(tokenizer):
    # The fixture must exercise the hard case: a character spread over several tokens.
    ids = tokenizer.encode("🦀 猫")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("use_stream", [True, False], ids=["DecodeStream", "offsets"])
@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_random_sequences_match_decode(tokenizer, skip, chunk, use_stream):
    rng = random.Random(1234 + chunk)
    vocab = len(tokenizer)
    specials = tokenizer.all_special_ids

    def random_ids(n):
        # Random byte-level tokens split characters and form invalid UTF-8; 10% specials.
        return [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(vocab)
                for _ in range(n)]

    params = SamplingParams(skip_special_tokens=skip)
    for _ in range(250):
        prompt = random_ids(rng.randint(0, 8))
        out = random_ids(rng.randint(1, 40))
        expected = tokenizer.decode(out, skip_special_tokens=skip)
        detok = IncrementalDetokenizer(tokenizer, prompt, params, _use_stream=use_stream)
        deltas = []
        for i in range(0, len(out), chunk):
            detok.update(out[i:i + chunk])
            deltas.append(detok.get_next_output_text(i + chunk >= len(out), delta=True))
        assert "".join(deltas) == expected == detok.output_text, (prompt, out)


@pytest.mark.parametrize("skip", [True, False])
def test_real_text_deltas_and_cumulative(tokenizer, skip):
    text = "<|im_start|>assistant\nThe café 🙂 naïve 日本語 🎉<|im_end|>"
    ids = tokenizer.encode(text)
    prompt = tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n")
    params = SamplingParams(skip_special_tokens=skip)
    deltas, detok, _ = _stream(tokenizer, prompt, ids, params)
    expected = tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    assert ("<|im_end|>" in expected) is (not skip)
    assert not any("\ufffd" in d for d in deltas)
    # Cumulative mode reports the growing prefix each time.
    cumulative, _, _ = _stream(tokenizer, prompt, ids, params, delta=False)
    assert cumulative[-1] == expected
    assert all(expected.startswith(c) for c in cumulative)


def test_multibyte_char_split_across_tokens(tokenizer):
    ids = tokenizer.encode("🦀")  # not in the corpus: one byte-level token per byte
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for t in ids[:-1]:
        detok.update([t])
        assert detok.get_next_output_text(False, True) == ""
        assert detok.output_text == ""
    detok.update(ids[-1:])
    assert detok.get_next_output_text(False, True) == "🦀"


def test_output_cut_mid_character_flushes_replacement(tokenizer):
    ids = tokenizer.encode("ok 🦀")[:-1]
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    full = tokenizer.decode(ids)
    assert full.startswith("ok") and full.endswith("\ufffd")
    detok.update(ids)
    assert detok.get_next_output_text(False, True) == "ok"   # " \xf0\x9f\xa6" is pending
    assert detok.get_next_output_text(True, True) == full[2:]
    assert detok.output_text == full


@pytest.fixture(scope="module")
def sp_tokenizer():
    """SentencePiece-style: Metaspace "▁" words, byte fallback, leading space stripped."""
    vocab = {"<unk>": 0, "</s>": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    for word in ["▁Hello", "▁world", "a", "▁"]:
        vocab[word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("use_stream", [True, False])
def test_first_output_token_keeps_its_space_after_a_prompt(sp_tokenizer, use_stream):
    hello, world = sp_tokenizer.convert_tokens_to_ids(["▁Hello", "▁world"])
    assert sp_tokenizer.decode([world]) == "world"  # decode-from-zero drops the space
    detok = IncrementalDetokenizer(sp_tokenizer, [hello], SamplingParams(),
                                   _use_stream=use_stream)
    detok.update([world])
    assert detok.get_next_output_text(False, True) == " world"
    # Without a prompt the output decodes as tokenizer.decode does.
    detok = IncrementalDetokenizer(sp_tokenizer, [], SamplingParams(), _use_stream=use_stream)
    detok.update([hello, world])
    assert detok.output_text == sp_tokenizer.decode([hello, world]) == "Hello world"


def test_non_monotonic_decode_falls_back_to_offsets(sp_tokenizer):
    # "é" as bytes C3 A9 decodes, then a stray 0x80 turns the whole byte run into U+FFFDs:
    # DecodeStream raises "Invalid prefix"; the detokenizer carries on in Python.
    ids = sp_tokenizer.convert_tokens_to_ids(["<0xC3>", "<0xA9>", "<0x80>", "a", "▁world"])
    detok = IncrementalDetokenizer(sp_tokenizer, [], SamplingParams())
    streamed = ""
    for t in ids:
        detok.update([t])
        streamed += detok.get_next_output_text(False, True)
    assert detok._decoder._fallback is not None
    assert streamed == detok.output_text
    assert streamed.startswith("é") and streamed.endswith("a world")


def test_prompt_context_keeps_leading_space(tokenizer):
    prompt = tokenizer.encode("Hello")
    out = tokenizer.encode("Hello world")[len(prompt):]
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    detok.update(out)
    assert detok.output_text == " world"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_across_tokens(tokenizer, include, chunk):
    ids = tokenizer.encode("Hello world, STOP here. Then more text")
    params = SamplingParams(stop=["STOP here"], include_stop_str_in_output=include)
    deltas, detok, stop = _stream(tokenizer, [], ids, params, chunk=chunk)
    assert stop == "STOP here"
    expected = "Hello world, STOP here" if include else "Hello world, "
    assert detok.output_text == expected
    assert "".join(deltas) == expected


def test_earliest_stop_string_wins(tokenizer):
    ids = tokenizer.encode("the quick brown fox jumps")
    params = SamplingParams(stop=["fox", "quick"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert detok.update(ids) == "quick"
    assert detok.output_text == "the "


def test_partial_stop_string_is_held_back(tokenizer):
    params = SamplingParams(stop=["STOP"])
    ids = tokenizer.encode("abc ST")
    detok = IncrementalDetokenizer(tokenizer, [], params)
    streamed = ""
    for t in ids:
        assert detok.update([t]) is None
        streamed += detok.get_next_output_text(False, True)
        assert "S" not in streamed
    assert streamed == "abc ST"[:-3]   # max(len(stop)) - 1 = 3 chars held back
    # Not a stop string after all: the held-back text comes out when the request finishes.
    assert detok.get_next_output_text(True, True) == "abc ST"[-3:]
    assert detok.get_next_output_text(False, False) == "abc ST"[:-3]
    assert detok.get_next_output_text(True, False) == "abc ST"


def test_no_hold_back_with_include_stop_str(tokenizer):
    params = SamplingParams(stop=["STOP"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    detok.update(tokenizer.encode("abc ST"))
    assert detok.get_next_output_text(False, True) == "abc ST"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("STOP STOP")
    first = len(tokenizer.encode("STOP"))
    params = SamplingParams(stop=["STOP"], min_tokens=first, max_tokens=50)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert detok.update(ids[:first]) is None
    assert detok.update(ids[first:]) == "STOP"
    assert detok.output_text == "STOP "


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text(tokenizer, include):
    stop_id = tokenizer.encode("dog")[0]
    ids = tokenizer.encode("lazy ") + [stop_id]
    params = SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    detok.update(ids, stop_terminated=True)
    assert detok.get_next_output_text(True, False) == tokenizer.decode(ids if include
                                                                       else ids[:-1])


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("hi<|im_end|><|endoftext|>")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(skip_special_tokens=skip))
    detok.update(ids)
    assert detok.get_next_output_text(True, False) == \
        ("hi" if skip else "hi<|im_end|><|endoftext|>")


def test_detokenize_false(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [1, 2], SamplingParams(detokenize=False,
                                                                     stop=["a"]))
    assert detok.update(tokenizer.encode("a cat")) is None
    assert detok.output_text == ""
    assert detok.get_next_output_text(True, True) == ""
    assert detok.output_token_ids == tokenizer.encode("a cat")


def test_decode_logprob_tokens(tokenizer):
    ids = tokenizer.encode("café<|im_end|>")
    assert decode_logprob_tokens(tokenizer, ids) == [tokenizer.decode([i]) for i in ids]
    assert decode_logprob_tokens(tokenizer, ids)[-1] == "<|im_end|>"
