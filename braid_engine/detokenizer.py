"""Incremental detokenization with stop strings: text deltas that never split a character
and never show the start of a stop string that may still complete."""

from __future__ import annotations

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.skip_special = skip_special_tokens
        self.text = ""  # all settled output text
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False
        self._prefix_text: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> None:
        """Append one generated token; sets ``stopped`` when a stop string completes."""
        self.ids.append(token_id)
        if self._prefix_text is None:  # unchanged until the offsets move: decode it once
            self._prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        prefix = self._prefix_text
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete multi-byte character: wait for the next token
        old_len = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix_text = None
        if self.stop:
            longest = max(map(len, self.stop))
            window = max(0, old_len - longest + 1)
            hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def add_all(self, token_ids: list[int]) -> None:
        """Append many tokens at once, decoding twice in all (no stop strings are checked)."""
        prefix = self._decode(self.ids[self.prefix_offset:])
        self.ids.extend(token_ids)
        self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = None

    def flush(self) -> None:
        """At the end: keep bytes that never completed a character (as U+FFFD, like decode)."""
        if self.stopped or self.read_offset == len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self._prefix_text = None

    def take(self, final: bool) -> str:
        """Text not yet handed out, holding back a suffix that could start a stop string."""
        end = len(self.text)
        if not final and self.stop:
            end -= self._held_back()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _held_back(self) -> int:
        for k in range(min(len(self.text), max(map(len, self.stop)) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
