"""Qwen3's attention prologue in one pass: per-head q/k RMSNorm, rotate-half RoPE, and the write
of k and v into the paged KV cache. Returns q; k and v never leave the kernel, except that a fresh
prompt's step may ask for the normed, rotated k back in its own qkv rows (``k_in_place``), where
an attention over the step's own keys reads it beside v."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine import kernels
from braid_engine.kernels import pdl_args


@triton.jit
def _qk_norm_rope_kernel(qkv_ptr, qkv_stride, pos_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, table_stride,
                         q_out_ptr, cache_ptr, slot_ptr, s_page, s_kv, s_head, s_off, page_size, eps,
                         NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEADS: tl.constexpr, APPLY_NORM: tl.constexpr, K_IN_PLACE: tl.constexpr,
                         READ_AHEAD: tl.constexpr, USE_PDL: tl.constexpr):
    # program (t, j): token t's q and k heads j·HEADS … as the rows of one tile (the rotation's
    # halves apart), and the v heads beside those k heads
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        if not READ_AHEAD:
            tl.extra.cuda.gdc_wait()
    t = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, half)
    hh = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    is_q = hh < NUM_HEADS
    is_k = (hh >= NUM_HEADS) & (hh < NUM_HEADS + NUM_KV_HEADS)
    rows = (is_q | is_k)[:, None]
    dtype = q_out_ptr.dtype.element_ty
    # what no kernel of the forward writes (the step's positions and slots, copied in before its
    # first kernel; the rotation tables; the norm weights) is read before waiting for the kernel
    # before, so a programmatic dependent launch takes those loads off the chain of waits
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t)
    c = tl.load(cos_ptr + pos * table_stride + d).to(dtype).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * table_stride + d).to(dtype).to(tl.float32)[None, :]
    if APPLY_NORM:
        q_head = is_q[:, None]
        w1 = tl.where(q_head, tl.load(qw_ptr + d)[None, :], tl.load(kw_ptr + d)[None, :]).to(tl.float32)
        w2 = tl.where(q_head, tl.load(qw_ptr + half + d)[None, :], tl.load(kw_ptr + half + d)[None, :]).to(tl.float32)
    if USE_PDL and READ_AHEAD:
        tl.extra.cuda.gdc_wait()
    row = qkv_ptr + t * qkv_stride
    offs = hh[:, None] * HEAD_DIM + d[None, :]
    x1 = tl.load(row + offs, mask=rows, other=0.0)
    x2 = tl.load(row + offs + half, mask=rows, other=0.0)
    # v with them: read after the stores below, its load waited for the norms and the rotation
    kv_h = (hh - NUM_HEADS)[:, None]
    k_rows = is_k[:, None]
    full = tl.arange(0, HEAD_DIM)[None, :]
    v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kv_h) * HEAD_DIM + full, mask=k_rows, other=0.0)
    if APPLY_NORM:
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        r = tl.math.rsqrt((tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / HEAD_DIM + eps)[:, None]
        # normalise in float32, round to the model dtype, then multiply by the weight, as torch does
        x1 = (w1 * (f1 * r).to(dtype).to(tl.float32)).to(dtype)
        x2 = (w2 * (f2 * r).to(dtype).to(tl.float32)).to(dtype)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    # x*cos + rotate_half(x)*sin with each product and the sum rounded to the model dtype
    o1 = ((a1 * c).to(dtype).to(tl.float32) + (-a2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((a2 * c).to(dtype).to(tl.float32) + (a1 * s).to(dtype).to(tl.float32)).to(dtype)
    q_dst = q_out_ptr + t * NUM_HEADS * HEAD_DIM + offs
    tl.store(q_dst, o1, mask=is_q[:, None])
    tl.store(q_dst + half, o2, mask=is_q[:, None])
    page = cache_ptr + (slot // page_size) * s_page + (slot % page_size) * s_off
    k_dst = page + kv_h * s_head + d[None, :]
    ct = cache_ptr.dtype.element_ty
    tl.store(k_dst, o1.to(ct), mask=k_rows)
    tl.store(k_dst + half, o2.to(ct), mask=k_rows)
    if K_IN_PLACE:  # only this program reads these k heads, and it has read them
        tl.store(row + offs, o1, mask=k_rows)
        tl.store(row + offs + half, o2, mask=k_rows)
    tl.store(page + s_kv + kv_h * s_head + full, v.to(ct), mask=k_rows)


def qk_norm_rope_write_kv(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor | None,
                          k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                          cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int,
                          num_kv_heads: int, k_in_place: bool = False) -> torch.Tensor:
    """qkv [tokens, (Hq + 2·Hkv)·D] → q [tokens, Hq, D] normed and rotated; k (normed, rotated)
    and v written into ``cache`` ([pages, 2, Hkv, page_size, D]) at ``slot_mapping``. With
    ``k_in_place`` the rotated k also replaces qkv's k columns (qkv must then be row-major).

    Without weights (``q_weight is None``) the norm is skipped: plain rotate-half RoPE.
    """
    t = qkv.shape[0]
    d = cache.shape[-1]
    if qkv.stride(-1) != 1:
        if k_in_place:
            raise ValueError("k_in_place needs qkv with unit stride along its last axis")
        qkv = qkv.contiguous()
    q = torch.empty((t, num_heads, d), dtype=qkv.dtype, device=qkv.device)
    apply_norm = q_weight is not None
    qw = q_weight if apply_norm else qkv
    kw = k_weight if apply_norm else qkv
    # long prompts: one program a token; a few tokens: a few heads a program, so that the step's
    # handful of tokens still spreads over several SMs
    heads = triton.next_power_of_2(num_heads + num_kv_heads)
    if t < 64:
        heads = min(heads, 8)
    _qk_norm_rope_kernel[(t, triton.cdiv(num_heads + num_kv_heads, heads))](
        qkv, qkv.stride(0), positions, qw, kw, cos, sin, cos.stride(0), q, cache, slot_mapping,
        cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3), cache.shape[3], eps,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=d, HEADS=heads, APPLY_NORM=apply_norm,
        K_IN_PLACE=k_in_place, READ_AHEAD=kernels.READ_AHEAD,
        # no FMA contraction: torch rounds each RoPE product before the sum
        num_warps=max(1, min(8, heads * d // 512)), enable_fp_fusion=False, **pdl_args(qkv.device))
    return q


def qk_norm_rope_write_kv_ref(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor | None,
                              k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor,
                              sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                              num_heads: int, num_kv_heads: int) -> torch.Tensor:
    from braid_engine.attention.base import write_kv_cache
    from braid_engine.kernels.rmsnorm import rms_norm_ref

    t, d = qkv.shape[0], cache.shape[-1]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k, v = q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d), v.reshape(t, num_kv_heads, d)
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    c = cos[positions].to(q.dtype)[:, None, :]
    s = sin[positions].to(q.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    q, k = rotate(q), rotate(k)
    write_kv_cache(cache, k, v, slot_mapping)
    return q
