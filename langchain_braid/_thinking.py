"""Split generated text into reasoning (``<think>…</think>``) and answer, whole or streamed.

The rules mirror the Qwen3 chat template, so a parsed answer renders back to the same text:
reasoning is stripped of surrounding newlines, the answer of leading newlines.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"


def split_reasoning(text: str, *, thinking: bool = False) -> tuple[str, str]:
    """``(reasoning, answer)`` of a whole generation.

    ``thinking=True`` means the prompt already opened a ``<think>`` block.

    Example:
        >>> split_reasoning("<think>\\nhmm\\n</think>\\n\\nHi")
        ('hmm', 'Hi')
    """
    parser = ReasoningParser(thinking=thinking)
    reasoning, answer = parser.feed(text)
    tail_reasoning, tail_answer = parser.finish()
    return reasoning + tail_reasoning, answer + tail_answer


class ReasoningParser:
    """Incremental ``split_reasoning``: feed text deltas, get ``(reasoning, answer)`` deltas.

    Holds back only what could still change meaning (a partial tag, newlines that may precede
    ``</think>``), so each delta goes out as soon as it is unambiguous.

    Example:
        >>> p = ReasoningParser()
        >>> p.feed("<think>\\nhm"), p.feed("m\\n</think>\\n\\nHi"), p.finish()
        (('hm', ''), ('m', 'Hi'), ('', ''))
    """

    def __init__(self, *, thinking: bool = False) -> None:
        # "start": nothing but whitespace seen; "think": inside a block; "answer": after it
        self.state = "think" if thinking else "start"
        self.buffer = ""
        self.skip_newlines = thinking  # leading newlines of reasoning / answer are dropped

    def feed(self, delta: str) -> tuple[str, str]:
        self.buffer += delta
        reasoning, answer = [], []
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(OPEN):
                    self.buffer = stripped[len(OPEN):]
                    self.state, self.skip_newlines = "think", True
                    continue
                if stripped and not OPEN.startswith(stripped):
                    self.state = "answer"  # no reasoning block: everything is the answer
                    continue
                break
            if self.state == "think":
                if self.skip_newlines:
                    self.buffer = self.buffer.lstrip("\n")
                    if not self.buffer:
                        break
                    self.skip_newlines = False
                end = self.buffer.find(CLOSE)
                if end >= 0:
                    reasoning.append(self.buffer[:end].rstrip("\n"))
                    self.buffer = self.buffer[end + len(CLOSE):]
                    self.state, self.skip_newlines = "answer", True
                    continue
                keep = _held_back(self.buffer)
                reasoning.append(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            if self.skip_newlines:
                self.buffer = self.buffer.lstrip("\n")
                if not self.buffer:
                    break
                self.skip_newlines = False
            answer.append(self.buffer)
            self.buffer = ""
            break
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """Flush at the end of generation (an unclosed block stays reasoning)."""
        rest, self.buffer = self.buffer, ""
        if self.state == "think":
            return rest.rstrip("\n"), ""
        if self.state == "start":
            return "", rest
        return "", rest.lstrip("\n") if self.skip_newlines else rest


def _held_back(buffer: str) -> int:
    """Length of the suffix that may be trailing newlines or the start of ``</think>``."""
    for k in range(min(len(buffer), len(CLOSE) - 1), 0, -1):
        if CLOSE.startswith(buffer[-k:]):
            return k + len(buffer[:-k]) - len(buffer[:-k].rstrip("\n"))
    return len(buffer) - len(buffer.rstrip("\n"))
