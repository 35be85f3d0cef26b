"""Decode attention for a few sequences over the paged KV cache, split over the keys.

At batch 1 a decode step's attention reads 128–256 keys a layer (a few hundred KB), yet
FlashInfer's graph-mode decode takes 7.5 µs plus 2.3 µs for merging its split parts
(`benchmarks/decode_attention.py`). This kernel is the same computation with less around it:
program (sequence, kv head, split) takes the GQA group's query heads against one stretch of
the keys, page by page, with an online softmax in float32; a second, small kernel merges the
stretches by their log-sum-exp in split order (deterministic). The number of stretches follows
each sequence's length at run time (``BLOCK_T``-token tiles, at most ``splits`` stretches), so a
CUDA graph captured once serves every length. On Hopper both kernels are launched as
programmatic dependents (they wait for q and the cache before reading them).

The FlashInfer backend runs it for decode steps of up to four sequences. Its defaults
(``kernels.SPLIT_KV_CONFIG``: 64 stretches at most, 64-key tiles, 4 warps, 1 pipeline stage)
were the fastest summed over batch 1 and 4 and 128–4k keys in `python -m
benchmarks.decode_attention --sweep` on an H100 with the kernel reading ahead of its wait, and
gave the engine 1 % more tokens/s at batch 1 than the earlier 64/32/2/2 (``docs/benchmarks.md``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine import kernels
from braid_engine.kernels import pdl_args


@triton.jit
def _attend_tile(q, k, v, ok, m, denom, acc, scale):
    """One tile of keys folded into the running softmax of the group's query rows."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    denom = denom * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, denom, acc


@triton.jit
def _tile(cache_ptr, table_ptr, b, h, start, last, t, s_page, s_head, s_off, table_stride, page_size):
    """Positions ``start + t`` of sequence b: which are in the stretch (before ``last``), and
    where kv head h's key row of each sits in the paged cache (its value row is ``s_kv`` on)."""
    pos = start + t
    ok = pos < last
    page = tl.load(table_ptr + b * table_stride + pos // page_size, mask=ok, other=0)
    return pos, ok, cache_ptr + page.to(tl.int64) * s_page + h * s_head + (pos % page_size) * s_off


@triton.jit
def _kv(base, d, s_kv, rows):
    """The key and value rows at ``base`` where ``rows`` [T, 1] holds, zeros elsewhere."""
    k = tl.load(base[:, None] + d[None, :], mask=rows, other=0.0)
    v = tl.load(base[:, None] + s_kv + d[None, :], mask=rows, other=0.0)
    return k, v


@triton.jit
def _split_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, part_o_ptr, part_lse_ptr, scale,
                  s_page, s_kv, s_head, s_off, table_stride, page_size,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, READ_AHEAD: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if not READ_AHEAD:
            tl.extra.cuda.gdc_wait()
    kv_len = tl.load(lens_ptr + b)
    tiles = tl.cdiv(kv_len, BLOCK_T)
    per_split = tl.cdiv(tiles, SPLITS)
    first = split * per_split * BLOCK_T
    last = tl.minimum(first + per_split * BLOCK_T, kv_len)
    if first < kv_len:
        rows = tl.arange(0, ROWS)  # the group's query heads, padded to a tile tl.dot takes
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, BLOCK_T)
        # the first tile's keys and values are read before waiting for the kernel before, which
        # writes only the step's own token (the last position): earlier positions were written by
        # earlier forwards. With one tile a split (short contexts) that is all of the split's keys
        pos, ok, base = _tile(cache_ptr, table_ptr, b, h, first, last, t, s_page, s_head, s_off, table_stride,
                              page_size)
        k, v = _kv(base, d, s_kv, (ok & (pos < kv_len - 1))[:, None])
        if USE_PDL and READ_AHEAD:
            tl.extra.cuda.gdc_wait()
        # q and the step's own key and value, all written by the kernel before: read together
        # (q read after the selects below waited for the key and value to arrive first)
        q_rows = h * GROUP + rows
        q = tl.load(q_ptr + (b * NUM_HEADS + q_rows)[:, None] * HEAD_DIM + d[None, :],
                    mask=(rows < GROUP)[:, None], other=0.0)
        new = (ok & (pos == kv_len - 1))[:, None]
        k_new, v_new = _kv(base, d, s_kv, new)
        k, v = tl.where(new, k_new, k), tl.where(new, v_new, v)
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        denom = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
        m, denom, acc = _attend_tile(q, k, v, ok, m, denom, acc, scale)
        for start in range(first + BLOCK_T, last, BLOCK_T):
            pos, ok, base = _tile(cache_ptr, table_ptr, b, h, start, last, t, s_page, s_head, s_off, table_stride,
                                  page_size)
            k, v = _kv(base, d, s_kv, ok[:, None])
            m, denom, acc = _attend_tile(q, k, v, ok, m, denom, acc, scale)
        part = (b * NUM_HEADS + q_rows) * SPLITS + split
        keep = rows < GROUP
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / denom[:, None], mask=keep[:, None])
        tl.store(part_lse_ptr + part, m + tl.log(denom), mask=keep)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, lens_ptr, out_ptr, NUM_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr):
    # program (sequence, q head): the stretches' outputs weighted by their share of the softmax
    b = tl.program_id(0)
    hq = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    kv_len = tl.load(lens_ptr + b)  # the plan's, not the split kernel's: read before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    tiles = tl.cdiv(kv_len, BLOCK_T)
    per_split = tl.cdiv(tiles, SPLITS)
    active = tl.cdiv(tiles, per_split)
    sp = tl.arange(0, SPLITS)
    ok = sp < active
    base = (b * NUM_HEADS + hq) * SPLITS
    lse = tl.load(part_lse_ptr + base + sp, mask=ok, other=float("-inf"))
    d = tl.arange(0, HEAD_DIM)  # the outputs read with their log-sum-exps, not after the weights
    o = tl.load(part_o_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0)
    tl.store(out_ptr + (b * NUM_HEADS + hq) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


class DecodeAttention:
    """Decode attention of up to ``max_batch`` sequences; the partial results live in buffers
    made once, so the launches can be captured in a CUDA graph. Settings left out are
    ``kernels.SPLIT_KV_CONFIG``'s as it is now."""

    def __init__(self, max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, splits: int | None = None, block_t: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None) -> None:
        splits, block_t, num_warps, num_stages = (
            default if given is None else given
            for given, default in zip((splits, block_t, num_warps, num_stages), kernels.SPLIT_KV_CONFIG, strict=True))
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two ≥ 16 for this kernel, not {head_dim}")
        if block_t < 16 or block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of two ≥ 16 (a tl.dot operand), not {block_t}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.splits, self.block_t = triton.next_power_of_2(splits), block_t
        self.num_warps, self.num_stages = num_warps, num_stages
        self.part_o = torch.empty(max_batch * num_heads * self.splits, head_dim, dtype=torch.float32, device=device)
        self.part_lse = torch.empty(max_batch * num_heads * self.splits, dtype=torch.float32, device=device)

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
                 kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, Hq, D]; cache [pages, 2, Hkv, page_size, D] (one layer); page_table [B, ≥ pages
        of the longest] int32; kv_lens [B] int32 (every length ≥ 1) → out [B, Hq, D]."""
        bsz = q.shape[0]
        if q.shape[1:] != (self.num_heads, self.head_dim) or bsz * self.num_heads * self.splits > self.part_lse.numel():
            raise ValueError(f"q must be [≤ max_batch, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        q = q.contiguous()
        group = self.num_heads // self.num_kv_heads
        out = torch.empty_like(q)
        pdl = pdl_args(q.device)
        _split_kernel[(bsz, self.num_kv_heads, self.splits)](
            q, cache, page_table, kv_lens, self.part_o, self.part_lse, scale,
            cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), page_table.stride(0), cache.shape[3],
            NUM_HEADS=self.num_heads, GROUP=group, ROWS=max(16, triton.next_power_of_2(group)),
            HEAD_DIM=self.head_dim, SPLITS=self.splits, BLOCK_T=self.block_t, READ_AHEAD=kernels.READ_AHEAD,
            num_warps=self.num_warps, num_stages=self.num_stages, **pdl)
        _merge_kernel[(bsz, self.num_heads)](
            self.part_o, self.part_lse, kv_lens, out, NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim,
            SPLITS=self.splits, BLOCK_T=self.block_t, num_warps=2, **pdl)
        return out
