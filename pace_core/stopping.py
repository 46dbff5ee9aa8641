"""Turning accepted chunks into output: stop tokens, max_new_tokens and stop strings end
the output exactly where they fall, even inside a chunk or across chunk boundaries;
text deltas are UTF-8 safe and never show a possible stop-string prefix too early.
"""
from __future__ import annotations

from .outputs import Delta


class OutputBuilder:
    def __init__(
        self,
        tokenizer,
        max_new_tokens: int,
        stop_token_ids: set[int] = frozenset(),
        stop_strings: list[str] | None = None,
        skip_special_tokens: bool = True,
        want_text: bool = True,
    ):
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = set(stop_token_ids)
        self.stop_strings = list(stop_strings or [])
        self.skip_special_tokens = skip_special_tokens
        self.want_text = want_text or bool(self.stop_strings)
        self.token_ids: list[int] = []
        self.text = ""  # text decoded so far (stop string cut off once found)
        self._prefix = self._read = 0  # incremental detokenization offsets into token_ids
        self.emitted = 0  # characters of self.text already handed out
        self._searched = 0  # stop strings searched in text[:_searched] already
        self.finish_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False)

    def add(self, chunk: list[int]) -> Delta:
        """Take one accepted chunk; return what is new for the caller (``finish_reason``
        says whether the output ended with it)."""
        assert self.finish_reason is None, "output already finished"
        start = len(self.token_ids)
        for t in chunk:
            self.token_ids.append(t)
            if t in self.stop_token_ids:
                self.finish_reason = "stop"
                break
            if len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        if self.want_text:
            self._detokenize()
            self._find_stop_string(start)
        new_ids = self.token_ids[start:]
        return Delta(new_ids, self._text_delta() if self.want_text else "")

    def _detokenize(self) -> None:
        """Append the text of the new tokens, decoding only a short window (O(1) per
        step, not O(length)): the tokens since the last read, with the previous ones as
        context so that tokenizers that merge or drop leading spaces decode right. An
        incomplete UTF-8 character waits for its next bytes unless output has finished."""
        prefix_text = self._decode(self.token_ids[self._prefix : self._read])
        new_text = self._decode(self.token_ids[self._prefix :])
        if len(new_text) > len(prefix_text) and (not new_text.endswith("\ufffd") or self.finish_reason):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.token_ids)

    def _find_stop_string(self, chunk_start: int) -> None:
        if not self.stop_strings:
            return
        longest = max(len(s) for s in self.stop_strings)
        lo = max(0, self._searched - longest + 1)
        hits = [(i, s) for s in self.stop_strings if (i := self.text.find(s, lo)) >= 0]
        self._searched = len(self.text)
        if not hits:
            return
        cut, _ = min(hits)
        # keep the tokens up to the one that completes the stop string
        for n in range(max(chunk_start, 1), len(self.token_ids) + 1):
            if any(s in self._decode(self.token_ids[:n]) for s in self.stop_strings):
                del self.token_ids[n:]
                break
        self.text = self.text[:cut]
        self.finish_reason = "stop"

    def _text_delta(self) -> str:
        stable = len(self.text)
        if self.finish_reason is None:  # hold back a possible stop-string prefix
            stable -= self._stop_prefix_len(self.text)
        if stable <= self.emitted:
            return ""
        delta = self.text[self.emitted : stable]
        self.emitted = stable
        return delta

    def _stop_prefix_len(self, text: str) -> int:
        hold = 0
        for s in self.stop_strings:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return hold
