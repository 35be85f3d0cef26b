"""Weights pulled into L2 ahead of the matmuls that read them, while a batch-1 decode step waits
on kernels that barely use the memory system.

At one token a step the matmuls stream weights at near the copy bandwidth, but between the qkv
projection and o_proj a layer runs three short kernels (the q/k-norm+RoPE prologue, split-KV
attention, its merge) whose time is latency: several µs a layer in which the memory system sits
idle. :func:`l2_prefetch` fills that time: launched right after the qkv matmul, it asks L2 for
the weights of the layer's later matmuls (``cp.async.bulk.prefetch.L2``: one instruction a chunk,
no data back to the SM, the program free at once), so those matmuls read them from L2.

Under programmatic dependent launch the kernel lets the next one start at once and waits for
the one before it only at its end, so the chain of waits the forward relies on stays whole.
Hopper and later only (the bulk prefetch is sm_90): elsewhere the layer does not launch it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from braid_engine.kernels import pdl_args

# bytes one lane asks L2 for at once; a warp's 32 lanes take 32 chunks
CHUNK = 16384
MAX_TENSORS = 4


@triton.jit
def _chunk(c, start, a, n, CHUNK: tl.constexpr):
    """Chunk ``c`` of the concatenation, where it falls in the tensor at address ``a`` of ``n``
    bytes whose chunks begin at ``start``: (its address, its bytes), or bytes 0 elsewhere."""
    local = c - start
    inside = (local >= 0) & (local * CHUNK < n)
    return tl.where(inside, a + local.to(tl.int64) * CHUNK, 0), tl.where(inside, tl.minimum(n - local * CHUNK, CHUNK), 0)


@triton.jit
def _l2_prefetch_kernel(a0, n0, a1, n1, a2, n2, a3, n3, out_ptr, CHUNK: tl.constexpr, LINES: tl.constexpr,
                        EVICT_LAST: tl.constexpr, DRY_RUN: tl.constexpr, USE_PDL: tl.constexpr):
    # program p, lane l: chunk 32·p + l of the tensors laid end to end, each cut in CHUNK bytes
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    c = tl.program_id(0) * 32 + tl.arange(0, 32)
    s1 = tl.cdiv(n0, CHUNK)
    s2 = s1 + tl.cdiv(n1, CHUNK)
    s3 = s2 + tl.cdiv(n2, CHUNK)
    addr, size = _chunk(c, 0, a0, n0, CHUNK)
    addr1, size1 = _chunk(c, s1, a1, n1, CHUNK)
    addr2, size2 = _chunk(c, s2, a2, n2, CHUNK)
    addr3, size3 = _chunk(c, s3, a3, n3, CHUNK)
    addr += addr1 + addr2 + addr3  # each lane's chunk lies in one tensor: the others give 0
    size += size1 + size2 + size3
    if DRY_RUN:  # the chunks written out instead of asked for (tests, the interpreter)
        tl.store(out_ptr + 2 * c, addr)
        tl.store(out_ptr + 2 * c + 1, size.to(tl.int64))
    elif LINES:  # a line prefetch (128 bytes) at a time through the chunk
        for i in tl.static_range(0, CHUNK, 128):
            if EVICT_LAST:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [addr + i, size - i], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                    "=r,l,r", [addr + i, size - i], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [addr, size], dtype=tl.int32, is_pure=False, pack=1)
    if USE_PDL:
        # the kernel after this one waits for this one alone: it must not end before the one before it
        tl.extra.cuda.gdc_wait()


def _launch(tensors: tuple[torch.Tensor, ...], dry_run: bool, chunk: int = CHUNK, lines: bool = False,
            evict_last: bool = False, chained: bool = True) -> torch.Tensor | None:
    if not 1 <= len(tensors) <= MAX_TENSORS:
        raise ValueError(f"l2_prefetch takes 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
    args, chunks = [], 0
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError("l2_prefetch takes contiguous tensors aligned to 16 bytes")
        nbytes = t.numel() * t.element_size()
        args += [t.data_ptr(), nbytes - nbytes % 16]  # the bulk prefetch takes whole 16-byte units
        chunks += triton.cdiv(nbytes, chunk)
    args += [0, 0] * (MAX_TENSORS - len(tensors))
    grid = triton.cdiv(chunks, 32)
    device = tensors[0].device
    out = torch.zeros(grid * 64, dtype=torch.int64, device=device) if dry_run else tensors[0]
    pdl = pdl_args(device) if chained and not dry_run else {"USE_PDL": False}
    _l2_prefetch_kernel[(grid,)](*args, out, CHUNK=chunk, LINES=lines, EVICT_LAST=evict_last, DRY_RUN=dry_run,
                                 num_warps=1, **pdl)
    return out.view(-1, 2) if dry_run else None


def l2_prefetch(*tensors: torch.Tensor, chunk: int = CHUNK, lines: bool = False, evict_last: bool = False,
                chained: bool = True) -> None:
    """Ask L2 for these tensors' bytes (up to :data:`MAX_TENSORS`), without waiting for them.
    A hint: nothing is read into registers, nothing written; sm_90 and later. ``chunk``: bytes a
    lane asks for; ``lines``: a line prefetch at a time (``evict_last``: kept ahead of other
    lines) instead of one bulk prefetch a chunk; ``chained``: launched as a programmatic dependent
    that the next kernel may wait on (off: for a stream of its own)."""
    _launch(tensors, False, chunk, lines, evict_last, chained)


def prefetch_chunks(*tensors: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """The (address, bytes) pairs :func:`l2_prefetch` would ask for, one row a lane (bytes 0 where
    a lane has none): what the tests check the chunking with, on any device Triton runs on."""
    return _launch(tensors, True, chunk)
