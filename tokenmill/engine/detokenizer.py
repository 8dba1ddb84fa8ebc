"""Incremental detokenization and stop strings, in the front process (no torch).

One ``IncrementalDetokenizer`` per request turns the token ids that arrive from the engine
core into text, checks stop strings, and hands out the text to report (cumulative or delta)
without ever streaming half a character or the start of a stop string.

Text comes from the "prefix/read offset" method (as vLLM's slow path): decode a small window
``ids[prefix:]`` and emit what it adds to ``ids[prefix:read]`` once the window no longer ends
in U+FFFD (an incomplete UTF-8 character). The window starts in the prompt's last tokens, so
the first output token decodes in context (e.g. a SentencePiece "▁Hi" keeps its space).
``tokenizers.decoders.DecodeStream`` does the same in Rust, but it has no way to flush: an
output that ends mid-character (max_tokens cut an emoji in half) would lose its last bytes,
where ``tokenizer.decode`` shows U+FFFD. Decoding goes straight to the Rust backend, so a
step costs one decode of a few tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from tokenmill.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded together with the first output tokens (vLLM uses 5).
_PROMPT_CONTEXT_TOKENS = 5
# Once the window holds this many tokens, it restarts at the last emission point; this
# bounds the cost of a step while keeping one decode per token in the common case.
_MAX_WINDOW_TOKENS = 16


def _make_decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """A ``decode(ids) -> str`` equal to ``tokenizer.decode(ids, skip_special_tokens=...)``,
    straight on the Rust backend when there is one (it skips the Python wrapper)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode"):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Detokenizes one request's output as it streams in.

    The front end calls ``update`` with each batch of new token ids from the engine core,
    then ``get_next_output_text`` for the text to put in the ``RequestOutput``.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.params = params
        self.output_token_ids: list[int] = []
        self._text = ""
        self._stop: list[str] = list(params.stop or [])
        self._stop_buffer = (0 if not self._stop or params.include_stop_str_in_output
                             else max(len(s) for s in self._stop) - 1)
        self._last_output_offset = 0   # chars of text already returned in delta mode
        self._stop_string: str | None = None
        self._finished = False
        self._enabled = params.detokenize
        if not self._enabled:
            return
        self._decode = _make_decode(tokenizer, params.skip_special_tokens)
        # Decode window: _ids[_prefix:_read] is decoded and emitted and decodes to
        # _prefix_text; _ids[_read:] waits for a complete character.
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        context_text = self._decode(context) if context else ""
        if context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends mid-character: its bytes would swallow the output's first ones.
            context, context_text = [], ""
        self._ids = context
        self._prefix = 0
        self._read = len(context)
        self._prefix_text = context_text

    # ------------------------------------------------------------------ text
    @property
    def output_text(self) -> str:
        """All text so far (after a stop string: truncated as the request reports it)."""
        return self._text

    @property
    def stop_string(self) -> str | None:
        """The stop string that finished the request, if any."""
        return self._stop_string

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append new tokens; return the stop string if their text completed one.

        On a stop string the text is cut before it (or just after it with
        ``include_stop_str_in_output``); later calls do nothing. ``stop_terminated`` says
        the last of ``new_token_ids`` is a stop token that ended the request: its text is
        left out unless ``include_stop_str_in_output`` (vLLM's rule).
        """
        if self._stop_string is not None:
            return None
        self.output_token_ids.extend(new_token_ids)
        if not self._enabled:
            return None
        to_decode = new_token_ids
        if stop_terminated and not self.params.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        # Stop strings may not end inside the first min_tokens tokens' text.
        first_new = len(self.output_token_ids) - len(new_token_ids)
        check_from = len(self._text)
        for i, token_id in enumerate(to_decode):
            self._text += self._step(token_id)
            if first_new + i + 1 <= self.params.min_tokens:
                check_from = len(self._text)
        if not self._stop or stop_terminated:
            return None
        return self._check_stop_strings(check_from)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now: all of it, or (``delta``) what was not returned before.

        With stop strings, the last ``max(len(stop)) - 1`` chars are held back until the
        request finishes, so the start of a stop string is never streamed.
        """
        if finished:
            self._flush()
        buffer = 0 if finished else self._stop_buffer
        end = len(self._text) - buffer
        if not delta:
            return self._text[:end] if buffer else self._text
        start = self._last_output_offset
        if start >= end:
            return ""
        self._last_output_offset = end
        return self._text[start:end]

    # ------------------------------------------------------------------ internals
    def _step(self, token_id: int) -> str:
        """Add one token to the window; return the text it completes ("" while pending)."""
        self._ids.append(token_id)
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        delta = new_text[len(self._prefix_text):]
        last_read, self._read = self._read, len(self._ids)
        if self._read - self._prefix > _MAX_WINDOW_TOKENS:
            # Restart the window at the previous emission point (a character boundary).
            self._prefix = last_read
            self._prefix_text = self._decode(self._ids[last_read:self._read])
        else:
            self._prefix_text = new_text
        return delta

    def _flush(self) -> None:
        """At the end, emit pending tokens as they decode, U+FFFD included (as decode does)."""
        if self._finished:
            return
        self._finished = True
        if not self._enabled or self._stop_string is not None or self._read == len(self._ids):
            return
        new_text = self._decode(self._ids[self._prefix:])
        self._text += new_text[len(self._prefix_text):]
        self._read = len(self._ids)

    def _check_stop_strings(self, check_from: int) -> str | None:
        """Find the earliest stop string that ends after ``check_from``; truncate the text."""
        if check_from >= len(self._text):
            return None
        best: tuple[int, str] | None = None
        for s in self._stop:
            # A stop string that ends in the new text may start up to len(s) - 1 before it.
            idx = self._text.find(s, max(0, check_from - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self._text = self._text[:idx + len(s)] if self.params.include_stop_str_in_output \
            else self._text[:idx]
        self._stop_string = s
        return s


def decode_logprob_tokens(tokenizer, token_ids: list[int]) -> list[str]:
    """The decoded text of each token on its own, for logprob entries (a token that is part
    of a multi-byte character decodes to U+FFFD, as in vLLM)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode_batch"):
        return backend.decode_batch([[t] for t in token_ids], skip_special_tokens=False)
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
