"""Registers a thread and programs an SM holds for the one-row matmul kernels, per Qwen3-0.6B
shape and block configuration, compiled for sm_90a through Triton and ptxas -v. Runs without a
GPU (the compiler is enough).

    python -m benchmarks.kernel_registers [--sms 132]

Under programmatic dependent launch a kernel's programs read their weight tile before waiting
for the kernel before, but only programs that are resident do: a kernel whose programs fill
the register file leaves no room for the next kernel's programs until its own exit. The table
gives, for each kernel of a layer, how many programs the register file holds per SM, the waves
its grid takes on the card, and what is left of the register file while all its programs that
fit are running.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
# (name, rows N, columns K, prologue, residual add) of a decoder layer's four one-row matmuls
SHAPES = (("qkv", 4096, 1024, 1, True), ("o_proj", 1024, 2048, 0, False), ("gate_up", 6144, 1024, 1, True),
          ("down", 1024, 3072, 2, False))
VARIANTS = ((1, None), (2, 4), (0.5, 4), (1, 2), (1, 8))  # (BLOCK_N scale, warps; None: the default's)


def _ptxas() -> list[str]:
    import triton.backends.nvidia as nvidia

    binaries = os.path.join(os.path.dirname(nvidia.__file__), "bin")
    return [os.path.join(binaries, name) for name in ("ptxas-blackwell", "ptxas")
            if os.path.exists(os.path.join(binaries, name))]


def registers(ptx: str) -> tuple[int, bool]:
    """Registers a thread and whether anything spills, from ptxas -v (the first of Triton's ptxas
    binaries that takes this PTX version)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        for ptxas in _ptxas():
            run = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
            used = re.search(r"Used (\d+) registers", run.stderr)
            if used:
                spill = re.search(r"(\d+) bytes spill stores", run.stderr)
                return int(used.group(1)), bool(spill and int(spill.group(1)))
    finally:
        os.unlink(f.name)
    raise RuntimeError("no ptxas of Triton's took the PTX")


def compile_row_matmul(n: int, k: int, prologue: int, residual: bool, block_n: int, block_k: int,
                       warps: int, rows: int = 1) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braid_engine.kernels.gemv import _row_matmul_kernel as fn

    consts = dict(PROLOGUE=prologue, HAS_RESIDUAL=residual, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k,
                  USE_PDL=True, ROWS=rows, SILU_OUT=False, GATHER=False)
    sig = {a: "constexpr" if a in consts else "fp32" if a == "eps" else "*bf16" if a.endswith("_ptr") else "i32"
           for a in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps))
    return kernel.asm["ptx"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sms", type=int, default=132, help="SMs on the card (H100 SXM and H200: 132)")
    args = ap.parse_args()
    from braid_engine.kernels.gemv import default_config

    print(f"one-row matmuls compiled for sm_90a; {args.sms} SMs, {REGISTERS_PER_SM} registers an SM")
    print(f"{'kernel':8} {'BLOCK_N':>7} {'warps':>5} {'regs':>5} {'spills':>6} {'programs':>8} {'per SM':>6} "
          f"{'waves':>5} {'regs left':>9}")
    for name, n, k, prologue, residual in SHAPES:
        default = default_config(n, k, prologue)
        seen = set()
        for scale, warps in VARIANTS:
            block_n = max(1, int(default["BLOCK_N"] * scale))
            warps = warps or default["num_warps"]
            if (block_n, warps) in seen:
                continue
            seen.add((block_n, warps))
            regs, spills = registers(compile_row_matmul(n, k, prologue, residual, block_n, default["BLOCK_K"], warps))
            threads = 32 * warps
            per_sm = min(THREADS_PER_SM // threads, REGISTERS_PER_SM // (regs * threads))
            programs = -(-n // block_n)
            running = min(per_sm, -(-programs // args.sms))  # an SM's share of the grid, at most what fits
            label = " (default)" if (block_n, warps) == (default["BLOCK_N"], default["num_warps"]) else ""
            print(f"{name:8} {block_n:>7} {warps:>5} {regs:>5} {'yes' if spills else 'no':>6} {programs:>8} "
                  f"{per_sm:>6} {programs / (per_sm * args.sms):>5.2f} {REGISTERS_PER_SM - running * regs * threads:>9}"
                  f"{label}")


if __name__ == "__main__":
    main()
