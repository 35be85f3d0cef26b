"""Top-k then top-p's keep rule for each row, found among its top values without sorting the row.

``sampling._top_k_top_p`` (the reference: the same tokens) keeps, in ascending (logit, index)
order, a suffix of what top-k keeps: every token from a cut on. So a row's filter is one rule,
(cut value, cut index): token j is dropped iff ``z_j < cut_value`` or ``z_j == cut_value and
j < cut_index``. A row whose cut falls among the tokens tied at the k-th value drops the ties
before the (m+1)-th (by index): the rule (k-th value, index of the (m+1)-th tie); a row with a NaN
takes top-k's mask alone, (k-th value, 0) (a NaN is never below anything, so it is kept); a row
without the filter, (-inf, 0), drops nothing. The race (``kernels/argmax.py``, ``cut=``) applies
the rule to the scaled logits as it draws, so the scaled, filtered row is never written.

Two kernels find the rule, over z = x / temperature (float32, divided as torch divides):

* program (row, chunk) keeps its chunk's largest ``KEEP`` (the next power of two of the largest
  k) in the total order (value descending, index ascending), as int64 keys: the value's bits made
  orderable above (-0.0 as 0.0, every NaN above +inf, as torch.topk ranks NaN), the index
  inverted below, so one integer max finds the next one. KEEP rounds of a max over the chunk,
  each taking its winner out, instead of a sort: a bitonic sort of 4,096 values is 78
  compare-and-swap passes over the chunk (``kernels/topk.py`` sorts so, and was slower than
  torch.topk on an H200); 32 reductions (k ≤ 32) is fewer passes, each a max. A row's largest
  KEEP are among its chunks' largest KEEP, and the tokens tied at the k-th value among them are
  the lowest-indexed ties.
* program (row) takes the largest KEEP of the chunks' keys the same way: the row's own largest
  KEEP in that order (the ``s`` larger than the k-th value first, then the ties by index), the
  k-th value, and the cut as ``_top_k_top_p`` defines it, the masses in double (the larger ones
  summed in ascending (value, index) order, as the reference sums them: KEEP more rounds over the
  KEEP keys with the index not inverted; the order within tied larger values decides which of
  them the cut keeps). Where the last of the KEEP is still tied at the k-th value, the row's tie
  count ``t`` is unknown: that row counts its ties over the whole row (a loop over it in this one
  program; not where no tie carries any mass, e.g. a k-th value of -inf, a grammar-masked row with
  fewer tokens than k), and, where the cut lies past the ties among the candidates, finds the
  (m+1)-th tie's index by a second loop. Where k is below KEEP, rows of real logits rarely take
  it; where k is KEEP itself (a power of two: 16, 32, 64 as the batch's largest k), the k-th
  candidate is the last one, so every such row counts its ties every step (correct, and to be
  measured: counting them from the chunks' kept keys, scanning only where a chunk's last kept
  key ties the k-th value, or a KEEP of the next power of two past k, would avoid it).

On an H200 at Qwen3's vocabulary and settings the rule and the race took 51 µs of GPU a batch-1
step, where torch.topk, the sorted row and the race took 210 (benchmarks/sampling.py; on by
default, ``kernels.FUSED_TOP_P``). The cost as reasoned: program (row,
chunk) reads its 4,096 values once and runs KEEP block-wide int64 max reductions (two barriers
each); program (row) reads chunks × KEEP keys (38 × 32 at Qwen3's vocabulary and k of 20) and
runs 2 × KEEP reductions, in one program a row: at batch 1 its latency is the longer part. A
smaller ``chunk`` gives more programs a row and more keys to the row's program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine.kernels.topk import check_k_index

CHUNK = 4096
# the largest k the kernels take: program (row) takes the largest KEEP of (chunks, rounded up to a
# power of two) × KEEP keys; past it the sampler cuts top-p in torch
MAX_K = 64

_GONE = tl.constexpr(-9223372036854775807)  # below every key (its index is past any vocabulary)


@triton.jit
def _ordered(z):
    """z's bits as an int32 of the same order: -0.0 as 0.0, each NaN above +inf."""
    z = tl.where(z == 0, 0.0, z)
    b = z.to(tl.int32, bitcast=True)
    b = tl.where(b < 0, b ^ 0x7FFFFFFF, b)  # negative floats: larger bits, smaller value
    return tl.where(z != z, 0x7FFFFFFF, b)


@triton.jit
def _keys(z, idx):
    """int64 keys ordered as (z descending, index ascending)."""
    return (_ordered(z).to(tl.int64) << 32) | (4294967295 - idx.to(tl.int64))


@triton.jit
def _value(key):
    b = (key >> 32).to(tl.int32)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b).to(tl.float32, bitcast=True)


@triton.jit
def _index(key):
    return 4294967295 - (key & 4294967295)


@triton.jit
def _largest(keys, KEEP: tl.constexpr):
    """The largest KEEP of ``keys`` (distinct), largest first: KEEP rounds of a max."""
    r = tl.arange(0, KEEP)
    top = tl.full([KEEP], _GONE, tl.int64)
    for i in range(KEEP):
        best = tl.max(keys, axis=0)
        top = tl.where(r == i, best, top)
        keys = tl.where(keys == best, _GONE, keys)
    return top


@triton.jit
def _scaled(x_ptr, x_stride, t_ptr, row, idx, ok, TEMPERATURE: tl.constexpr):
    v = tl.load(x_ptr + row.to(tl.int64) * x_stride + idx, mask=ok, other=float("-inf")).to(tl.float32)
    if TEMPERATURE:  # divided, as torch divides (not times a reciprocal)
        v = tl.math.div_rn(v, tl.load(t_ptr + row))
    return v


@triton.jit
def _chunk_kernel(x_ptr, x_stride, t_ptr, k_ptr, part_ptr, n, CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                  KEEP: tl.constexpr, TEMPERATURE: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    idx = c * CHUNK + tl.arange(0, CHUNK)
    # a row without the filter (k index -1) reads nothing
    v = _scaled(x_ptr, x_stride, t_ptr, row, idx, idx < tl.where(tl.load(k_ptr + row) >= 0, n, 0), TEMPERATURE)
    # past the vocabulary: -inf at an index ≥ n, below every token (not one of them)
    top = _largest(_keys(v, idx), KEEP)
    tl.store(part_ptr + (row * CHUNKS + c) * KEEP + tl.arange(0, KEEP), top)


@triton.jit
def _cut_kernel(x_ptr, x_stride, t_ptr, k_ptr, drop_ptr, part_ptr, cut_val_ptr, cut_idx_ptr, n, chunks,
                CHUNKS: tl.constexpr, CHUNK: tl.constexpr, KEEP: tl.constexpr, TEMPERATURE: tl.constexpr):
    row = tl.program_id(0)
    k_index = tl.load(k_ptr + row)  # the k-th largest's place, k − 1; -1: no filter
    i = tl.arange(0, CHUNKS * KEEP)
    top = _largest(tl.load(part_ptr + row * CHUNKS * KEEP + i, mask=i < chunks * KEEP, other=_GONE), KEEP)
    val, idx = _value(top), _index(top)
    r = tl.arange(0, KEEP)
    valid = idx < n
    kth = _value(tl.max(tl.where(r == k_index, top, _GONE), axis=0))
    peak = _value(tl.max(top, axis=0))
    nan_row = peak != peak  # NaN ranks first: the row holds one iff its largest is one
    larger = valid & (val > kth)
    s = tl.sum(larger.to(tl.int32), axis=0)
    tie = valid & (val == kth)
    tc = tl.sum(tie.to(tl.int32), axis=0)  # the ties among the candidates
    # the survivors' probabilities in double: the larger ones' and each tie's
    peak64 = peak.to(tl.float64)
    w = tl.where(larger, tl.exp(val.to(tl.float64) - peak64), 0.0)
    tie_w = tl.exp(kth.to(tl.float64) - peak64)
    # the last candidate tied too: more ties may follow past the candidates. Their count matters
    # unless no tie carries mass beside larger ones (then every tie is dropped before them)
    overflow = tl.max(tl.where(r == KEEP - 1, tie.to(tl.int32), 0), axis=0) > 0
    t = tc
    if (k_index >= 0) & overflow & ~nan_row & ~((tie_w == 0) & (s > 0)):
        t = tl.full([], 0, tl.int32)
        for c in range(0, chunks):
            j = c * CHUNK + tl.arange(0, CHUNK)
            ok = j < n
            v = _scaled(x_ptr, x_stride, t_ptr, row, j, ok, TEMPERATURE)
            t += tl.sum(((v == kth) & ok).to(tl.int32), axis=0)
    t64 = t.to(tl.float64)
    scale = tl.sum(w, axis=0) + t64 * tie_w
    q = tie_w / scale
    drop = tl.load(drop_ptr + row).to(tl.float64)
    # ties dropped: j·q ≤ drop for j = 1..m (NaN: none; a NaN or infinite mass drops none), never
    # all of them when nothing is larger
    m = tl.floor(drop / q)
    m = tl.where(m != m, float("-inf"), m)
    m = tl.minimum(m, t64 - (s == 0).to(tl.float64))
    in_ties = m < t64
    # the larger ones in ascending (value, index) order, as the reference sums their masses: the
    # same rounds over the complemented keys (value above, index below, not inverted)
    up = ~_largest(tl.where(larger, ~((_ordered(val).to(tl.int64) << 32) | idx), _GONE), KEEP)
    up_ok = r < s
    up_val, up_idx = _value(up), up & 4294967295
    # dropped while their mass is ≤ drop; never the top one
    mass = t64 * q + tl.cumsum(tl.where(up_ok, tl.exp(up_val.to(tl.float64) - peak64), 0.0) / scale, axis=0)
    dropped = tl.sum(((mass <= drop) & up_ok).to(tl.int32), axis=0)
    dropped = tl.maximum(tl.minimum(dropped, s - 1), 0)
    at = s + tl.maximum(tl.minimum(m, t64), 0.0).to(tl.int32)  # (in ties) the (m+1)-th tie's place
    # where the cut lies among the ties past the candidates: the (m+1)-th tie's index, by a scan
    cut_idx = tl.where(in_ties, tl.max(tl.where(r == at, idx, -1), axis=0),
                       tl.max(tl.where(r == dropped, up_idx, -1), axis=0)).to(tl.int32)
    if (k_index >= 0) & in_ties & (at >= s + tc) & ~nan_row:
        need = at - s + 1
        seen = tl.full([], 0, tl.int32)
        cut_idx = tl.full([], 0, tl.int32) + n
        for c in range(0, chunks):
            j = c * CHUNK + tl.arange(0, CHUNK)
            ok = j < n
            v = _scaled(x_ptr, x_stride, t_ptr, row, j, ok, TEMPERATURE)
            hit = (v == kth) & ok
            rank = seen + tl.cumsum(hit.to(tl.int32), axis=0)
            cut_idx = tl.minimum(cut_idx, tl.min(tl.where(hit & (rank == need), j, n), axis=0))
            seen += tl.sum(hit.to(tl.int32), axis=0)
    cut_val = tl.where(in_ties, kth, _value(tl.max(tl.where(r == dropped, up, _GONE), axis=0)))
    # a NaN row: top-k's mask alone (drop what is below the k-th value); no filter: drop nothing
    cut_val = tl.where(nan_row, kth, cut_val)
    cut_idx = tl.where(nan_row, 0, cut_idx)
    tl.store(cut_val_ptr + row, tl.where(k_index >= 0, cut_val, float("-inf")))
    tl.store(cut_idx_ptr + row, tl.where(k_index >= 0, cut_idx, 0))


class TopKTopPCut:
    """Each row's keep rule for top-k then top-p (``sampling._top_k_top_p``'s tokens), for up to
    ``max_rows`` rows of ``vocab`` logits and a largest k ≤ :data:`MAX_K`: (cut value [rows] float32,
    cut index [rows] int32), token j dropped iff ``z_j < value or (z_j == value and j < index)``.
    ``chunk`` (a power of two): the values one program reads (smaller for the CPU interpreter's
    tests). Its buffers are made once, so the launches can be captured in a CUDA graph."""

    DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the logits' it takes

    def __init__(self, max_rows: int, vocab: int, k_max: int, device: torch.device, chunk: int = CHUNK) -> None:
        if not 1 <= k_max <= MAX_K:
            raise ValueError(f"the kernels take a largest k of 1 to {MAX_K}, got {k_max}")
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"chunk must be a power of two of at least 16, got {chunk}")
        self.vocab, self.k_max, self.keep, self.chunk = vocab, k_max, triton.next_power_of_2(k_max), chunk
        self.chunks = triton.cdiv(vocab, chunk)
        self.width = triton.next_power_of_2(self.chunks)
        self.max_rows = max_rows
        # the chunks past the last (up to a power of two) are never written: read masked
        self.part = torch.empty(max_rows * self.width * self.keep, dtype=torch.int64, device=device)
        self.cut_value = torch.empty(max_rows, dtype=torch.float32, device=device)
        self.cut_index = torch.empty(max_rows, dtype=torch.int32, device=device)

    def __call__(self, x: torch.Tensor, k_index: torch.Tensor, drops: torch.Tensor,
                 temperature: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [rows, vocab] (unit stride along vocab): the scaled logits, or with ``temperature``
        (float32 [rows]) the logits it divides; k_index [rows] int32 (k − 1, at most k_max − 1;
        -1: no filter), drops [rows] float32 (1 − top_p, taken in double; > 0) → the rules' views."""
        rows = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.vocab or x.stride(1) != 1 or rows > self.max_rows:
            raise ValueError(f"x must be [≤ {self.max_rows}, {self.vocab}] with unit stride along the vocabulary, "
                             f"got {tuple(x.shape)}")
        if x.dtype not in self.DTYPES:
            raise ValueError(f"x must be float32, float16 or bfloat16 (compared in float32), got {x.dtype}")
        for name, v, dtype in (("k_index", k_index, torch.int32), ("drops", drops, torch.float32),
                               ("temperature", temperature, torch.float32)):
            if v is not None and (v.shape != (rows,) or v.dtype != dtype or not v.is_contiguous()):
                raise ValueError(f"{name} must be contiguous {dtype} [{rows}]")
        check_k_index(k_index, self.k_max)  # places past k_max − 1 would read past the kept keys
        scaled = temperature is not None
        t = temperature if scaled else x
        _chunk_kernel[(rows, self.chunks)](x, x.stride(0), t, k_index, self.part, self.vocab, CHUNKS=self.width,
                                           CHUNK=self.chunk, KEEP=self.keep, TEMPERATURE=scaled, num_warps=8)
        _cut_kernel[(rows,)](x, x.stride(0), t, k_index, drops, self.part, self.cut_value, self.cut_index,
                             self.vocab, self.chunks, CHUNKS=self.width, CHUNK=self.chunk, KEEP=self.keep,
                             TEMPERATURE=scaled, num_warps=8)
        return self.cut_value[:rows], self.cut_index[:rows]
