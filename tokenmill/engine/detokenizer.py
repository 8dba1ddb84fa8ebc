"""Incremental detokenization and stop strings, in the front process (no torch).

One ``IncrementalDetokenizer`` per request turns the token ids that arrive from the engine
core into text, checks stop strings, and hands out the text to report (cumulative or delta)
without ever streaming half a character or the start of a stop string.

Both decoders below decode a small window: the last emitted chunk of tokens plus the pending
ones, and emit what the pending tokens add once the window's text no longer ends in U+FFFD
(an incomplete UTF-8 character). The first window is the prompt's last tokens, so the first
output token decodes in context (a SentencePiece "▁Hi" keeps its space).

- ``_StreamDecoder``: ``tokenizers.decoders.DecodeStream`` (Rust; a step costs about half
  of the same loop in Python), plus a flush at the end: DecodeStream drops the bytes of an
  output that ends mid-character, where ``tokenizer.decode`` shows U+FFFD.
- ``_OffsetDecoder``: the same method in Python (vLLM's prefix/read offsets), for tokenizers
  without a Rust backend and for a request whose decoder is not monotonic (DecodeStream
  raises "Invalid prefix", e.g. byte-fallback bytes that stop being valid UTF-8).
"""

from __future__ import annotations

from collections.abc import Callable

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from tokenmill.sampling_params import SamplingParams

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded together with the first output tokens (as vLLM).
_PROMPT_CONTEXT_TOKENS = 5
_INVALID_PREFIX = "Invalid prefix"


def _backend(tokenizer) -> Tokenizer | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def _make_decode(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """``decode(ids)`` equal to ``tokenizer.decode(ids, skip_special_tokens=...)``, straight
    on the Rust backend when there is one (it skips the Python wrapper)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class _OffsetDecoder:
    """Window ``_ids``: ``[:_read]`` is the last emitted chunk (text ``_prefix_text``),
    ``[_read:]`` the pending tokens."""

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int], read: int):
        self._decode = decode
        self._ids = ids
        self._read = read
        self._prefix_text = decode(ids[:read]) if read else ""

    def step(self, token_id: int) -> str:
        ids = self._ids
        ids.append(token_id)
        new_text = self._decode(ids)
        prefix_len = len(self._prefix_text)
        if len(new_text) <= prefix_len or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # The next window starts at this chunk, which begins on a character boundary.
        del ids[:self._read]
        self._read = len(ids)
        self._prefix_text = self._decode(ids)
        return new_text[prefix_len:]

    def flush(self) -> str:
        if self._read == len(self._ids):
            return ""
        text = self._decode(self._ids)[len(self._prefix_text):]
        del self._ids[:self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return text


class _StreamDecoder:
    """DecodeStream, mirroring its window (``_chunk`` + ``_pending``) for the flush and for a
    hand-over to ``_OffsetDecoder``."""

    def __init__(self, backend: Tokenizer, decode: Callable[[list[int]], str],
                 skip_special_tokens: bool, context: list[int]):
        self._backend = backend
        self._decode = decode
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)
        self._chunk = context              # the tokens of the last emitted chunk
        self._pending: list[int] = []
        self._fallback: _OffsetDecoder | None = None

    def step(self, token_id: int) -> str:
        if self._fallback is not None:
            return self._fallback.step(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as e:  # tokenizers raises a bare Exception
            if _INVALID_PREFIX not in str(e):
                raise
            self._fallback = _OffsetDecoder(self._decode, self._chunk + self._pending,
                                            len(self._chunk))
            return self._fallback.step(token_id)
        self._pending.append(token_id)
        if text is None:
            return ""
        self._chunk, self._pending = self._pending, []
        return text

    def flush(self) -> str:
        """The text of the pending tokens, U+FFFD included; ends the stream."""
        if self._fallback is not None:
            return self._fallback.flush()
        if not self._pending:
            return ""
        window = self._chunk + self._pending
        text = self._decode(window)[len(self._decode(self._chunk)):]
        self._chunk, self._pending = window, []
        return text


def _make_decoder(tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool,
                  use_stream: bool = True) -> _StreamDecoder | _OffsetDecoder:
    decode = _make_decode(tokenizer, skip_special_tokens)
    context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
    if context and decode(context).endswith(_REPLACEMENT_CHAR):
        # The prompt ends mid-character: its bytes would swallow the output's first ones.
        context = []
    backend = _backend(tokenizer)
    if use_stream and backend is not None:
        return _StreamDecoder(backend, decode, skip_special_tokens, context)
    return _OffsetDecoder(decode, context, len(context))


class IncrementalDetokenizer:
    """Detokenizes one request's output as it streams in.

    The front end calls ``update`` with each batch of new token ids from the engine core,
    then ``get_next_output_text`` for the text to put in the ``RequestOutput``.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 _use_stream: bool = True):
        self.params = params
        self.output_token_ids: list[int] = []
        self._text = ""
        self._stop: list[str] = list(params.stop or [])
        self._stop_buffer = (0 if not self._stop or params.include_stop_str_in_output
                             else max(len(s) for s in self._stop) - 1)
        self._last_output_offset = 0   # chars of text already returned in delta mode
        self._stop_string: str | None = None
        self._finished = False
        self._decoder = (_make_decoder(tokenizer, prompt_token_ids, params.skip_special_tokens,
                                       _use_stream) if params.detokenize else None)

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
        ``include_stop_str_in_output``) and later calls do nothing. ``stop_terminated`` says
        the last of ``new_token_ids`` is a stop token that ended the request: its text is
        left out unless ``include_stop_str_in_output`` (vLLM's rule).
        """
        if self._stop_string is not None or self._finished:
            return None
        num_before = len(self.output_token_ids)
        self.output_token_ids.extend(new_token_ids)
        if self._decoder is None:
            return None
        to_decode = new_token_ids
        if stop_terminated and not self.params.include_stop_str_in_output:
            to_decode = new_token_ids[:-1]
        min_tokens = self.params.min_tokens
        step = self._decoder.step
        # NOTE: `text` holds the only reference while it grows, so CPython extends it in
        # place instead of copying the whole output per token.
        text, self._text = self._text, ""
        check_from = len(text)
        for n, token_id in enumerate(to_decode, num_before + 1):
            text += step(token_id)
            if n <= min_tokens:  # stop strings may not end in the first min_tokens' text
                check_from = len(text)
        self._text = text
        if not self._stop or stop_terminated:
            return None
        return self._check_stop_strings(check_from)

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now: all of it, or (``delta``) what was not returned before.

        With stop strings, the last ``max(len(stop)) - 1`` chars are held back until the
        request finishes, so the start of a stop string is never streamed. ``finished``
        also flushes tokens still waiting for the rest of a character.
        """
        if finished and not self._finished:
            self._finished = True
            if self._decoder is not None and self._stop_string is None:
                self._text += self._decoder.flush()
        buffer = 0 if finished else self._stop_buffer
        end = len(self._text) - buffer
        if not delta:
            return self._text[:end] if buffer else self._text
        start = self._last_output_offset
        if start >= end:
            return ""
        self._last_output_offset = end
        return self._text[start:end]

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
        keep = idx + len(s) if self.params.include_stop_str_in_output else idx
        self._text = self._text[:keep]
        self._stop_string = s
        return s


def decode_logprob_tokens(tokenizer, token_ids: list[int]) -> list[str]:
    """The decoded text of each token on its own, for logprob entries (a token that is part
    of a multi-byte character decodes to U+FFFD, as in vLLM)."""
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.decode_batch([[t] for t in token_ids], skip_special_tokens=False)
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
