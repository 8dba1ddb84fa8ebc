"""The embedded demo model: its seeded data generator, tokenizer and chat template, and the
shipped checkpoint (loads in tokenmill, answers an addition, same ids as AutoTokenizer)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tokenmill.cli import default_model_path
from tokenmill.demo import data
from tokenmill.demo import tokenizer as demo_tok

SHIPPED = default_model_path()
needs_checkpoint = pytest.mark.skipif(SHIPPED is None, reason="no embedded demo model")


def test_generator_is_seeded_and_covers_every_kind():
    a = [dataclasses.asdict(s) for s in data.generate(300, seed=7)]
    assert a == [dataclasses.asdict(s) for s in data.generate(300, seed=7)]
    assert a != [dataclasses.asdict(s) for s in data.generate(300, seed=8)]
    samples = data.generate(2000, seed=0)
    assert {s.kind for s in samples} == set(data.KINDS)
    assert any(s.thinking and s.completion.startswith("<think>\n") for s in samples)
    assert any(s.messages and s.messages[0]["role"] == "system" for s in samples)


def test_arithmetic_answers_and_held_out_pairs():
    for split in ("train", "eval"):
        for s in data.generate(300, seed=1, split=split, kinds={"arithmetic": 1.0}):
            m = s.meta
            assert data.held_out(m["op"], m["a"], m["b"]) == (split == "eval")
            assert s.completion.endswith(f"{m['a']} {m['op']} {m['b']} = {m['answer']}.")
    assert data.answer_line("+", 37, 48) == "37 + 48 = 85."
    assert data.worked_answer("+", 37, 48) == \
        "7 + 8 = 15, carry 1. 3 + 4 + 1 = 8. So 37 + 48 = 85."
    assert data.worked_answer("-", 96, 49) == \
        "96 - 49: tens 9 > 4. 6 - 9 needs a borrow: 16 - 9 = 7. 9 - 1 - 4 = 4. So 96 - 49 = 47."
    assert data.worked_answer("-", 33, 68) == (
        "33 - 68: tens 3 < 6, so 33 is smaller and I compute 68 - 33. "
        "8 - 3 = 5. 6 - 3 = 3. So 33 - 68 = -35.")
    assert data.worked_answer("-", 77, 78).startswith(
        "77 - 78: tens 7 = 7, ones 7 < 8, so 77 is smaller and I compute 78 - 77.")
    assert data.compare(5, 5) == "tens 0 = 0, ones 5 = 5"
    assert data.thinking_steps("-", 89, 86).splitlines()[1] == "Compare: tens 8 = 8, ones 9 > 6."
    assert data.thinking_steps("+", 37, 48).splitlines()[1:] == [
        "Ones: 7 + 8 = 15. Write 5, carry 1.", "Tens: 3 + 4 + 1 = 8.", "So 37 + 48 = 85."]


def test_tool_samples_call_with_arguments_from_the_question():
    for s in data.generate(100, seed=2, kinds={"tool_call": 1.0}):
        names = [t["function"]["name"] for t in s.tools]
        assert s.meta["tool"] in names
        call = json.loads(s.completion.split("<tool_call>\n")[1].split("\n</tool_call>")[0])
        assert call == {"name": s.meta["tool"], "arguments": s.meta["arguments"]}
        question = s.messages[-1]["content"]
        assert all(str(v) in question for v in call["arguments"].values())
    for s in data.generate(50, seed=3, kinds={"tool_answer": 1.0}):
        assert [m["role"] for m in s.messages][-3:] == ["user", "assistant", "tool"]
        assert all(x in s.completion for x in s.meta["mentions"])


def test_training_asks_about_made_up_places_and_evaluation_about_real_ones():
    from tokenmill.demo import tools

    def places(split: str) -> list[str]:
        out = []
        for s in data.generate(300, seed=5, split=split, kinds={"tool_call": 1.0}):
            args = s.meta["arguments"]
            out += [args[k] for k in ("city", "location") if k in args]
        return out

    train, held_out = places("train"), places("eval")
    made_up = [p for p in train if p not in tools.CITIES]
    assert 0.3 < len(made_up) / len(train) < 0.7
    assert len(set(made_up)) > 0.8 * len(made_up)   # too many to memorise
    assert held_out and all(p in tools.CITIES for p in held_out)


def test_training_lists_tools_under_made_up_names_and_evaluation_under_real_ones():
    from tokenmill.demo import tools

    real = {n for names in tools._REAL.values() for n in names}
    for split in ("train", "eval"):
        called = []
        for s in data.generate(300, seed=6, split=split, kinds={"tool_call": 1.0}):
            schema = next(t["function"] for t in s.tools if t["function"]["name"] == s.meta["tool"])
            assert set(s.meta["arguments"]) <= set(schema["parameters"]["properties"])
            called.append(s.meta["tool"])
        share = sum(n not in real for n in called) / len(called)
        assert (0.35 < share < 0.65) if split == "train" else share == 0


def test_made_up_tool_names_come_in_every_shape_and_never_recur():
    """Verb first, noun first and camelCase all occur, so no shape is a safe guess; and each
    name holds a made-up word, so no name recurs often enough to be learned as a guess: the
    model must copy the listed one."""
    import random

    from tokenmill.demo import tools

    rng = random.Random(0)
    names = [tools.made_up_tool_name(rng, "weather") for _ in range(2000)]
    verb_first = sum(n.split("_")[0] in tools._VERBS for n in names)
    noun_first = sum(n.startswith(tuple(tools._NOUNS["weather"])) for n in names)
    camel = sum(n != n.lower() for n in names)
    assert verb_first > 400 and noun_first > 300 and camel > 200
    assert len(set(names)) > 0.95 * len(names)
    real = {n for names in tools._REAL.values() for n in names}
    assert not real & set(names)


def test_copy_drills_answer_only_with_words_in_the_prompt():
    """A repeat drill answers with the text after the request; a recall drill with the one
    name the system prompt pairs with the asked role, listed name first or role first."""
    from tokenmill.demo import copying

    shapes = set()
    for s in data.generate(300, seed=7, kinds={"copy": 1.0}):
        answer = s.meta["copy"]
        assert s.completion.endswith(answer)
        if s.messages[0]["content"].startswith("You know these helpers"):
            helpers = s.messages[0]["content"].splitlines()[1:]
            role = next(r for r in copying.ROLES.values() if r in s.messages[1]["content"])
            line = next(h for h in helpers if role in h)
            assert line in (f"{answer}: {role}", f"The one that {role} is {answer}.")
            shapes.add(line.startswith("The one"))
        else:
            assert s.messages[-1]["content"].endswith(answer) or f"Write {answer} again" in \
                s.messages[-1]["content"]
    assert shapes == {True, False}


@pytest.fixture(scope="module")
def hf_tokenizer():
    if SHIPPED:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True)
    texts = [s.completion for s in data.generate(200, seed=0)]
    return demo_tok.to_transformers(demo_tok.train_tokenizer(texts, 600))


def test_template_renders_tools_tool_results_and_thinking(hf_tokenizer):
    s = data.generate(1, seed=4, kinds={"tool_answer": 1.0})[0]
    text = hf_tokenizer.apply_chat_template(s.messages, tools=s.tools, tokenize=False,
                                            add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert "# Tools" in text and json.dumps(s.tools[0]) in text
    call = s.messages[-2]["tool_calls"][0]["function"]
    assert (f'<|im_start|>assistant\n<tool_call>\n{{"name": "{call["name"]}", "arguments": '
            f'{call["arguments"]}}}\n</tool_call><|im_end|>\n') in text
    assert ("<|im_start|>user\n<tool_response>\n" + s.messages[-1]["content"] +
            "\n</tool_response><|im_end|>\n") in text
    # Thinking off (the default): an empty think block is pre-filled; on: the model opens one.
    msgs = [{"role": "user", "content": "Hi"}]
    off = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    on = hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                          enable_thinking=True)
    assert off == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # Earlier turns lose their reasoning.
    history = msgs + [{"role": "assistant", "content": "<think>\nx\n</think>\n\nHello!"}]
    assert hf_tokenizer.apply_chat_template(history, tokenize=False).endswith(
        "<|im_start|>assistant\nHello!<|im_end|>\n")


@needs_checkpoint
def test_shipped_folder_autotokenizer_matches_tokenizer_json():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(f"{SHIPPED}/tokenizer.json")
    texts = [s.completion for s in data.generate(50, seed=5)] + [
        "What is 37 + 48?", "<think>\n</think>\n\n<tool_call>\n{}\n</tool_call> café 😀 2025"]
    assert demo_tok.check_same_ids(tok, SHIPPED, texts) == len(texts)
    gen = json.loads(open(f"{SHIPPED}/generation_config.json").read())
    assert gen["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]


@needs_checkpoint
def test_shipped_model_adds_in_tokenmill():
    from tokenmill import LLM, SamplingParams

    llm = LLM(model=SHIPPED, num_kv_blocks=64, show_progress=False)
    params = SamplingParams(temperature=0, max_tokens=64)
    outs = llm.chat([[{"role": "user", "content": "What is 37 + 48?"}],
                     [{"role": "user", "content": "Hello!"}]], params, use_tqdm=False)
    assert outs[0].outputs[0].text.endswith("So 37 + 48 = 85.")
    assert "tokenmill" in outs[1].outputs[0].text


def test_a_word_is_the_same_token_after_a_space_and_after_a_quote():
    # What lets a tiny model copy a city from the question into a tool call's arguments.
    texts = [s.messages[-1]["content"] + s.completion
             for s in data.generate(400, seed=4, kinds={"tool_call": 1.0})]
    tok = demo_tok.train_tokenizer(texts, 1000)
    for city in ("Oslo", "Mexico City", "Buenos Aires"):
        word = tok.encode(city).ids
        for text in (f"What is the weather in {city}?", f'{{"city": "{city}"}}'):
            ids = tok.encode(text).ids
            assert any(ids[i:i + len(word)] == word for i in range(len(ids))), (city, text)


@needs_checkpoint
def test_shipped_model_same_greedy_text_in_transformers_and_tokenmill():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(SHIPPED, local_files_only=True)
    hf = AutoModelForCausalLM.from_pretrained(SHIPPED, local_files_only=True,
                                              dtype=torch.float32).eval()
    chats = [[{"role": "user", "content": "What is 91 - 57?"}],
             [{"role": "user", "content": "Who are you?"}]]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
               for c in chats] + ["Once upon a time, there was a little fox"]
    want = []
    for text in prompts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=40, do_sample=False)
        want.append(out[0, ids.shape[1]:].tolist())
    llm = LLM(model=SHIPPED, num_kv_blocks=64, show_progress=False)
    got = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    # transformers stops at the first EOS id and includes it, as tokenmill does
    assert [list(o.outputs[0].token_ids) for o in got] == want


def test_tool_sessions_chain_several_calls_over_one_tool_list():
    for s in data.generate(60, seed=6, kinds={"tool_session": 1.0}):
        names = {t["function"]["name"] for t in s.tools}
        calls = [m["tool_calls"][0]["function"] for m in s.messages if m.get("tool_calls")]
        assert calls and all(c["name"] in names for c in calls)
        roles = [m["role"] for m in s.messages if m["role"] != "system"]
        # every call is answered by a tool message, and every result by an assistant answer
        for i, role in enumerate(roles):
            if role == "tool":
                assert roles[i - 1] == "assistant"
        if "tool" in s.meta:
            assert roles[-1] == "user" and s.completion.endswith("</tool_call>")
        else:
            assert roles[-1] == "tool" and "<tool_call>" not in s.completion


def test_training_rows_learn_every_assistant_turn_and_restart_positions():
    from tokenmill.demo import train

    samples = data.generate(40, seed=9, kinds={"tool_session": 1.0})
    texts = [train.prompt_text(_plain_template(), s) + s.completion for s in samples]
    tok = demo_tok.train_tokenizer(texts, 700)
    hf = demo_tok.to_transformers(tok)
    s = samples[0]
    prompt = train.prompt_text(hf, s)
    spans = train.learned_spans(prompt)
    assert len(spans) == sum(m["role"] == "assistant" for m in s.messages)
    assert all(prompt[b - len("<|im_end|>"):b] == "<|im_end|>" for a, b in spans)
    (ids, labels), = train.encode(tok, hf, [s])
    learned = tok.decode([t for t in labels if t != train.IGNORE], skip_special_tokens=False)
    # each earlier turn is learned but for its first token; the completion in full
    answers = [m["content"] for m in s.messages if m["role"] == "assistant" and m["content"]]
    assert all(a.split(" ", 1)[1] in learned for a in answers)
    assert learned.endswith(s.completion + "<|im_end|>")
    assert "<|im_start|>" not in learned and "<tool_response>" not in learned
    encoded = train.encode(tok, hf, samples)
    x, y, pos = train.pack(encoded, 1024, 0, seed=0)
    assert x.shape == y.shape == pos.shape and x.shape[1] == 1024
    starts = (pos == 0).sum().item()
    assert starts >= len(samples)      # one per sample (and one per padded tail)
    row = pos[0].tolist()
    assert all(b == a + 1 or b == 0 for a, b in zip(row, row[1:]))


def _plain_template():
    return demo_tok.to_transformers(demo_tok.train_tokenizer(["x"], 300))


def test_copy_rows_learn_only_the_repeat_of_each_random_run():
    """Each packed sample is <|im_start|>, random tokens, a newline and the same tokens again;
    only the repeat is labelled, positions restart per sample, and the rows are seeded."""
    import torch

    from tokenmill.demo import train

    texts = [s.completion for s in data.generate(200, seed=0)]
    tok = demo_tok.train_tokenizer(texts, 500)
    x, y, pos = train.copy_rows(tok, 3, 256, seed=5)
    assert torch.equal(x, train.copy_rows(tok, 3, 256, seed=5)[0])
    start, sep = tok.token_to_id("<|im_start|>"), tok.token_to_id("\u010a")
    n_samples = 0
    for r in range(3):
        starts = (pos[r] == 0).nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:]):
            if x[r, a] != start:       # the padding at the row's end
                continue
            n = (b - a - 2) // 2
            words = x[r, a + 1:a + 1 + n]
            assert x[r, a + 1 + n] == sep and torch.equal(x[r, a + 2 + n:b], words)
            assert torch.equal(y[r, a + 2 + n:b], words)
            assert (y[r, a:a + 2 + n] == train.IGNORE).all()
            n_samples += 1
    assert n_samples >= 15


def test_loss_on_labelled_positions_equals_the_full_logits_loss():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tokenmill.demo import train

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, intermediate_size=64, tie_word_embeddings=True))
    x = torch.randint(0, 50, (2, 12))
    pos = torch.arange(12).repeat(2, 1)
    y = x.clone()
    y[:, :5] = train.IGNORE           # a prompt: not learned
    full = torch.nn.functional.cross_entropy(
        model(input_ids=x, position_ids=pos).logits[:, :-1].reshape(-1, 50),
        y[:, 1:].reshape(-1), ignore_index=train.IGNORE)
    assert torch.allclose(train.next_token_loss(model, x, y, pos, bf16=False), full, atol=1e-6)


def test_training_script_writes_the_same_transformers_folder_twice(tmp_path):
    """Seeded end to end: two runs of the script write identical weights, in a folder that
    transformers loads with the trained tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.demo import train

    args = ["--samples", "120", "--tokenizer-samples", "120", "--vocab-size", "400",
            "--hidden", "64", "--layers", "1", "--intermediate", "96", "--seq-len", "256",
            "--batch-size", "2", "--steps", "3", "--copy-steps", "2", "--no-compile", "--no-bf16",
            "--save-every", "0"]
    for run in ("a", "b"):
        train.main(args + ["--out", str(tmp_path / run)])
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    assert model.config.hidden_size == 64 and len(tok) == model.config.vocab_size
    assert tok.decode(tok("What is 37 + 48?")["input_ids"]) == "What is 37 + 48?"
