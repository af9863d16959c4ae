"""One choice's generated tokens -> its text, as deltas while it streams, cut at the first stop string.

Detokenisation is incremental, over a window of a few tokens (as vLLM's `detokenize_incrementally`): each
token, the tokens since the last commit are decoded together with those of the commit before, and the text
past that context's own decoding is what the new tokens add. It is committed (the window moves on) once it
does not end in U+FFFD (a multi-byte character whose remaining bytes are in the next tokens of a byte-level
BPE). Decoding from a token where committed text ended on a whole character, with the same context on both
sides, gives what decoding the whole completion gives there, for byte-level BPE and for decoders that treat
a text's first token specially (a SentencePiece leading space) alike. So a token costs the decoding of a few
tokens however long the completion (decoding all of it again per token, as before, cost 0.2 ms per token on
average over a 4,096-token stream, quadratic in its length; bench/results/serve-cpu.md, `--parts text`). The
exception is a run of tokens whose text keeps ending in U+FFFD (stray bytes, or U+FFFD itself): the window
grows over it, as the whole decoding did. Stop strings are searched for
only where a new occurrence can be: in the new text and the `longest stop - 1` characters before it.

Two things are held back until the next token decides them: a trailing U+FFFD and a tail that could be the
beginning of a stop string. So the concatenated deltas of a stream equal the text of the same request
without streaming, and both are the whole completion's decoding cut at its first stop string, ending on the
same token (tests/test_serve_units.py checks this against decoding the whole completion after every token).

A stop string ends the choice where it begins (the stop string itself is not returned, as in OpenAI's
API); the scheduler is then told to release the row. Tokens generated after the one that completed the
stop string are not counted in usage."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ChoiceText"]

REPLACEMENT = "\ufffd"


class ChoiceText:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._longest_stop = max(map(len, self.stop), default=0)
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far
        self.finish_reason: str | None = None
        self._text = ""  # the committed text: the decoding of ids[:_read], ending on a whole character
        self._prefix = self._read = 0  # ids[_prefix:_read]: the context the next tokens are decoded with
        self._prefix_text = ""  # its decoding
        self._searched = 0  # the length of the text searched for stop strings, up to a trailing U+FFFD

    @property
    def text(self) -> str:
        return self.sent

    def add(self, token: int, engine_finish: str | None) -> str:
        """Take the next token (`engine_finish`: the engine's finish reason when this token ended the row:
        eos, stop or length). Returns the new text to send (maybe empty); `finish_reason` is set once the
        choice has ended ("stop" for eos or a stop string, "length" for max_tokens or the context)."""
        if self.finish_reason is not None:
            raise RuntimeError("a token after the choice finished")
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self._prefix:])  # special tokens (<|endoftext|>) are skipped
        if not window.startswith(self._prefix_text):
            raise RuntimeError(f"the tokenizer's decode is not incremental: {self._prefix_text!r} then {window!r}")
        pending = window[len(self._prefix_text):]
        full = self._text + pending  # the whole completion's decoding
        # The last token commits whatever is left, a U+FFFD at the end included (as the whole decoding has it).
        if engine_finish is not None or (pending and not pending.endswith(REPLACEMENT)):
            self._text = full
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read])
        cut = self._first_stop(full, max(0, self._searched - self._longest_stop + 1))
        self._searched = len(full.rstrip(REPLACEMENT))  # what later tokens cannot change: before a trailing U+FFFD
        if cut is not None:
            full, self.finish_reason = full[:cut], "stop"
        elif engine_finish is not None:
            self.finish_reason = "length" if engine_finish == "length" else "stop"
        if self.finish_reason is None:
            full = full[:self._searched - self._stop_prefix(full[:self._searched])]
        delta = full[len(self.sent):]
        self.sent = full if len(full) > len(self.sent) else self.sent
        return delta

    def _first_stop(self, full: str, start: int) -> int | None:
        """Where the first stop string in `full` begins; none begins before `start` (that text was searched)."""
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of `text` that is the beginning of a stop string: held back, with any
        trailing U+FFFD after it (a character not complete yet, or a stray byte the next tokens will show)."""
        for k in range(min(self._longest_stop - 1, len(text)), 0, -1):
            tail = text[len(text) - k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
