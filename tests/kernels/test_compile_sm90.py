"""Kernels compiled for an H100 (sm_90) on this machine, through Triton's whole pipeline to a
cubin: the interpreter the other kernel tests run under skips the compiler's type checks (a name
reused for a scalar and a tile compiles nowhere but the interpreter), so every kernel, in each
form the engine launches, is compiled here, in a process of its own without the interpreter:
a GPU-only compile error shows on the CPU machine before any GPU run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

# what both scripts below compile with: a kernel for sm_90 through Triton's whole pipeline
_COMPILER = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TYPES = {"table_ptr": "*i32", "lens_ptr": "*i32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
         "cos_ptr": "*fp32", "sin_ptr": "*fp32", "scale": "fp32", "eps": "fp32", "slot_ptr": "*i64",
         "pos_ptr": "*i64"}

def compile_(fn, consts, num_warps=2, num_stages=2, types=None, divisible=False, **options):
    # every other pointer bf16, every other scalar int32; divisible: pointers, strides and sizes
    # divisible by 16, as the engine's launches specialise them
    types = {**TYPES, **(types or {})}
    sig = {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr"
             and not n.startswith("eps") and n not in ("M", "page_size")} if divisible else None
    k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    assert k.asm["cubin"]
    return k
'''

_COMPILE = _COMPILER + r'''
from braid_engine.kernels.decode_attention import _merge_kernel, _split_kernel

# Qwen3-0.6B: 16 query heads over 8 kv heads of 128, at the engine's settings (kernels.SPLIT_KV_CONFIG)
# and at the earlier ones run_gpu.sh splitcfg times them against
from braid_engine import kernels

for splits, block_t, warps, stages in dict.fromkeys([kernels.SPLIT_KV_CONFIG, (64, 32, 2, 2)]):
    for ahead in (True, False):
        compile_(_split_kernel, dict(NUM_HEADS=16, GROUP=2, ROWS=16, HEAD_DIM=128, SPLITS=splits, BLOCK_T=block_t,
                                     READ_AHEAD=ahead, USE_PDL=True), num_warps=warps, num_stages=stages)
    compile_(_merge_kernel, dict(NUM_HEADS=16, HEAD_DIM=128, SPLITS=splits, BLOCK_T=block_t, USE_PDL=True))
print("split and merge kernels ok", flush=True)

# the other kernels at Qwen3-0.6B's widths, in each form the engine launches
from braid_engine.kernels.activation import _silu_and_mul_kernel
from braid_engine.kernels.gemv import _row_matmul_kernel
from braid_engine.kernels.qk_norm_rope import _qk_norm_rope_kernel
from braid_engine.kernels.rmsnorm import _rms_norm_kernel

for residual in (False, True):
    for pdl in (False, True):  # kernels.PDL_RMS_NORM
        compile_(_rms_norm_kernel, dict(HAS_RESIDUAL=residual, BLOCK=1024, USE_PDL=pdl), num_warps=4)
compile_(_silu_and_mul_kernel, dict(BLOCK=1024), num_warps=4)
for rows in (1, 2, 4, 8):  # batch 1, the engine's small batches, the most a launch takes
    for prologue, residual in ((0, False), (1, False), (1, True), (2, False)):
        for bias in (False, True) if rows <= 2 else (False,):  # biased projections (Qwen2-style qkv)
            compile_(_row_matmul_kernel, dict(PROLOGUE=prologue, HAS_RESIDUAL=residual, HAS_BIAS=bias, BLOCK_N=8,
                                              BLOCK_K=1024, USE_PDL=True, ROWS=rows, SILU_OUT=False, GATHER=False),
                     num_warps=4)
for rows in (1, 2):  # the gate_up matmul writing SiLU·mul (kernels.ROW_SILU_OUT)
    compile_(_row_matmul_kernel, dict(PROLOGUE=1, HAS_RESIDUAL=True, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024,
                                      USE_PDL=True, ROWS=rows, SILU_OUT=True, GATHER=False), num_warps=4)
    # the first layer's qkv gathering its input rows from the embedding (kernels.FOLD_EMBEDDING)
    compile_(_row_matmul_kernel, dict(PROLOGUE=1, HAS_RESIDUAL=False, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024,
                                      USE_PDL=True, ROWS=rows, SILU_OUT=False, GATHER=True), num_warps=4,
             types={"ids_ptr": "*i64"})
for heads, norm, in_place, ahead in ((8, True, False, True), (32, True, False, True), (32, False, False, True),
                                    (32, True, True, True), (8, True, False, False)):
    compile_(_qk_norm_rope_kernel, dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, HEADS=heads, APPLY_NORM=norm,
                                        K_IN_PLACE=in_place, READ_AHEAD=ahead, USE_PDL=True),
             num_warps=4, enable_fp_fusion=False)
from braid_engine.kernels.argmax import CHUNK, _chunk_kernel, _rows_kernel

# the greedy-token kernels (kernels.FUSED_GREEDY) over a 151,936-token vocabulary: 38 chunks, 64 wide
argmax_types = {"part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "out_ptr": "*i64"}
# greedy, and a sampled step's race (scaled logits, or the temperature divided in), over model-dtype
# or float32 logits
# (and the race applying top-p's keep rule from kernels/topp.py, kernels.FUSED_TOP_P)
for race, temperature, x, cut in [(False, False, "*bf16", False), (True, False, "*fp32", False),
                                  (True, True, "*bf16", False), (True, True, "*fp32", False),
                                  (True, True, "*bf16", True), (True, False, "*fp32", True)]:
    compile_(_chunk_kernel, dict(CHUNKS=64, CHUNK=CHUNK, RACE=race, TEMPERATURE=temperature, CUT=cut, USE_PDL=True),
             num_warps=8, types={**argmax_types, "x_ptr": x, "e_ptr": "*fp32", "t_ptr": "*fp32",
                                 "cut_val_ptr": "*fp32", "cut_idx_ptr": "*i32"})
compile_(_rows_kernel, dict(CHUNKS=64, USE_PDL=True), num_warps=1, types=argmax_types)

# the sampler's k-th largest (kernels/topk.py) at Qwen3's vocabulary (38 chunks of 4,096), k up to MAX_K
from braid_engine.kernels.topk import CHUNK as TOPK_CHUNK
from braid_engine.kernels.topk import MAX_K, _chunk_top_kernel, _kth_kernel

topk_types = {"x_ptr": "*fp32", "part_ptr": "*fp32", "k_ptr": "*i32", "out_ptr": "*fp32"}
for keep in (1, MAX_K):
    compile_(_chunk_top_kernel, dict(CHUNKS=64, CHUNK=TOPK_CHUNK, KEEP=keep), num_warps=8, types=topk_types)
    compile_(_kth_kernel, dict(CHUNKS=64, KEEP=keep), num_warps=8, types=topk_types)

# top-p after top-k's keep rule (kernels/topp.py): int64 keys, masses in double, over model-dtype logits
# (the temperature divided in) or the filters' float32 output, k from 1 to MAX_K
from braid_engine.kernels.topp import CHUNK as TOPP_CHUNK
from braid_engine.kernels.topp import MAX_K as TOPP_MAX_K
from braid_engine.kernels.topp import _chunk_kernel as _topp_chunk_kernel
from braid_engine.kernels.topp import _cut_kernel

topp_types = {"t_ptr": "*fp32", "k_ptr": "*i32", "part_ptr": "*i64", "drop_ptr": "*fp32", "cut_val_ptr": "*fp32",
              "cut_idx_ptr": "*i32"}
for keep, temperature, x in [(1, True, "*bf16"), (32, True, "*bf16"), (32, False, "*fp32"), (TOPP_MAX_K, True, "*bf16")]:
    for fn in (_topp_chunk_kernel, _cut_kernel):
        compile_(fn, dict(CHUNKS=64, CHUNK=TOPP_CHUNK, KEEP=keep, TEMPERATURE=temperature), num_warps=8,
                 types={**topp_types, "x_ptr": x})
print("other kernels ok")
'''


def _compiled(code: str) -> str:
    """What ``code`` prints, run in a process of its own without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_the_kernels_compile_for_sm90():
    assert _compiled(_COMPILE).count(" ok") == 2


def test_register_counts_come_from_ptxas():
    """benchmarks/kernel_registers.py reads registers a thread from ptxas for a kernel compiled
    for sm_90a: a count in the range a thread may use, and more for a larger tile."""
    small, large = map(int, _compiled("from benchmarks.kernel_registers import compile_row_matmul, registers\n"
                                      "small = registers(compile_row_matmul(1024, 2048, 0, False, 2, 2048, 4))\n"
                                      "large = registers(compile_row_matmul(1024, 2048, 0, False, 4, 2048, 4))\n"
                                      "print(small[0], large[0])").split())
    assert 16 <= small < large <= 255, (small, large)


_LOAD_ORDER = _COMPILER + r'''
import re
from braid_engine.kernels.decode_attention import _merge_kernel
from braid_engine.kernels.gemv import _row_matmul_kernel
from braid_engine.kernels.qk_norm_rope import _qk_norm_rope_kernel

def ptx(fn, consts, **options):  # as the engine launches them: Triton's default stages
    return compile_(fn, consts, num_warps=4, num_stages=3, divisible=True, **options).asm["ptx"]

def after_wait(text, first_compute):
    """(global loads after the wait, of them after the first of the instructions named)"""
    lines = text[text.index("griddepcontrol.wait"):].splitlines()
    start = next(i for i, l in enumerate(lines) if re.search(first_compute, l))
    loads = [i for i, l in enumerate(lines) if "ld.global" in l]
    return len(loads), sum(i > start for i in loads)

def before_wait(text):
    return text[text.index("griddepcontrol.launch_dependents"):text.index("griddepcontrol.wait")].count("ld.global")

# the row kernels' norm weight is read before the wait, beside the weight tile: one load a thread more
# there than the plain form's (after the wait the K loop's loads follow the norm, in a loop that a
# one-tile row never runs, so the text after the wait says nothing)
for rows in (1, 2):
    for silu_out in (False, True):
        forms = [ptx(_row_matmul_kernel, dict(PROLOGUE=prologue, HAS_RESIDUAL=prologue == 1, HAS_BIAS=False, BLOCK_N=8,
                                              BLOCK_K=1024, USE_PDL=True, ROWS=rows, SILU_OUT=silu_out and prologue == 1,
                                              GATHER=False))
                 for prologue in (0, 1)]
        print("row", rows, silu_out, *map(before_wait, forms))
print("qk", *after_wait(ptx(_qk_norm_rope_kernel, dict(NUM_HEADS=16, NUM_KV_HEADS=8, HEAD_DIM=128, HEADS=8,
                                                       APPLY_NORM=True, K_IN_PLACE=False, READ_AHEAD=True,
                                                       USE_PDL=True), enable_fp_fusion=False), r"rsqrt"))
print("merge", *after_wait(ptx(_merge_kernel, dict(NUM_HEADS=16, HEAD_DIM=128, SPLITS=64, BLOCK_T=64, USE_PDL=True)),
                           r"ex2"))
'''


def test_what_a_kernel_reads_after_its_wait_is_read_before_it_computes():
    """At batch 1 each decode kernel waits for the one before, and what it does after the wait is
    on the step's critical path: every load there is issued before the first computation, so the
    data arrives in one trip to memory, not two (the norm weight of the row kernels is read before
    the wait: nothing writes it). Checked in the PTX for sm_90 at Qwen3-0.6B's shapes."""
    out = _compiled(_LOAD_ORDER)
    found = {tuple(line.split()[:-2]): tuple(map(int, line.split()[-2:])) for line in out.splitlines()}
    assert len(found) == 6, out
    for kernel, (a, b) in found.items():
        if kernel[0] == "row":  # loads before the wait: the plain form's, then the norm form's
            assert b == a + 1, (kernel, a, b)
        else:  # loads after the wait, and of them after the first computation on what they read
            assert a >= 2 and b == 0, (kernel, a, b)
