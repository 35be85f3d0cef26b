"""Per-request state."""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from braid_engine.detokenizer import IncrementalDetokenizer
from braid_engine.sampling import SamplingParams

_counter = itertools.count()


def int64_tensor(values: list[int]) -> torch.Tensor:
    """A non-empty list of integers as an int64 host tensor. struct packs the list in one call,
    under a third of the time of array("q", values) or torch.tensor (a 4,096-token prompt of
    Qwen3 ids on a 2-core CPU: 54 µs against 135 and ~270); like the array it takes bools and
    numpy integers and refuses floats, strings and ints past 64 bits (``struct.error``)."""
    buf = bytearray(8 * len(values))
    struct.pack_into(f"{len(values)}q", buf, 0, *values)
    return torch.frombuffer(buf, dtype=torch.int64)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """A finished request (from ``generate``) or one streamed delta (from ``stream``)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    num_cached_tokens: int = 0
    finished: bool = True
    # with SamplingParams(logprobs=k): for each of token_ids, {token id: log-probability} of the
    # token drawn and the k most likely (the model's own distribution); None otherwise
    logprobs: list[dict[int, float]] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer
    max_len: int  # stop (finish "length") when the sequence reaches this many tokens
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)  # one per output token (params.logprobs)
    penalties: Any = None  # sampling.Penalties of a penalized request, made at its first token
    status: Status = Status.WAITING
    page_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    admitted: bool = False  # scheduled once already: readmitted after a preemption, it is no new lookup
    cache_node: object = None  # the prefix-cache node this sequence holds a lock on
    finish_reason: str | None = None
    arrival: int = field(default_factory=lambda: next(_counter))
    emitted_tokens: int = 0
    text_deferred: bool = False  # no stop strings and only the final output wanted: decode once, at the end
    text_tokens: int = 0  # output tokens that belong in the text (a stop token id does not)
    matcher: Any = None  # the request's xgrammar matcher when its output is constrained
    # it runs without reading the prefix cache: alone, it did not fit beside the pages its cached
    # prefix keeps locked (Scheduler._without_cache); its KV still enters the tree when it ends
    uncached: bool = False
    # (its length, its tokens computed) when it last preempted itself alone on the engine: found
    # again with none more computed, it is stuck (Scheduler._stalled)
    stall: tuple[int, int] | None = None
    # the prompt as an int64 host tensor, made once when the request was checked: a long step
    # takes its ids from it instead of converting thousands of Python ints again in the loop
    # thread (LLMEngine.validate_prompt)
    prompt_ids: torch.Tensor | None = None
    # the PinHandle of pin() that this request computes the prefix for: the loop thread pins its
    # prompt as it finishes (LLMEngine._pin_prompt)
    pin: Any = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_range(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without building the whole list (prompts can be long)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def token_tensor(self, start: int, end: int) -> torch.Tensor:
        """``token_range(start, end)`` (not empty) as an int64 host tensor; the prompt's part is a
        view of ``prompt_ids`` where there is one."""
        p = len(self.prompt_token_ids)
        if self.prompt_ids is None or start >= p:
            return int64_tensor(self.token_range(start, end))
        if end <= p:
            return self.prompt_ids[start:end]
        return torch.cat((self.prompt_ids[start:], int64_tensor(self.output_token_ids[:end - p])))

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_decoding(self) -> bool:
        """It has generated tokens and only its newest token's KV is still to compute."""
        return bool(self.output_token_ids) and self.num_computed + 1 == len(self)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
