"""Kernels compiled for an H100 (sm_90) on this machine, through Triton's whole pipeline to a
cubin: the interpreter the other kernel tests run under skips the compiler's type checks (a name
reused for a scalar and a tile compiles nowhere but the interpreter), so a kernel or variant
not yet run on the GPU is compiled here, in a process of its own without the interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

_COMPILE = r'''
import itertools, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from braid_engine.kernels.decode_attention import _merge_kernel, _split_kernel

TYPES = {"table_ptr": "*i32", "lens_ptr": "*i32", "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
         "count_ptr": "*i32", "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_ptr": "*i64",
         "scale": "fp32", "eps": "fp32"}

def compile_(fn, consts, **options):
    # every other pointer bf16, every other scalar int32
    sig = {n: "constexpr" if n in consts else TYPES.get(n, "*bf16" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=2, num_stages=2, **options))
    assert k.asm["cubin"]

# Qwen3-0.6B: 16 query heads over 8 kv heads of 128, the engine's 64 stretches of 32 keys
for merge, prologue in itertools.product((False, True), repeat=2):
    compile_(_split_kernel, dict(NUM_HEADS=16, GROUP=2, ROWS=16, HEAD_DIM=128, SPLITS=64, BLOCK_T=32, MERGE=merge,
                                 PROLOGUE=prologue, APPLY_NORM=True, USE_PDL=True), enable_fp_fusion=not prologue)
    print("split kernel, merge", merge, "prologue", prologue, "ok", flush=True)
compile_(_merge_kernel, dict(NUM_HEADS=16, HEAD_DIM=128, SPLITS=64, BLOCK_T=32, USE_PDL=True))
print("merge kernel ok")
'''


def test_the_decode_attention_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(" ok") == 5, run.stdout
