"""Train the embedded demo model: generated data -> tokenizer -> a small Qwen3 -> HF folder.

    nice -n 19 python -m tokenmill.demo.train --out tokenmill/assets/demo-model

Everything is seeded (data, tokenizer, initialisation, batch order), so the same command gives
the same model up to floating-point noise. The model is transformers' ``Qwen3ForCausalLM``
built from a config (that guarantees the Hugging Face format); the loop is plain PyTorch:
AdamW, linear warm-up then cosine decay, gradient clipping, whole samples packed into rows (each
attending only to itself), the loss only on assistant tokens (chat) or on all tokens (stories).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX crashes some VMs

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tokenmill.demo import data  # noqa: E402
from tokenmill.demo import tokenizer as demo_tok  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "demo-model"
IGNORE = -100


def model_config(vocab_size: int, ids: dict[str, int], args):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
        head_dim=64, intermediate_size=args.intermediate, max_position_embeddings=1024,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
        use_sliding_window=False, bos_token_id=None, eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])


def prompt_text(hf_tok, s: data.Sample) -> str:
    """The prompt a server would render for ``s`` ("" for a story)."""
    if s.kind == "story":
        return ""
    return hf_tok.apply_chat_template(s.messages, tools=s.tools, tokenize=False,
                                      add_generation_prompt=True, enable_thinking=s.thinking)


def learned_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns already in a rendered prompt (content and
    ``<|im_end|>``); the open generation prompt at the end is not one."""
    head, end_tag, spans = "<|im_start|>assistant\n", "<|im_end|>", []
    i = prompt.find(head)
    while i != -1:
        start = i + len(head)
        end = prompt.find(end_tag, start)
        if end == -1:
            break
        spans.append((start, end + len(end_tag)))
        i = prompt.find(head, end)
    return spans


def encode(tok, hf_tok, samples: list[data.Sample]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per sample; prompt and completion encoded apart, as at inference.

    The loss is on the completion and on every earlier assistant turn, except each earlier
    turn's first token: that one decides between opening a ``<think>`` block and answering,
    which only the generation prompt (thinking on or off) can tell."""
    eos, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    texts = [prompt_text(hf_tok, s) for s in samples]
    prompts = tok.encode_batch(texts)
    completions = tok.encode_batch([s.completion for s in samples])
    out = []
    for s, text, p, c in zip(samples, texts, prompts, completions):
        labels = [IGNORE] * len(p.ids)
        for start, end in learned_spans(text):
            inside = [k for k, (a, b) in enumerate(p.offsets) if a >= start and b <= end]
            for k in inside[1:]:
                labels[k] = p.ids[k]
        tail = c.ids + [eot if s.kind == "story" else eos]
        out.append((p.ids + tail, labels + tail))
    return out


def pack(encoded, seq_len: int, pad_id: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Whole samples, in a seeded order, packed greedily into rows of ``seq_len`` tokens:
    (inputs, labels, position ids). Positions restart at each sample, which makes transformers
    mask attention to the sample itself, as at inference."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[list[int], list[int], list[int]]] = []
    x: list[int] = []
    y: list[int] = []
    pos: list[int] = []

    def close() -> None:
        pad = seq_len - len(x)
        rows.append((x + [pad_id] * pad, y + [IGNORE] * pad, pos + list(range(pad))))

    for i in order:
        ids, labels = encoded[i]
        ids, labels = ids[:seq_len], labels[:seq_len]
        if len(x) + len(ids) > seq_len:
            close()
            x, y, pos = [], [], []
        x, y, pos = x + ids, y + labels, pos + list(range(len(ids)))
    if x:
        close()
    return tuple(torch.tensor([r[k] for r in rows]) for k in range(3))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_data(args):
    """Samples, the trained tokenizer and the packed (inputs, labels) rows."""
    samples = data.generate(args.samples, seed=args.seed, split="train")
    # The tokenizer learns from rendered samples: the template's markup is in its vocabulary.
    plain = demo_tok.to_transformers(demo_tok.train_tokenizer(["x"], 300))
    texts = [prompt_text(plain, s) + s.completion for s in samples[:args.tokenizer_samples]]
    tok = demo_tok.train_tokenizer(texts, args.vocab_size)
    hf_tok = demo_tok.to_transformers(tok)
    encoded = encode(tok, hf_tok, samples)
    x, y, pos = pack(encoded, args.seq_len, tok.token_to_id("<|endoftext|>"), args.seed)
    return samples, tok, texts, x, y, pos


def copy_rows(tok, n_rows: int, seq_len: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Rows of pure copying, packed by ``pack``: samples of random tokens, a newline, the same
    tokens again, with the loss on the repeat only. Nothing but attention to the first half
    predicts the second, so these teach the model to copy (an induction head) within a few
    hundred steps; the chat mix, where copying is a few percent of the loss, never did (after
    3,400 steps a made-up tool name's first token still had p < 0.01). Each sample starts with
    ``<|im_start|>``, as every chat sample does: without a constant first token the copying
    was learned about twice as slowly (a place for attention to rest, it seems)."""
    skip = {tok.token_to_id(t) for t in demo_tok.SPECIAL_TOKENS + demo_tok.MARKUP_TOKENS}
    allowed = [i for i in range(tok.get_vocab_size()) if i not in skip]
    start, sep = tok.token_to_id("<|im_start|>"), tok.token_to_id("\u010a")
    rng = random.Random(seed)
    samples = []
    # 2-32 tokens twice: 36 on average, so 14 samples fill a row of 512; 16 per row is plenty.
    for _ in range(n_rows * max(4, seq_len // 32)):
        words = rng.choices(allowed, k=rng.randint(2, 32))
        samples.append(([start] + words + [sep] + words, [IGNORE] * (len(words) + 2) + words))
    rows = pack(samples, seq_len, tok.token_to_id("<|endoftext|>"), seed)
    if len(rows[0]) < n_rows:
        raise ValueError(f"{n_rows} rows of {seq_len} need more copy samples")
    return tuple(t[:n_rows] for t in rows)


def next_token_loss(model, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor,
                    bf16: bool) -> torch.Tensor:
    """Mean cross-entropy of the labelled next tokens. The head runs only where there is a
    label: prompts (system, tools) are two thirds of the tokens, and their [tokens, vocab]
    logits were the step's largest tensors."""
    target = y[:, 1:]
    keep = target != IGNORE
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.model(input_ids=x, position_ids=pos, use_cache=False).last_hidden_state
        logits = model.lm_head(hidden[:, :-1][keep])                        # [labels, V]
    return F.cross_entropy(logits.float(), target[keep])


def train(model, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, args, on_checkpoint=None,
          state: dict | None = None, drills: tuple[torch.Tensor, ...] | None = None
          ) -> list[float]:
    """The loop. Every ``args.save_every`` steps ``on_checkpoint(step, optimizer, losses)`` is
    called; ``state`` (model, optimizer, step, losses) resumes a run where it stopped.

    The first ``len(drills[0]) // batch_size`` steps train on the ``drills`` rows (x, y, pos)
    alone (see ``copy_rows``)."""
    from tqdm.auto import tqdm

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    n_drill = len(drills[0]) // args.batch_size if drills else 0
    steps = args.steps or math.ceil(len(x) * args.epochs / args.batch_size) + n_drill
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(x), generator=gen)
                       for _ in range(math.ceil(steps * args.batch_size / len(x)) + 1)])
    losses, start = [], 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        losses, start = state["losses"], state["step"]
    model.train()
    if args.compile:
        # Inductor fuses the norms, rotary and SiLU products that eager runs op by op. Only the
        # decoder layers: the embedding's backward would become a scatter with atomic adds,
        # whose order (and so the trained bits) changes from run to run.
        for layer in model.model.layers:
            layer.compile()
    smooth = sum(losses[-50:]) / len(losses[-50:]) if losses else None
    bar = tqdm(range(start, steps), desc="train", initial=start, total=steps, mininterval=5)
    for step in bar:
        if step < n_drill:
            idx = slice(step * args.batch_size, (step + 1) * args.batch_size)
            xb, yb, pb = (t[idx] for t in drills)
        else:
            idx = order[(step - n_drill) * args.batch_size:(step - n_drill + 1) * args.batch_size]
            xb, yb, pb = x[idx], y[idx], pos[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args.lr, args.warmup)
        loss = next_token_loss(model, xb, yb, pb, args.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        smooth = losses[-1] if smooth is None else 0.98 * smooth + 0.02 * losses[-1]
        bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if on_checkpoint and args.save_every and (step + 1) % args.save_every == 0:
            on_checkpoint(step + 1, opt, losses)
            model.train()
    return losses


def save(model, tok, out: Path, dtype: str) -> None:
    from transformers import GenerationConfig

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ids = {t: tok.token_to_id(t) for t in demo_tok.SPECIAL_TOKENS}
    model = model.to(getattr(torch, dtype)).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], bos_token_id=None)
    model.save_pretrained(out)
    demo_tok.save(tok, out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=60000, help="generated training samples")
    ap.add_argument("--tokenizer-samples", type=int, default=20000)
    ap.add_argument("--vocab-size", type=int, default=3072, help="upper bound; BPE may stop early")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=640)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="rows of --seq-len tokens")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=None,
                    help="overrides --epochs (copy steps included)")
    ap.add_argument("--copy-steps", type=int, default=400,
                    help="steps of pure copying (copy_rows) before the mix (0: none)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: where the CPU has AVX-512 bf16 instructions)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the model for training (needs a C++ compiler)")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=200,
                    help="write OUT.resume.pt (model + optimizer) every N steps (0: never)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from OUT.resume.pt if it is there (same arguments)")
    ap.add_argument("--keep-snapshots", action="store_true",
                    help="also save a Hugging Face folder OUT.stepN at every checkpoint")
    return ap.parse_args(argv)


def _run_args(args) -> dict:
    """The arguments that decide the model (a resumed run must have the same)."""
    skip = ("resume", "keep_snapshots", "save_every", "threads")
    return {k: v for k, v in vars(args).items() if k not in skip}


def cpu_has_bf16() -> bool:
    """bf16 matmuls are 1.6x faster than fp32 where the CPU has them (0.82 against 1.34 s a
    step) and far slower where it emulates them."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks instead of returning them to the kernel. Every step
    allocates the same large buffers (the logits alone were 50 MB before the head ran only on
    labelled positions); by default each comes from a fresh mmap, and faulting its pages in
    again took a third of the step's time."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:   # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


def main(argv=None) -> None:
    from transformers import Qwen3ForCausalLM

    args = parse_args(argv)
    if args.bf16 is None:
        args.bf16 = cpu_has_bf16()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    t0 = time.time()
    samples, tok, texts, x, y, pos = build_data(args)
    ids = {t: tok.token_to_id(t) for t in demo_tok.SPECIAL_TOKENS}
    print(f"data: {len(samples)} samples, vocab {tok.get_vocab_size()}, {x.shape[0]} rows of "
          f"{x.shape[1]} ({(y != IGNORE).sum().item()} trained tokens) in {time.time() - t0:.0f}s",
          flush=True)
    torch.manual_seed(args.seed)
    config = model_config(tok.get_vocab_size(), ids, args)
    model = Qwen3ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    t1 = time.time()
    out = Path(args.out)

    out.parent.mkdir(parents=True, exist_ok=True)
    resume_path = out.with_name(f"{out.name}.resume.pt")

    def on_checkpoint(step: int, opt, losses: list[float]) -> None:
        tmp = resume_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "losses": losses, "args": _run_args(args)}, tmp)
        tmp.replace(resume_path)   # atomic: a run killed while saving keeps the last one
        if args.keep_snapshots:
            save(copy.deepcopy(model), tok, out.with_name(f"{out.name}.step{step}"),
                 args.save_dtype)

    state = None
    if args.resume and resume_path.exists():
        state = torch.load(resume_path)
        if state["args"] != _run_args(args):
            raise ValueError(f"{resume_path} was written with other arguments: {state['args']}")
        print(f"resuming at step {state['step']}", flush=True)
    drills = copy_rows(tok, args.copy_steps * args.batch_size, args.seq_len, args.seed + 1) \
        if args.copy_steps else None
    losses = train(model, x, y, pos, args, on_checkpoint, state, drills)
    save(model, tok, out, args.save_dtype)
    n_checked = demo_tok.check_same_ids(tok, out, texts[:2000])
    resume_path.unlink(missing_ok=True)
    info = {"seed": args.seed, "params": n_params, "train_seconds": round(time.time() - t1),
            "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
            "steps": len(losses), "args": vars(args), "tokenizer_checked_texts": n_checked}
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
