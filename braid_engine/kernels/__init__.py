"""Fused Triton kernels for the GPU path, each beside its torch reference.

The kernels follow PyTorch's order of operations and roundings exactly (normalise in float32,
round to the model dtype, then multiply by the weight), so they differ from the torch path only
by float32 reduction order.
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def fused_kernels_available(device: torch.device) -> bool:
    """True where the Triton kernels can run compiled: a CUDA device with triton installed."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


# Programmatic dependent launch (Hopper and later): a kernel launched so may start while the one
# before it finishes, and waits for it (griddepcontrol.wait) before reading its output. The
# one-row matmuls and the attention prologue use it wherever the card has it; the row_kernels
# benchmark switches it off to measure what it gives.
PDL = True


@functools.cache
def _has_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    return PDL and device.type == "cuda" and _has_pdl(device.index if device.index is not None
                                                       else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """A kernel's ``USE_PDL`` switch and, where it is on, the launch option that goes with it."""
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(device) else {"USE_PDL": False}


# Under programmatic dependent launch, the q/k-norm+RoPE and split-KV attention kernels read what
# no kernel of the forward writes (positions, slots, rotation rows, norm weights; the keys before
# the step's own token) before they wait for the kernel before. Off: they wait first, as before
# session 9 (decode.py --compare-read-ahead measures the difference).
READ_AHEAD = True

# The split-KV decode attention's settings (decode_attention.py), read when a DecodeAttention is
# made: (most splits, key tile, warps, pipeline stages). decode_attention.py --sweep times others;
# decode.py --compare-split-config S/T/W/P measures one in the engine against these.
SPLIT_KV_CONFIG = (64, 64, 4, 1)

# the most input rows a row-kernel launch takes (gemv.py): each weight tile is read once and
# multiplied by every row, one row after another
ROW_KERNEL_MAX_ROWS = 8

# steps of up to this many rows (a decode batch of 2, a one-token step) run the fused layers'
# matmuls through the row kernels (gemv.py: each weight tile read once for both rows, the norms
# and SiLU·mul inside); more rows take cuBLAS and the standalone kernels, as do steps past
# ROW_KERNEL_MAX_ROWS whatever this says. On an H200 the matmuls of 2 rows took 19.8 µs a layer
# against cuBLAS's 33.9, 4 rows 36.2 against 29.2 (docs/benchmarks.md). decode.py
# --compare-row-rows N measures another bound.
ROW_KERNEL_ROWS = 2

# in the row-kernel path, the gate_up matmul writes SiLU(gate)·up itself (each program takes gate
# rows and the up rows of the same columns) and down_proj runs as a plain row matmul, instead of
# down_proj computing SiLU·mul from gate_up's output in every program. The same values bit for bit
# (tests/kernels). decode.py --compare-silu-out measures the other setting. Models of hidden size
# past 4,096 keep the SiLU prologue (gemv.silu_out_fits).
ROW_SILU_OUT = True

# the decode graphs pick their greedy tokens with kernels/argmax.py (from the LM head's model-dtype
# logits, written straight into the ids the next replay reads) instead of torch's float copy,
# argmax and copy; the same tokens (torch.argmax's: the first maximum, a NaN first). Read when the
# graphs are captured, where the fused kernels run (LLM(fused_kernels=...) not 'off'). On an H200,
# decode.py --compare-fused-greedy: batch 1 1,565 -> 1,613 tokens/s, batch 8 6,150 -> 6,217, batch 32
# 17,993 -> 18,238, the same greedy tokens (docs/benchmarks.md).
FUSED_GREEDY = True

# steps the first layer takes through the row kernels (kernels.ROW_KERNEL_ROWS) gather their token
# embeddings inside its qkv kernel (gemv.norm_matmul(ids=...)) instead of an embedding kernel
# before it: one kernel boundary less a step. The same values (a gather copies). On an H200,
# decode.py --compare-fold-embedding: batch 1 1,594 -> 1,614 tokens/s, batch 2 2,684 -> 2,724, the
# same greedy tokens (docs/benchmarks.md).
FOLD_EMBEDDING = True

# the standalone RMSNorm kernel (the final norm of a decode step through the row kernels; every
# norm of larger steps) is launched as a programmatic dependent of the kernel before it, its weight
# read before the wait. The same values. On an H200, decode.py --compare-pdl-rms-norm: batch 1 1,604
# -> 1,619 tokens/s (every run ahead), batch 2 within its runs' spread (docs/benchmarks.md).
PDL_RMS_NORM = True

# a sampled step's tokens are drawn by the greedy-token kernels (kernels/argmax.py: the exponential
# race, the argmax of z - log E, and for rows with a temperature alone the division by it, in one
# pass over the logits) instead of torch's float copy, scaling, softmax, exponential, division and
# argmax. Read when an engine is made; where the fused kernels run. On an H200, benchmarks/sampling.py:
# a batch-1 draw at temperature 0.7 57 -> 13 µs of GPU time (73 -> 57 µs of the host's), batch 32
# 116 -> 35 (docs/benchmarks.md); decode.py --compare-fused-sampling measures it in the engine.
FUSED_SAMPLING = True

# the sampler's top-k takes each row's k-th largest value from kernels/topk.py (program (row, chunk)
# sorts its chunk and keeps the largest k, program (row) sorts those) instead of torch.topk, for a
# largest k up to topk.MAX_K: the same value; not where a row also cuts top-p (sampling._top_k_top_p
# takes torch.topk's values). Read when an engine is made, where the fused kernels run. Off until
# measured: on an H200 torch.topk took ~340 µs of the host's time a batch-1 step (benchmarks/sampling.py
# times both; decode.py --compare-fused-top-k measures it in the engine, run_gpu.sh sampling at top-k alone).
FUSED_TOP_K = False

# the sampler's rows with top-k (k up to topp.MAX_K) and top-p and no min-p (Qwen3's defaults: 0.6, 20,
# 0.95) take their keep rule from kernels/topp.py (program (row, chunk) keeps its chunk's largest KEEP,
# program (row) their largest KEEP and the cut among them, as sampling._top_k_top_p cuts it: the same
# tokens) and the race (kernels/argmax.py) applies it, instead of torch.topk, a sort of each row, its
# softmax, cumulative sum and scatter (sampling.SORT_FREE_TOP_P off, the GPU's way) or the sort-free cut's
# launches over the row. Read when an engine is made, where the fused kernels run. On an H200 at Qwen3's
# settings (benchmarks/sampling.py, "+ top-p kernels"): 51 µs of GPU a step at batch 1 against 210 with the
# row sorted, 178 against 863 at batch 32; the engine (decode.py --compare-fused-top-p, seeded, the same
# tokens): 1,466 tok/s against 1,165 at batch 1, 16,132 against 11,766 at batch 32 (docs/benchmarks.md).
FUSED_TOP_P = True
