"""Sampling parameters and the sampler: logits → next tokens."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from braid_engine import kernels
from braid_engine.errors import InvalidSamplingParamsError
from braid_engine.grammar import GuidedDecoding
from braid_engine.kernels import fused_kernels_available

# temperatures below this sample the top token anyway (vLLM's _SAMPLING_EPS), and far smaller
# ones overflow the scaled logits to inf (a NaN softmax): they are greedy
GREEDY_TEMPERATURE = 1e-5
# the most top log-probabilities a request may ask for per token (OpenAI's top_logprobs limit)
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's names).

    ``temperature=0`` (or any below 1e-5) is greedy. ``top_k`` ≤ 0 and ``top_p=1`` and ``min_p=0`` disable those
    filters. ``stop`` strings end generation and are never part of the returned text.
    ``enable_prefix_caching=False`` makes this request neither read nor write the prefix cache.
    ``guided`` constrains the output to a grammar (JSON schema, JSON object or structural tag);
    it needs the optional ``xgrammar`` package.

    Penalties change the logits before temperature and the filters, as vLLM applies them:
    ``repetition_penalty`` (> 0, 1 off; transformers' too) divides a positive logit, and
    multiplies a negative one, of each token already in the prompt or the output; then ``frequency_penalty`` times a token's
    count in the output and ``presence_penalty`` once for each token the output holds are
    subtracted (each in [-2, 2], 0 off; positive ones discourage repeating). In a burst, the
    penalized rows are drawn step by step outside a draw graph.

    ``logprobs=k`` (0 to 20; None: off) returns, for each token drawn, its log-probability and
    those of the k most likely tokens, in the model's own distribution (the logits' log-softmax,
    before penalties, temperature, filters and grammar), as vLLM and transformers' logits give
    it (``RequestOutput.logprobs``). In a burst, such a request's rows are drawn step by step
    outside a draw graph.

    Example:
        >>> SamplingParams(temperature=0.7, top_p=0.9, max_tokens=64, seed=1, stop=["\\n\\n"])
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    enable_prefix_caching: bool = True
    guided: GuidedDecoding | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    _stop: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidSamplingParamsError for a field out of range. The engine runs it again for
        each request, so fields changed after construction are checked (and a new ``stop`` used)."""
        def bad(msg: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"SamplingParams: {msg}")

        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number ≥ 0 (0 = greedy), got {self.temperature!r}.")
        if not isinstance(self.top_p, numbers.Real) or not (0 < self.top_p <= 1):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}; use 1 to disable it.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise bad(f"top_k must be an int, got {self.top_k!r}; use -1 to disable it.")
        if not isinstance(self.min_p, numbers.Real) or not (0 <= self.min_p <= 1):
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}; use 0 to disable it.")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise bad(f"max_tokens must be an int ≥ 1 or None, got {self.max_tokens!r}.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**64):
            raise bad(f"seed must be an int in [-2**63, 2**64) or None, got {self.seed!r}.")
        for name in ("ignore_eos", "skip_special_tokens", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.stop is not None and not isinstance(self.stop, Iterable):
            raise bad(f"stop must be a string or a list of strings, got {self.stop!r}.")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop if self.stop is not None else [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad(f"stop must be non-empty strings, got {stop!r}.")
        if self.stop is not None and not isinstance(self.stop, str):
            self.stop = stop  # an iterator is read once: the engine reads the list
        self._stop = stop
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, Iterable):
            raise bad(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}.")
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if any(not isinstance(t, numbers.Integral) or isinstance(t, bool) or t < 0 for t in ids):
                raise bad(f"stop_token_ids must be non-negative ints, got {ids!r}.")
            self.stop_token_ids = [int(t) for t in ids]  # numpy ints, arrays and iterators as a list
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise bad(f"guided must be a GuidedDecoding or None, got {type(self.guided).__name__}.")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise bad(f"{name} must be a number in [-2, 2], got {v!r}; use 0 to disable it.")
            setattr(self, name, float(v))  # (a Fraction or numpy scalar as torch takes a number)
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad(f"logprobs must be an int in [0, {MAX_LOGPROBS}] or None, got {self.logprobs!r} "
                      "(0: the drawn token's alone; None: none).")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}; "
                      "use 1 to disable it.")
        self.repetition_penalty = float(self.repetition_penalty)

    @property
    def stop_strings(self) -> list[str]:
        return self._stop

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether a penalty changes this request's logits (``penalize``)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _is_number(v: object) -> bool:
    """A real number that is no bool (JSON's true would pass as 1) and is finite."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


class Penalties:
    """One request's penalties (``SamplingParams``) with what they need kept on the device: which
    tokens its prompt and output hold (the repetition penalty) and how often its output holds
    each (frequency, presence). ``update`` takes the output tokens drawn since its last call
    (one a step: their copy is the step's only host work), ``count`` a token drawn on the
    device (a burst's), ``apply`` changes a row of logits in place and reads nothing back.
    ``taken``: the output tokens counted, or to be counted by a burst in flight. The repetition
    penalty is computed as transformers' RepetitionPenaltyLogitsProcessor computes it (the same
    operations on the same values), the other two as vLLM subtracts them, after it."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab: int, device: torch.device) -> None:
        self.params, self.device, self.taken = params, device, 0
        self.seen = self.counts = None
        if params.repetition_penalty != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            if prompt:
                self.seen.index_fill_(0, _to_device(torch.tensor(prompt, dtype=torch.long), device), True)
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.int32, device=device)

    @torch.inference_mode()
    def update(self, outputs: list[int]) -> None:
        """Count ``outputs[taken:]``, the output tokens not yet counted (none where a burst in
        flight counts the ones past ``outputs``)."""
        new = outputs[self.taken:]
        if new:
            self.count(_to_device(torch.tensor(new, dtype=torch.long), self.device))
        self.taken = max(self.taken, len(outputs))

    @torch.inference_mode()
    def count(self, ids: torch.Tensor) -> None:
        """Count the tokens ``ids`` (on the device, [n]) as output tokens; ``taken`` is the
        caller's to advance."""
        if self.seen is not None:
            self.seen.index_fill_(0, ids, True)
        if self.counts is not None:
            self.counts.index_add_(0, ids, torch.ones(ids.shape, dtype=torch.int32, device=self.device))

    @torch.inference_mode()  # the engine's logits are inference tensors
    def apply(self, row: torch.Tensor) -> None:
        """Penalize ``row`` [V] (a view of a step's logits) in place."""
        p = self.params
        if self.seen is not None:
            rep = p.repetition_penalty
            row.copy_(torch.where(self.seen, torch.where(row < 0, row * rep, row / rep), row))
        if self.counts is not None:
            if p.frequency_penalty:
                row -= p.frequency_penalty * self.counts
            if p.presence_penalty:
                row -= p.presence_penalty * (self.counts > 0)


def penalize(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
             outputs: list[list[int]]) -> None:
    """Apply each row's penalties to ``logits`` [rows, V] in place, row i after prompt
    ``prompts[i]`` and output so far ``outputs[i]`` (``Penalties`` made for the one call; the
    engine keeps a request's from step to step)."""
    for i, p in enumerate(params):
        if p.penalized:
            state = Penalties(p, prompts[i], logits.shape[-1], logits.device)
            state.update(outputs[i])
            state.apply(logits[i])


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  min_p: float) -> torch.Tensor:
    """Temperature-scaled log-probabilities with filtered-out tokens at -inf. logits: [V] fp32."""
    filters = _Filters([temperature], [top_k], [top_p], [min_p], logits.shape[-1], logits.device)
    return torch.log_softmax(filters(logits[None])[0], -1)


# top-p after top-k cut among the top-k values, without sorting the vocabulary (False: sorted, as
# top-p alone is; the same tokens either way, but where a mass lies within float32's rounding of
# the drop: see _top_k_top_p). None: on the CPU only. On a GPU the sort-free cut's two dozen
# launches over the whole row took longer than the sort (H200, benchmarks/sampling.py, bf16
# Qwen3 vocabulary at 0.6/20/0.95: 243 against 209 µs of GPU a step at batch 1, 548 against 511
# at 8; the host's launches 2.0 against 0.66 ms); on the CPU it takes a third of the sort's time.
SORT_FREE_TOP_P: bool | None = None


class _Filters:
    """Temperature, top-k, top-p and min-p, in transformers' order (the distribution top-p cuts is
    top-k's; min-p, relative to the top token, keeps the same tokens whatever went before), for
    a batch's rows, each row with its own settings: made once on the host (their values copied
    to the device without waiting), then applied to the logits [rows, V] of any number of steps:
    the temperature-scaled logits (float32), the filtered-out ones at -inf. Every operation works
    along the rows, and which path a row takes depends on its own settings alone, so a row's
    result does not depend on the others; a filter a row disables is a no-op for it (its values
    are the scaled logits, as with no filter at all).

    Top-p drops the least likely tokens whose mass stays within 1 - top_p, the top one never, in
    ascending order of (logit, index): tied logits fall lowest index first, as a stable sort
    orders them. On the CPU a row with top-k needs no sort of its vocabulary for that
    (``_top_k_top_p``, ``SORT_FREE_TOP_P``); other rows with top-p sort theirs."""

    def __init__(self, temperature: list[float], top_k: list[int], top_p: list[float], min_p: list[float],
                 vocab: int, device: torch.device, kth_kernel: bool = False) -> None:
        # 0 where off, before packing: a top_k past int64 (2**64, "no limit") overflowed the tensor
        k = torch.tensor([k if 0 < k < vocab else 0 for k in top_k], dtype=torch.long)
        p, m = torch.tensor(top_p, dtype=torch.float64), torch.tensor(min_p, dtype=torch.float32)
        # top-p on or off decided in double, as transformers decides it (1 - 1e-8 is 1 in float32)
        k_on, p_on = k > 0, p < 1
        self.use_min_p = bool((m > 0).any())
        # the largest k: its top values hold every row's k-th largest (a partial sort, not a whole one)
        self.k_max = int(k[k_on].max()) if k_on.any() else 0
        # top-p with top-k: cut among the top values (_top_k_top_p); top-p alone: its rows sorted
        sort_free = device.type == "cpu" if SORT_FREE_TOP_P is None else SORT_FREE_TOP_P
        in_top_k = p_on & k_on if sort_free else torch.zeros_like(p_on)
        self.nucleus_in_top_k = bool(in_top_k.any())
        sorted_rows = p_on & ~in_top_k
        self.sorted_rows = None
        if sorted_rows.any():
            self.sorted_rows = slice(None) if sorted_rows.all() else _to_device(
                torch.nonzero(sorted_rows).flatten(), device)
        # one row a setting: the temperature, the index of the k-th largest logit (-1 where a row
        # keeps all), min-p, and the mass top-p drops, 1 - top_p taken in double as transformers
        # takes it (-inf where a row keeps all: its cumulative sums may round to 0 before the end)
        k_index = torch.where(k_on, k - 1, -1)
        drops = torch.where(p_on, 1 - p, float("-inf")).float()
        values = torch.stack((torch.tensor(temperature, dtype=torch.float64).float(), k_index.float(), m, drops))
        self.values = _to_device(values, device)
        # kth_kernel: each row's k-th largest from kernels/topk.py instead of torch.topk, where k
        # fits it and no row cuts top-p among its top values (which takes them from torch.topk)
        self.kth = None
        if kth_kernel and self.k_max and not self.nucleus_in_top_k:
            from braid_engine.kernels.topk import MAX_K, KthLargest

            if self.k_max <= MAX_K:
                self.kth = KthLargest(len(temperature), vocab, self.k_max, device)
                self.k_index = _to_device(k_index.int(), device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        temperature, k_index, min_p, top_p_drops = self.values[:, :, None]
        logits = logits / temperature
        if self.k_max:
            # ties at the k-th value are kept, as transformers keeps them
            if self.kth is not None:  # -inf where a row keeps all
                logits = logits.masked_fill((logits < self.kth(logits, self.k_index)) & (k_index >= 0),
                                            float("-inf"))
            else:
                top, at = torch.topk(logits, self.k_max, dim=-1)
                kth = top.gather(1, k_index.clamp(min=0).long())
                if self.nucleus_in_top_k:
                    logits = _top_k_top_p(logits, top, at, kth.masked_fill(k_index < 0, float("-inf")),
                                          top_p_drops.masked_fill(k_index < 0, float("-inf")))
                else:
                    logits = logits.masked_fill((logits < kth) & (k_index >= 0), float("-inf"))
        if self.sorted_rows is not None:
            rows = self.sorted_rows
            cut = _top_p_sorted(logits[rows], top_p_drops[rows])
            if isinstance(rows, slice):
                logits = cut
            else:
                logits = logits.index_copy(0, rows, cut)
        if self.use_min_p:
            probs = torch.softmax(logits, -1)
            logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
        return logits

    @property
    def temperature(self) -> torch.Tensor:
        """The rows' temperatures [rows], float32, on the device."""
        return self.values[0]

    @property
    def scale_only(self) -> bool:
        """No row filters: the scaled logits are all there is."""
        return not (self.k_max or self.sorted_rows is not None or self.use_min_p)


def _top_p_sorted(logits: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """Top-p for rows [n, V] by a sort of each: ``drops`` [n, 1] the mass each drops (-inf: none)."""
    sorted_logits, order = torch.sort(logits, dim=-1, stable=True)
    drop_sorted = torch.softmax(sorted_logits, -1).cumsum(-1) <= drops
    drop_sorted[:, -1] = False
    return logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))


def _top_k_top_p(logits: torch.Tensor, top: torch.Tensor, at: torch.Tensor, kth: torch.Tensor,
                 drops: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over what it keeps, with no sort of the vocabulary. ``top``, ``at``
    [n, K]: each row's K largest logits and their indices (torch.topk), ``kth`` [n, 1] its k-th
    largest (-inf: keeps all), ``drops`` [n, 1] the mass top-p drops (-inf: none).

    Top-k keeps the t tokens tied at the k-th value and the s < k above it, all among the top K.
    In ascending (logit, index) order the ties come first, each of the same probability q: top-p
    drops the lowest-indexed of them while their cumulative mass j·q stays within the drop, and,
    once all are gone, the larger ones, sorted among the K, while theirs does. What is kept is
    every token from a cut on: past the k-th value, the ties past the m-th (counted by index
    across the row), or, where the cut falls among the larger ones, from its (logit, index) on.
    The masses are summed in double, a softmax and cumulative sum over the sorted row in float32:
    the two cut differently only where a cumulative mass lies within float32's rounding of the
    drop (its last bit; a few bits over a tie group of thousands), e.g. a group of t at a drop of
    j/t, where that rounding decides either way."""
    neg = float("-inf")
    ties = logits == kth  # (no token is "tied" with a NaN)
    t = ties.sum(-1, keepdim=True)
    # the survivors' probabilities, in double ([n, K]: cheap): the larger ones' and the ties' q
    larger = top > kth
    peak = top[:, :1].double()
    tie_weight = torch.exp(kth.double() - peak)
    scale = torch.where(larger, torch.exp(top.double() - peak), 0).sum(-1, keepdim=True) + t * tie_weight
    q = tie_weight / scale
    s = larger.sum(-1, keepdim=True)
    # ties dropped: j·q ≤ drop for j = 1..m; never all of them when nothing is larger
    m = torch.minimum(torch.floor(drops / q).nan_to_num(neg, float("inf"), neg), (t - (s == 0).long()).double())
    # the larger ones in ascending (logit, index) order: the K by index, then stably by logit
    by_index, order = at.sort(-1)
    ascending, order2 = top.gather(1, order).sort(dim=-1, stable=True)
    index = by_index.gather(1, order2)
    up = ascending > kth
    mass = t * q + torch.where(up, torch.exp(ascending.double() - peak) / scale, 0).cumsum(-1)
    # the larger ones dropped, never the top one; they are the last s of the K
    dropped = ((mass <= drops) & up).sum(-1, keepdim=True).clamp(max=(s - 1).clamp(min=0))
    cut = (top.shape[-1] - s + dropped).clamp(max=top.shape[-1] - 1)
    cut_value, cut_index = ascending.gather(1, cut), index.gather(1, cut)
    columns = torch.arange(logits.shape[-1], device=logits.device)
    in_ties = m < t.float()
    rank = ties.cumsum(-1)  # a tie's place among its row's ties, by index, from 1
    keep = torch.where(in_ties, (logits > kth) | (ties & (rank > m)),
                       (logits > cut_value) | ((logits == cut_value) & (columns >= cut_index)))
    # a row with a NaN: top-k's mask alone, as where no row cuts top-p among its top values (a
    # NaN softmax drops nothing; a row without top-k, kth -inf, keeps every token, NaN included)
    keep = torch.where(logits.isnan().any(-1, keepdim=True), ~(logits < kth), keep)
    return logits.masked_fill(~keep, neg)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``values`` on ``device``; to a GPU through pinned memory, queued: a copy from pageable
    memory would make the host wait for everything queued before it (a burst's replays)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


class RowSampler:
    """Picks one token per row of a batch's logits [B, V] (any float dtype), on their device,
    without the host waiting: greedy rows take the argmax; the others are filtered (temperature,
    top-k, top-p, min-p) and drawn by an exponential race (Gumbel-max: the argmax of
    ``z − log E``, E ~ Exp(1), z the scaled and filtered logits: the argmax of ``p / E``). A
    seeded request's row takes its E from its own generator, so its tokens do not depend on the
    rows beside it; the rows of requests without one share one draw from the default generator
    (one launch a step, not one a row). On a GPU with Triton and ``fused`` (the engine's fused
    kernels not off, and ``kernels.FUSED_SAMPLING``), the race (and for rows that only scale, the
    temperature) runs in the greedy-token kernels (``kernels/argmax.py``): one pass over the
    logits; with ``top_k_kernel`` too (None: ``kernels.FUSED_TOP_K``), top-k's threshold comes from
    ``kernels/topk.py``; with ``top_p_kernel`` (None: ``kernels.FUSED_TOP_P``), the rows with top-k (k ≤ 64)
    and top-p and no min-p take their keep rule from ``kernels/topp.py`` (no sort of the row), the race
    applying it.
    Made once for a batch, it serves every step of a decode burst."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None],
                 vocab: int, device: torch.device, fused: bool = True, top_k_kernel: bool | None = None,
                 top_p_kernel: bool | None = None) -> None:
        self.rows = [i for i, p in enumerate(params) if not p.greedy]
        self.seeded = [(r, generators[i]) for r, i in enumerate(self.rows) if generators[i] is not None]
        self.shared = len(self.seeded) < len(self.rows)
        ps = [params[i] for i in self.rows]
        self.every_row = len(self.rows) == len(params)
        self.index = None if self.every_row or not self.rows else _to_device(torch.tensor(self.rows), device)
        fused = bool(ps) and fused and fused_kernels_available(device)
        settings = ([p.temperature for p in ps], [p.top_k for p in ps], [float(p.top_p) for p in ps],
                    [float(p.min_p) for p in ps])
        self._vocab, self._device = vocab, device
        self._kth_kernel = fused and (kernels.FUSED_TOP_K if top_k_kernel is None else top_k_kernel)
        self._filters = None
        # top-p after top-k by its keep rule from kernels/topp.py (kernels.FUSED_TOP_P), for the rows
        # with both (k ≤ topp.MAX_K) and no min-p: their own filters are the rule, applied in the race;
        # the other rows' filters (``rest``) run as without it. Where the race kernel does not take
        # the logits (float64, say), every row is filtered in torch (``filters``).
        self.cut = self.rest = None
        if fused and (kernels.FUSED_TOP_P if top_p_kernel is None else top_p_kernel):
            from braid_engine.kernels.topp import MAX_K, TopKTopPCut

            temperature, top_k, top_p, min_p = settings
            on = [0 < k <= MAX_K and k < vocab and p < 1 and m == 0 for k, p, m in zip(top_k, top_p, min_p)]
            if any(on):
                self.cut = TopKTopPCut(len(ps), vocab, max(k for k, o in zip(top_k, on) if o), device)
                # k − 1 and the mass dropped (1 − top_p in double, as _Filters takes it); -1: no rule
                self.cut_k_index = _to_device(torch.tensor([k - 1 if o else -1 for k, o in zip(top_k, on)],
                                                           dtype=torch.int32), device)
                self.cut_drops = _to_device(torch.tensor([1 - p if o else 0.0 for p, o in zip(top_p, on)],
                                                         dtype=torch.float64).float(), device)
                self.rest = _Filters(temperature, [-1 if o else k for k, o in zip(top_k, on)],
                                     [1.0 if o else p for p, o in zip(top_p, on)], min_p, vocab, device,
                                     kth_kernel=self._kth_kernel)
        self._settings = settings
        if ps and self.cut is None:
            self._filters = _Filters(*settings, vocab, device, kth_kernel=self._kth_kernel)
        self.kernel = None
        if fused:
            from braid_engine.kernels.argmax import GreedyIds

            self.kernel = GreedyIds(len(ps), vocab, device)

    @property
    def filters(self) -> _Filters | None:
        """Every sampled row's filters in torch (None: no row is sampled); with a keep-rule kernel,
        made when first needed."""
        if self._filters is None and self.rows:
            self._filters = _Filters(*self._settings, self._vocab, self._device, kth_kernel=self._kth_kernel)
        return self._filters

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits.argmax(-1)
        rows, kernel, z, temperature, cut = self._rule(logits)
        race = torch.empty(z.shape, dtype=torch.float32, device=z.device)
        if self.shared:
            race.exponential_()
        for r, gen in self.seeded:
            race[r].exponential_(generator=gen)
        if kernel is None:
            drawn = (z - race.log()).argmax(-1)
        else:
            drawn = kernel(z, torch.empty(z.shape[0], dtype=torch.long, device=z.device), race, temperature, cut)
        return drawn if self.every_row else logits.argmax(-1).index_copy(0, self.index, drawn)

    def prepare(self, logits: torch.Tensor) -> None:
        """Run what a draw from ``logits`` runs before it draws (the filters, the keep-rule
        kernels), which draws nothing and advances no generator: every Triton kernel of that
        part is then compiled and loaded, as a CUDA graph's capture of the draw needs."""
        if self.rows:
            self._rule(logits)

    def _rule(self, logits: torch.Tensor):
        """(the sampled rows, the race kernel or None, what the race draws from, the temperature
        the kernel divides by or None, the keep rule or None)."""
        rows = logits if self.every_row else logits.index_select(0, self.index)
        # the kernel takes float32, float16 and bfloat16 with unit stride along the vocabulary;
        # anything else (float64, a transposed view) is drawn by torch, as without the kernel
        kernel = self.kernel if self.kernel is not None and rows.dtype in self.kernel.DTYPES else None
        if kernel is not None and rows.stride(-1) != 1:
            rows = rows.contiguous()
        # rows with a keep rule: the other rows' filters alone (the rule is applied in the race)
        filters = self.rest if kernel is not None and self.cut is not None else self.filters
        # only scaled: the kernel divides by the temperature itself; else the filters' float32 output
        z = rows if kernel is not None and filters.scale_only else filters(rows)
        temperature = filters.temperature if z is rows else None
        cut = None
        if kernel is not None and self.cut is not None:
            cut = self.cut(z, self.cut_k_index, self.cut_drops, temperature)
        return rows, kernel, z, temperature, cut


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           fused: bool = True, top_k_kernel: bool | None = None, top_p_kernel: bool | None = None) -> list[int]:
    """One token per row of ``logits`` [B, V] (fp32) (``RowSampler``); the host waits once, for all."""
    return RowSampler(params, generators, logits.shape[-1], logits.device, fused, top_k_kernel,
                      top_p_kernel)(logits).tolist()


def log_probabilities(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The model's log-probabilities (float32 log-softmax) of ``logits``' rows ``rows``."""
    return torch.log_softmax(logits[rows].float(), -1)


def ranked_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device, for each row of ``logprobs`` [n, V] (float32) and its drawn token ``tokens``
    [n]: (values [n, 1 + k]: the drawn token's log-probability, then the k largest; ids [n, k]:
    the tokens of those k; k at most V), the k most likely in (value, lower id) order. One top-k
    over int64 keys that order both (the value's bits made to sort as the value does, over the
    id inverted), so exact ties, common in bf16 logits, rank by id without a sort of the row."""
    drawn = logprobs.gather(1, tokens[:, None])
    k = min(k, logprobs.shape[-1])
    if not k:
        return drawn, torch.empty(tokens.shape[0], 0, dtype=torch.long, device=tokens.device)
    bits = logprobs.contiguous().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # a negative float's bits sort reversed
    ids = torch.arange(logprobs.shape[-1], device=logprobs.device)
    ids = ((ordered << 32) | (0xFFFFFFFF - ids)).topk(k, dim=-1).values.bitwise_and(0xFFFFFFFF)
    ids = 0xFFFFFFFF - ids
    return torch.cat([drawn, logprobs.gather(1, ids)], 1), ids


def logprob_entries(tokens: list[int], values: list[list[float]], ids: list[list[int]],
                    top: list[int]) -> list[dict[int, float]]:
    """``ranked_logprobs``' rows read back, as ``RequestOutput.logprobs`` entries: {the drawn
    token: its log-probability, then each of the row's ``top[i]`` most likely: theirs}."""
    out = []
    for t, v, i, n in zip(tokens, values, ids, top, strict=True):
        entry = {t: v[0]}
        for tok, val in zip(i[:n], v[1:n + 1], strict=True):
            entry.setdefault(tok, val)
        out.append(entry)
    return out


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top: list[int]) -> list[dict[int, float]]:
    """For each row of ``logprobs`` [n, V]: {token: its log-probability} for the row's drawn token
    and its ``top[i]`` most likely, the drawn one first, the rest most likely first (ties by
    lower id: ``ranked_logprobs``), read back after the step's tokens were."""
    values, ids = ranked_logprobs(logprobs, torch.tensor(tokens, device=logprobs.device), max(top))
    return logprob_entries(tokens, values.tolist(), ids.tolist(), top)
