"""One choice's generated tokens -> its text, as deltas while it streams, cut at the first stop string.

Detokenisation is incremental: after each token the whole completion is decoded again (completions are
at most a context long), and the new text is what lies past what was already sent. Two things are held
back until the next token decides them: a trailing U+FFFD (a multi-byte character whose remaining bytes
are in the next tokens of a byte-level BPE) and a tail that could be the beginning of a stop string. So the
concatenated deltas of a stream equal the text of the same request without streaming.

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
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far
        self.finish_reason: str | None = None

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
        full = self.tokenizer.decode(self.ids)  # special tokens (<|endoftext|>) are skipped
        if not full.startswith(self.sent):
            raise RuntimeError(f"the tokenizer's decode is not incremental: {self.sent!r} then {full!r}")
        cut = self._first_stop(full)
        if cut is not None:
            full, self.finish_reason = full[:cut], "stop"
        elif engine_finish is not None:
            self.finish_reason = "length" if engine_finish == "length" else "stop"
        if self.finish_reason is None:
            full = full[:len(full) - self._held_back(full)]
        delta = full[len(self.sent):]
        self.sent = full if len(full) > len(self.sent) else self.sent
        return delta

    def _first_stop(self, full: str) -> int | None:
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Characters at the end of `full` not to send yet."""
        n = len(full) - len(full.rstrip(REPLACEMENT))
        rest = full[:len(full) - n]
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(rest)), longest, -1):
                if rest.endswith(s[:k]):
                    longest = k
                    break
        return n + longest
