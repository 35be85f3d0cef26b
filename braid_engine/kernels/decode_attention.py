"""Decode attention for a few sequences over the paged KV cache, split over the keys.

At batch 1 a decode step's attention reads 128–256 keys a layer (a few hundred KB), yet
FlashInfer's graph-mode decode takes 7.5 µs plus 2.3 µs for merging its split parts
(`benchmarks/decode_attention.py`). This kernel is the same computation with less around it:
program (sequence, kv head, split) takes the GQA group's query heads against one stretch of
the keys, page by page, with an online softmax in float32; a second, small kernel merges the
stretches by their log-sum-exp in split order (deterministic) — or, with ``merge_in_split``
(opt-in until measured on the GPU), the last stretch of each (sequence, kv head) to finish
merges them itself, a launch less a layer. ``with_prologue`` (opt-in likewise) takes the QKV
projection instead of q and does Qwen3's q/k norms, RoPE and the new token's k/v write in the
same kernel — another launch less. The number of stretches follows
each sequence's length at run time (``BLOCK_T``-token tiles, at most ``splits`` stretches), so a
CUDA graph captured once serves every length. On Hopper both kernels are launched as
programmatic dependents (they wait for q and the cache before reading them).

The FlashInfer backend runs it for decode steps of up to four sequences. Its defaults (64
stretches at most, 32-key tiles, 2 warps, 2 pipeline stages) were the fastest summed over batch
1 and 4 and 128–8k keys in `python -m benchmarks.decode_attention --sweep` on an H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine.kernels import pdl_args


@triton.jit
def _merge_head(part_o_ptr, part_lse_ptr, out_ptr, b, hq, active, NUM_HEADS: tl.constexpr,
                HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    # query head hq of sequence b: its ``active`` stretches' outputs weighted by their share of
    # the softmax, in split order (read past L1: other programs wrote them)
    sp = tl.arange(0, SPLITS)
    ok = sp < active
    base = (b * NUM_HEADS + hq) * SPLITS
    lse = tl.load(part_lse_ptr + base + sp, mask=ok, other=float("-inf"), cache_modifier=".cg")
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    d = tl.arange(0, HEAD_DIM)
    o = tl.load(part_o_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :], mask=ok[:, None], other=0.0,
                cache_modifier=".cg")
    out = tl.sum(o * w[:, None], axis=0)
    tl.store(out_ptr + (b * NUM_HEADS + hq) * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _norm_rope(row_ptr, heads, mask, w_ptr, pos, cos_ptr, sin_ptr, rope_stride, eps, dtype: tl.constexpr,
               HEAD_DIM: tl.constexpr, APPLY_NORM: tl.constexpr):
    # heads [R] of one token's qkv row: per-head RMSNorm and rotate-half RoPE with the roundings
    # of qk_norm_rope.py, on whole heads (the rotated partner of element d is element d ± D/2,
    # loaded beside it) so that the result is a tile tl.dot takes as it is
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    partner = (d + half) % HEAD_DIM
    x = tl.load(row_ptr + heads[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    xp = tl.load(row_ptr + heads[:, None] * HEAD_DIM + partner[None, :], mask=mask, other=0.0)
    if APPLY_NORM:
        f = x.to(tl.float32)
        # the sum of squares over the two halves apart and then added, as qk_norm_rope.py adds them
        lo = tl.arange(0, half)
        f1 = tl.load(row_ptr + heads[:, None] * HEAD_DIM + lo[None, :], mask=mask, other=0.0).to(tl.float32)
        f2 = tl.load(row_ptr + heads[:, None] * HEAD_DIM + half + lo[None, :], mask=mask, other=0.0).to(tl.float32)
        r = tl.math.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / HEAD_DIM + eps)[:, None]
        x = (tl.load(w_ptr + d).to(tl.float32)[None, :] * (f * r).to(dtype).to(tl.float32)).to(dtype)
        xp = (tl.load(w_ptr + partner).to(tl.float32)[None, :] * (xp.to(tl.float32) * r).to(dtype)
              .to(tl.float32)).to(dtype)
    c = tl.load(cos_ptr + pos * rope_stride + d % half).to(dtype).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * rope_stride + d % half).to(dtype).to(tl.float32)[None, :]
    sign = tl.where(d < half, -1.0, 1.0)[None, :]
    return ((x.to(tl.float32) * c).to(dtype).to(tl.float32)
            + (sign * xp.to(tl.float32) * s).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def _split_kernel(q_ptr, cache_ptr, table_ptr, lens_ptr, part_o_ptr, part_lse_ptr, scale,
                  s_page, s_kv, s_head, s_off, table_stride, page_size, count_ptr, out_ptr,
                  qkv_stride, pos_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, rope_stride, slot_ptr, eps,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, MERGE: tl.constexpr, PROLOGUE: tl.constexpr,
                  APPLY_NORM: tl.constexpr, USE_PDL: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    kv_len = tl.load(lens_ptr + b)
    tiles = tl.cdiv(kv_len, BLOCK_T)
    per_split = tl.cdiv(tiles, SPLITS)
    first = split * per_split * BLOCK_T
    last = tl.minimum(first + per_split * BLOCK_T, kv_len)
    if first < kv_len:
        rows = tl.arange(0, ROWS)  # the group's query heads, padded to a tile tl.dot takes
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, BLOCK_T)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        q_rows = h * GROUP + rows
        if PROLOGUE:
            # q_ptr is the step's qkv [B, (Hq + 2·Hkv)·D]: this program norms and rotates its
            # group's q heads, and the stretch holding the new token writes its k and v
            dtype = out_ptr.dtype.element_ty
            row = q_ptr + b * qkv_stride
            tok = tl.load(pos_ptr + b)  # not ``pos``: the key loop below names its tile so
            q = _norm_rope(row, q_rows, (rows < GROUP)[:, None], qw_ptr, tok, cos_ptr, sin_ptr, rope_stride, eps,
                           dtype, HEAD_DIM, APPLY_NORM)
            if (first <= kv_len - 1) & (kv_len - 1 < last):
                one = (rows == 0)[:, None]
                k_new = _norm_rope(row, NUM_HEADS + h + rows * 0, one, kw_ptr, tok, cos_ptr, sin_ptr, rope_stride,
                                   eps, dtype, HEAD_DIM, APPLY_NORM)
                slot = tl.load(slot_ptr + b)
                dst = (cache_ptr + (slot // page_size).to(tl.int64) * s_page + h * s_head
                       + (slot % page_size) * s_off + d[None, :] + rows[:, None] * 0)
                ct = cache_ptr.dtype.element_ty
                tl.store(dst, k_new.to(ct), mask=one)
                v_new = tl.load(row + (NUM_HEADS + tl.num_programs(1) + h) * HEAD_DIM + d[None, :] + rows[:, None] * 0,
                                mask=one, other=0.0)
                tl.store(dst + s_kv, v_new.to(ct), mask=one)
                tl.debug_barrier()  # the stores before any thread's loads of that tile
        else:
            q = tl.load(q_ptr + (b * NUM_HEADS + q_rows)[:, None] * HEAD_DIM + d[None, :],
                        mask=(rows < GROUP)[:, None], other=0.0)
        m = tl.full((ROWS,), float("-inf"), tl.float32)
        denom = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
        for start in range(first, last, BLOCK_T):
            pos = start + t
            ok = pos < last
            page = tl.load(table_ptr + b * table_stride + pos // page_size, mask=ok, other=0)
            base = cache_ptr + page.to(tl.int64) * s_page + h * s_head + (pos % page_size) * s_off
            k = tl.load(base[:, None] + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(base[:, None] + s_kv + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m = m_new
        part = (b * NUM_HEADS + q_rows) * SPLITS + split
        keep = rows < GROUP
        tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / denom[:, None], mask=keep[:, None])
        tl.store(part_lse_ptr + part, m + tl.log(denom), mask=keep)
        if MERGE:
            # the last of the (sequence, kv head)'s stretches to finish merges the group's heads,
            # saving the merge kernel's launch; every thread's stores come before the count (a
            # barrier, then one thread's gpu-scope release; the merger's acquire is broadcast by
            # a barrier before its loads). The count returns to 0 only if every program of a
            # launch sees the same kv length (written before the launch, never by a kernel that
            # may overlap it) and one stream at a time uses this object's counts
            tl.debug_barrier()
            counter = count_ptr + b * tl.num_programs(1) + h
            active = tl.cdiv(tiles, per_split)
            if tl.atomic_add(counter, 1, sem="acq_rel") == active - 1:
                for g in tl.static_range(GROUP):
                    _merge_head(part_o_ptr, part_lse_ptr, out_ptr, b, h * GROUP + g, active, NUM_HEADS,
                                HEAD_DIM, SPLITS)
                # ready for the next launch: the kernel's end publishes it, no ordering needed here
                tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, lens_ptr, out_ptr, NUM_HEADS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr):
    # program (sequence, q head): the stretches' outputs weighted by their share of the softmax
    b = tl.program_id(0)
    hq = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    kv_len = tl.load(lens_ptr + b)
    tiles = tl.cdiv(kv_len, BLOCK_T)
    per_split = tl.cdiv(tiles, SPLITS)
    _merge_head(part_o_ptr, part_lse_ptr, out_ptr, b, hq, tl.cdiv(tiles, per_split), NUM_HEADS, HEAD_DIM, SPLITS)


class DecodeAttention:
    """Decode attention of up to ``max_batch`` sequences; the partial results live in buffers
    made once, so the launches can be captured in a CUDA graph."""

    def __init__(self, max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, splits: int = 64, block_t: int = 32, num_warps: int = 2,
                 num_stages: int = 2, merge_in_split: bool = False) -> None:
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
        # merge_in_split: no merge kernel; the last stretch of each (sequence, kv head) to finish
        # merges, found by counting finished stretches here (each merge puts its count back to 0)
        self.merge_in_split = merge_in_split
        self.counts = torch.zeros(max_batch * num_kv_heads, dtype=torch.int32, device=device)

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
                 kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """q [B, Hq, D]; cache [pages, 2, Hkv, page_size, D] (one layer); page_table [B, ≥ pages
        of the longest] int32; kv_lens [B] int32 (every length ≥ 1) → out [B, Hq, D]."""
        if q.shape[1:] != (self.num_heads, self.head_dim):
            raise ValueError(f"q must be [≤ max_batch, {self.num_heads}, {self.head_dim}], got {tuple(q.shape)}")
        q = q.contiguous()
        return self._launch(q, torch.empty_like(q), cache, page_table, kv_lens, scale)

    def with_prologue(self, qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor | None,
                      k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                      cache: torch.Tensor, slot_mapping: torch.Tensor, page_table: torch.Tensor,
                      kv_lens: torch.Tensor, scale: float) -> torch.Tensor:
        """One decode token a sequence straight from the QKV projection: what
        ``qk_norm_rope_write_kv`` then ``__call__`` compute (the new k and v written at
        ``slot_mapping``, each sequence's last key), one launch fewer. qkv [B, (Hq + 2·Hkv)·D]
        → out [B, Hq, D]. Without weights (``q_weight is None``) the norm is skipped."""
        d = self.head_dim
        if qkv.dim() != 2 or qkv.shape[1] != (self.num_heads + 2 * self.num_kv_heads) * d:
            raise ValueError(f"qkv must be [≤ max_batch, {(self.num_heads + 2 * self.num_kv_heads) * d}], "
                             f"got {tuple(qkv.shape)}")
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        out = torch.empty(qkv.shape[0], self.num_heads, d, dtype=qkv.dtype, device=qkv.device)
        norm = q_weight is not None
        return self._launch(qkv, out, cache, page_table, kv_lens, scale, prologue=(
            qkv.stride(0), positions, q_weight if norm else qkv, k_weight if norm else qkv, cos, sin,
            cos.stride(0), slot_mapping, eps, norm))

    def _launch(self, q: torch.Tensor, out: torch.Tensor, cache: torch.Tensor, page_table: torch.Tensor,
                kv_lens: torch.Tensor, scale: float, prologue: tuple | None = None) -> torch.Tensor:
        bsz = q.shape[0]
        if bsz * self.num_heads * self.splits > self.part_lse.numel():
            raise ValueError(f"a batch of {bsz} is more than this kernel's buffers hold")
        group = self.num_heads // self.num_kv_heads
        pdl = pdl_args(q.device)
        # without the prologue its arguments are unused: any tensor, any number
        *extra, norm = prologue or (0, kv_lens, q, q, q, q, 0, kv_lens, 0.0, False)
        _split_kernel[(bsz, self.num_kv_heads, self.splits)](
            q, cache, page_table, kv_lens, self.part_o, self.part_lse, scale,
            cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), page_table.stride(0), cache.shape[3],
            self.counts, out, *extra, NUM_HEADS=self.num_heads, GROUP=group,
            ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=self.head_dim, SPLITS=self.splits,
            BLOCK_T=self.block_t, MERGE=self.merge_in_split, PROLOGUE=prologue is not None, APPLY_NORM=norm,
            num_warps=self.num_warps, num_stages=self.num_stages,
            # the prologue's RoPE rounds each product before the sum, as torch does
            enable_fp_fusion=prologue is None, **pdl)
        if self.merge_in_split:
            return out
        _merge_kernel[(bsz, self.num_heads)](
            self.part_o, self.part_lse, kv_lens, out, NUM_HEADS=self.num_heads, HEAD_DIM=self.head_dim,
            SPLITS=self.splits, BLOCK_T=self.block_t, num_warps=2, **pdl)
        return out
