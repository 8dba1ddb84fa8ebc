"""Batched token sampling on the logits' device.

The model runner calls ``Sampler.sample`` once per step with the logits of every row that
samples a token. Stages run in vLLM v1's order, and a stage is skipped entirely when no row
needs it (all-greedy without penalties is a single argmax):

    logits [B, V] (raw)
      -> raw logprobs (log_softmax before any processing; only if a row asks for logprobs)
      -> min_tokens (stop tokens -> -inf) -> logit_bias -> repetition / frequency / presence
      -> greedy rows: argmax
      -> other rows: / temperature -> top-k -> top-p -> min-p -> exponential race

Per-row Python only builds small parameter tensors; nothing loops over the vocabulary and
the only device sync is the final ``.tolist()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.interfaces import TokenLogprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker import cpu_kernels

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One row of the batch: what the sampler needs to know about its request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: list[int]
    # The request's seeded generator (on the logits' device), owned by the caller; None
    # for unseeded rows, which share the sampler's default generator.
    generator: torch.Generator | None = None


class Sampler:
    def __init__(self, device: torch.device | str, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]
               ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """Sample one token per row. ``logits``: [B, V] (any float dtype; processed in float32),
        row i belongs to ``rows[i]``.

        Returns the sampled token ids and, per row, its logprobs (None unless the row's
        ``params.logprobs`` is set). ``logits`` is not modified.
        """
        # logits: [B, V]
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (logits.shape, len(rows))
        if not rows:
            return [], []
        if all(r.params.greedy and r.params.logprobs is None for r in rows) \
                and not _needs_processing(rows):
            # NOTE: the common serving case; argmax on the model-dtype logits is the same token
            # and skips a float32 copy of [B, V] (see csrc/argmax.c).
            return cpu_kernels.argmax(logits).tolist(), [None] * len(rows)
        logits = logits.float()
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            # NOTE: logprobs are reported from the model's raw distribution, before penalties,
            # bias and temperature (vLLM's default "raw_logprobs").
            raw_logprobs = torch.log_softmax(logits, dim=-1)

        logits = apply_logits_processors(logits, rows)
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_random(logits, rows, greedy)

        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if raw_logprobs is not None:
            idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
            ks = [rows[i].params.logprobs for i in idx]
            if len(idx) == len(rows):
                sub_lp, sub_tok = raw_logprobs, tokens
            else:
                idx_t = torch.tensor(idx, device=logits.device)
                sub_lp, sub_tok = raw_logprobs[idx_t], tokens[idx_t]
            for i, entry in zip(idx, _token_logprobs(sub_lp, sub_tok, ks)):
                logprobs[i] = entry
        return tokens.tolist(), logprobs

    # ------------------------------------------------------------------ random sampling
    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow],
                       greedy: list[bool]) -> torch.Tensor:
        """Tokens for a batch with at least one non-greedy row; greedy rows take argmax."""
        B, V = logits.shape
        dev = logits.device
        argmax = logits.argmax(dim=-1) if any(greedy) else None
        params = [r.params for r in rows]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        # NOTE: out of place, so the caller's logits are never written to.
        logits = logits / torch.tensor(temps, device=dev, dtype=logits.dtype).unsqueeze(1)

        ks = [p.top_k if (not g and 0 < p.top_k < V) else V for p, g in zip(params, greedy)]
        ps = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        use_k, use_p = min(ks) < V, min(ps) < 1.0
        if use_p:
            logits = _apply_top_k_top_p_sorted(logits, ks if use_k else None, ps)
        elif use_k:
            _apply_top_k(logits, ks)
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        if max(min_ps) > 0.0:
            _apply_min_p(logits, min_ps)

        probs = torch.softmax(logits, dim=-1)
        q = self._exponentials(probs, rows, greedy)
        # Exponential race: argmax(p_i / q_i) with q_i ~ Exp(1) is distributed as p; unlike
        # torch.multinomial it needs no sync and each row draws from its own generator.
        tokens = probs.div_(q).argmax(dim=-1)
        if argmax is not None:
            greedy_t = torch.tensor(greedy, device=dev)
            tokens = torch.where(greedy_t, argmax, tokens)
        return tokens

    def _exponentials(self, probs: torch.Tensor, rows: list[SamplingRow],
                      greedy: list[bool]) -> torch.Tensor:
        """q ~ Exp(1) of probs' shape: seeded rows draw their own row with their generator
        (so their tokens do not depend on the batch), the rest share one default draw."""
        # q: [B, V]
        B, V = probs.shape
        q = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None and not greedy[i]]
        if not seeded:
            q.exponential_(generator=self.generator)
        else:
            for i in seeded:
                q[i].exponential_(generator=rows[i].generator)
            seeded_set = set(seeded)
            rest = [i for i in range(B) if i not in seeded_set]
            if rest:
                draw = torch.empty((len(rest), V), device=probs.device, dtype=probs.dtype)
                q[torch.tensor(rest, device=probs.device)] = draw.exponential_(
                    generator=self.generator)
        # NOTE: a zero draw would turn a masked token's 0/0 into NaN, which argmax picks.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


# ---------------------------------------------------------------------- logits processors
def apply_logits_processors(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """min_tokens, logit_bias and penalties; returns ``logits`` itself when none applies,
    else a processed copy."""
    if not _needs_processing(rows):
        return logits
    logits = logits.clone()
    _apply_min_tokens(logits, rows)    # each of these skips the rows it does not concern
    _apply_logit_bias(logits, rows)
    pen_rows = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
    if pen_rows:
        _apply_penalties(logits, rows, pen_rows)
    return logits


def _needs_processing(rows: list[SamplingRow]) -> bool:
    return any(len(r.output_token_ids) < r.params.min_tokens or r.params.logit_bias
               or _has_penalty(r.params) for r in rows)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """While a row has fewer than ``min_tokens`` outputs, its stop tokens cannot be sampled
    (EOS too, unless ``ignore_eos`` makes it an ordinary token)."""
    V = logits.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            continue
        stops = set(r.params.stop_token_ids or ())
        if not r.params.ignore_eos:
            stops.update(r.eos_token_ids)
        for t in stops:
            if 0 <= t < V:
                r_idx.append(i)
                t_idx.append(t)
    if r_idx:
        dev = logits.device
        logits[torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)] = _NEG_INF


def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    V = logits.shape[1]
    r_idx: list[int] = []
    t_idx: list[int] = []
    vals: list[float] = []
    for i, r in enumerate(rows):
        for t, b in (r.params.logit_bias or {}).items():
            if 0 <= t < V:  # the front end validates ids; out-of-range ones are ignored here
                r_idx.append(i)
                t_idx.append(t)
                vals.append(b)
    if r_idx:
        dev = logits.device
        logits.index_put_((torch.tensor(r_idx, device=dev), torch.tensor(t_idx, device=dev)),
                          torch.tensor(vals, device=dev, dtype=logits.dtype), accumulate=True)


def _token_counts(token_lists: list[list[int]], V: int, device) -> torch.Tensor:
    """counts[i, t] = occurrences of token t in token_lists[i]; [n, V] float32."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros((len(token_lists), V + 1), dtype=torch.float32, device=device)
    if width:
        # Pad with V: an extra column that is dropped, so padding counts nowhere.
        padded = [[t if 0 <= t < V else V for t in toks] + [V] * (width - len(toks))
                  for toks in token_lists]
        idx = torch.tensor(padded, dtype=torch.long, device=device)
        counts.scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float32, device=device))
    return counts[:, :V]


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """Repetition (HF/vLLM: over prompt + output; positive logits divided, negative
    multiplied), frequency (- f * count) and presence (- p * [count > 0]) over the output."""
    # sub: [n, V], the penalised rows only
    V, dev = logits.shape[1], logits.device
    sel = [rows[i] for i in idx]
    idx_t = torch.tensor(idx, device=dev)
    sub = logits[idx_t]
    out_counts = _token_counts([r.output_token_ids for r in sel], V, dev)
    out_seen = out_counts > 0

    rep = [r.params.repetition_penalty for r in sel]
    if any(p != 1.0 for p in rep):
        prompt_seen = _token_counts([r.prompt_token_ids if r.params.repetition_penalty != 1.0
                                     else [] for r in sel], V, dev) > 0
        rep_t = torch.tensor(rep, device=dev, dtype=sub.dtype).unsqueeze(1)
        penalised = torch.where(sub > 0, sub / rep_t, sub * rep_t)
        sub = torch.where(prompt_seen | out_seen, penalised, sub)
    freq = [r.params.frequency_penalty for r in sel]
    if any(freq):
        sub = sub - torch.tensor(freq, device=dev, dtype=sub.dtype).unsqueeze(1) * out_counts
    pres = [r.params.presence_penalty for r in sel]
    if any(pres):
        sub = sub - torch.tensor(pres, device=dev, dtype=sub.dtype).unsqueeze(1) * out_seen
    logits[idx_t] = sub


# ---------------------------------------------------------------------- truncation filters
def _apply_top_k(logits: torch.Tensor, ks: list[int]) -> None:
    """Keep each row's ``ks[i]`` largest logits (ties with the k-th survive), in place;
    ``ks[i] >= V`` disables top-k for the row."""
    # top_vals: [B, kmax]
    V = logits.shape[1]
    kmax = max(k for k in ks if k < V)
    top_vals = logits.topk(kmax, dim=-1).values
    k_t = torch.tensor(ks, device=logits.device)
    threshold = top_vals.gather(1, (k_t.clamp_max(kmax) - 1).unsqueeze(1))    # [B, 1]
    threshold.masked_fill_((k_t >= V).unsqueeze(1), _NEG_INF)
    logits.masked_fill_(logits < threshold, _NEG_INF)


def _apply_top_k_top_p_sorted(logits: torch.Tensor, ks: list[int] | None,
                              ps: list[float]) -> torch.Tensor:
    """top-k then top-p on one ascending sort (as vLLM): top-p keeps the smallest set of
    most likely tokens whose mass reaches p (always at least the top token)."""
    # logits_sort, order: [B, V], ascending
    B, V = logits.shape
    dev = logits.device
    logits_sort, order = logits.sort(dim=-1, descending=False)
    if ks is not None:
        k_t = torch.tensor(ks, device=dev, dtype=torch.long)
        threshold = logits_sort.gather(1, (V - k_t).unsqueeze(1))
        logits_sort.masked_fill_(logits_sort < threshold, _NEG_INF)
    p_t = torch.tensor(ps, device=dev, dtype=logits.dtype)
    cum = torch.softmax(logits_sort, dim=-1).cumsum_(dim=-1)
    drop = cum <= (1.0 - p_t).unsqueeze(1)
    drop[:, -1] = False
    logits_sort.masked_fill_(drop, _NEG_INF)
    return logits_sort.scatter(1, order, logits_sort)


def _apply_min_p(logits: torch.Tensor, min_ps: list[float]) -> None:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)
    min_p_t = torch.tensor(min_ps, device=logits.device, dtype=probs.dtype).unsqueeze(1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p_t
    logits.masked_fill_(probs < threshold, _NEG_INF)


# ---------------------------------------------------------------------- logprobs
def _token_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor,
                    ks: list[int]) -> list[TokenLogprobs]:
    """Per row: the chosen token, then the top-``ks[i]`` tokens in rank order; rank = 1 +
    the number of tokens with a strictly higher logprob."""
    # logprobs: [n, V]; chosen: [n]
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))            # [n, 1]
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1                  # [n]
    kmax = min(max(ks, default=0), logprobs.shape[1])
    if kmax > 0:
        top_lp, top_ids = logprobs.topk(kmax, dim=-1)               # [n, kmax]
        top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    else:
        top_lp_l = top_ids_l = [[] for _ in ks]
    out = []
    for tok, lp, rank, k, t_ids, t_lps in zip(chosen.tolist(), chosen_lp.squeeze(1).tolist(),
                                             ranks.tolist(), ks, top_ids_l, top_lp_l):
        out.append(TokenLogprobs(token_ids=[tok] + t_ids[:k], logprobs=[lp] + t_lps[:k],
                                 rank=rank))
    return out


def compute_prompt_logprobs(logits: torch.Tensor, target_ids: list[int],
                            k: int) -> list[TokenLogprobs]:
    """Logprobs of prompt positions: row i of ``logits`` [N, V] predicts ``target_ids[i]``.

    Each entry holds the actual next token first, then the top-``k`` tokens, with the
    actual token's rank; from the raw distribution, as for sampled tokens.
    """
    # logits: [N, V]
    assert logits.shape[0] == len(target_ids), (logits.shape, len(target_ids))
    if not target_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(target_ids, device=logits.device, dtype=torch.long)
    return _token_logprobs(logprobs, targets, [k] * len(target_ids))
