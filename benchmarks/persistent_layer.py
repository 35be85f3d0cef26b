"""Whether one persistent kernel that reads ahead of its waits streams a batch-1 decode step's
matmuls faster than the engine's chain of row kernels (GPU only).

The engine's batch-1 layer is a chain of kernels, each a programmatic dependent of the one
before: a kernel reads its first weight tile before it waits, and no more, so at every boundary
the memory system idles for about a microsecond (docs/benchmarks.md, session 15's ``--hops``).
Here one kernel takes all 28 layers' four matmuls (qkv, o_proj, gate_up, down_proj at
Qwen3-0.6B's shapes, each fed the one before's output), one program an SM. Every program walks a
list of weight tiles (a block of rows by 1,024 columns), always holding the next ``ahead`` tiles'
loads in flight; before a tile's products it waits, on a counter in global memory, until every
program has written the matmul its input comes from. The weights of the next matmul are then
already on their way while a program waits.

    python -m benchmarks.persistent_layer [--rows 8 16 32] [--ahead 0 2 4] [--per-sm 1] [--warps 8]

Rows printed, µs a layer (28 layers in one CUDA graph, distinct weights, 0.88 GB: read from
memory as a decode step reads them):
- the engine's four row kernels a layer (``gemv.row_matmul``, programmatic launches, no norms);
- the persistent kernel, tile rows x ahead (0: each tile loaded after its wait);
- the same kernel without its waits: what it streams when nothing depends on anything (its
  outputs are then wrong; the bound).
Every ordered run's output is checked against torch's chain (bf16 outputs, float32 sums).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.common import graph_time
from braid_engine.kernels import gemv

HIDDEN, INTER, QKV, Q = 1024, 3072, 4096, 2048
BK = 1024  # a tile's columns: every K of the layer is a multiple
# a work item: weight offset, weight row stride, input offset, output offset, matmul index, flags
FIELDS = 6
FIRST, LAST, ARRIVE = 1, 2, 4


@triton.jit
def _meta(items_ptr, i):
    """Where item i's weight tile starts, and its row stride."""
    return tl.load(items_ptr + i * 6), tl.load(items_ptr + i * 6 + 1)


@triton.jit
def _tile(w_ptr, off, k, rn, rk):
    return tl.load(w_ptr + off + rn[:, None] * k + rk[None, :], eviction_policy="evict_first")


@triton.jit
def _item(w, w_ptr, act_ptr, items_ptr, cnt_ptr, expect_ptr, i, acc, ready, rn, rk,
          WAIT: tl.constexpr, AHEAD: tl.constexpr):
    x_off = tl.load(items_ptr + i * 6 + 2)
    y_off = tl.load(items_ptr + i * 6 + 3)
    p = tl.load(items_ptr + i * 6 + 4).to(tl.int32)
    flags = tl.load(items_ptr + i * 6 + 5).to(tl.int32)
    if WAIT:
        if p > ready:  # the input of matmul p is matmul p - 1's output: wait for all of it
            want = tl.load(expect_ptr + p - 1)
            seen = tl.atomic_add(cnt_ptr + p - 1, 0, sem="acquire", scope="gpu")
            while seen < want:
                seen = tl.atomic_add(cnt_ptr + p - 1, 0, sem="acquire", scope="gpu")
            ready = p
    if AHEAD == 0:
        off, k = _meta(items_ptr, i)
        w = _tile(w_ptr, off, k, rn, rk)
    if p >= 0:
        # the items of one matmul share their input chunks: after the first, L1 has them
        x = tl.load(act_ptr + x_off + rk).to(tl.float32)
        part = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        acc = tl.where((flags & 1) != 0, part, acc + part)
        if (flags & 2) != 0:
            tl.store(act_ptr + y_off + rn, acc.to(tl.bfloat16))
        if (flags & 4) != 0:
            tl.debug_barrier()  # every warp's stores are issued before the count says so
            tl.atomic_add(cnt_ptr + p, 1, sem="release", scope="gpu")
    return acc, ready


@triton.jit
def _persistent_kernel(w_ptr, act_ptr, items_ptr, count_ptr, cnt_ptr, expect_ptr, stride,
                       BN: tl.constexpr, BK: tl.constexpr, WAIT: tl.constexpr, AHEAD: tl.constexpr):
    """AHEAD (0, 2 or 4): tiles in flight. Slot s holds item i + s's tile while round i runs; once
    that item is done it takes item i + s + AHEAD's, whose place was read a round before."""
    pid = tl.program_id(0)
    items_ptr += pid * stride * 6
    n = tl.load(count_ptr + pid)  # a multiple of 4: lists are padded with no-op items
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BN], dtype=tl.float32)
    ready = 0
    D: tl.constexpr = AHEAD if AHEAD > 0 else 1
    w0 = tl.zeros([BN, BK], dtype=tl.bfloat16)
    w1 = w0
    w2 = w0
    w3 = w0
    o0, k0 = _meta(items_ptr, 0)
    o1, k1 = _meta(items_ptr, 1)
    o2, k2 = _meta(items_ptr, 2)
    o3, k3 = _meta(items_ptr, 3)
    if AHEAD > 0:
        w0 = _tile(w_ptr, o0, k0, rn, rk)
        w1 = _tile(w_ptr, o1, k1, rn, rk)
        o0, k0 = _meta(items_ptr, D)
        o1, k1 = _meta(items_ptr, D + 1)
    if AHEAD == 4:
        w2 = _tile(w_ptr, o2, k2, rn, rk)
        w3 = _tile(w_ptr, o3, k3, rn, rk)
        o2, k2 = _meta(items_ptr, 6)
        o3, k3 = _meta(items_ptr, 7)
    for i in range(0, n, D):
        acc, ready = _item(w0, w_ptr, act_ptr, items_ptr, cnt_ptr, expect_ptr, i, acc, ready, rn, rk, WAIT, AHEAD)
        if AHEAD > 0:
            w0 = _tile(w_ptr, o0, k0, rn, rk)
            o0, k0 = _meta(items_ptr, i + 2 * D)
            acc, ready = _item(w1, w_ptr, act_ptr, items_ptr, cnt_ptr, expect_ptr, i + 1, acc, ready, rn, rk, WAIT,
                               AHEAD)
            w1 = _tile(w_ptr, o1, k1, rn, rk)
            o1, k1 = _meta(items_ptr, i + 2 * D + 1)
        if AHEAD == 4:
            acc, ready = _item(w2, w_ptr, act_ptr, items_ptr, cnt_ptr, expect_ptr, i + 2, acc, ready, rn, rk, WAIT,
                               AHEAD)
            w2 = _tile(w_ptr, o2, k2, rn, rk)
            o2, k2 = _meta(items_ptr, i + 10)
            acc, ready = _item(w3, w_ptr, act_ptr, items_ptr, cnt_ptr, expect_ptr, i + 3, acc, ready, rn, rk, WAIT,
                               AHEAD)
            w3 = _tile(w_ptr, o3, k3, rn, rk)
            o3, k3 = _meta(items_ptr, i + 11)


class Plan:
    """28 layers' weights in one buffer, activations in another, and each program's work list."""

    def __init__(self, layers: int, bn: int, programs: int, device: str = "cuda"):
        shapes = [(QKV, HIDDEN), (HIDDEN, Q), (2 * INTER, HIDDEN), (HIDDEN, INTER)] * layers
        sizes = [n * k for n, k in shapes]
        self.w = torch.randn(sum(sizes), device=device, dtype=torch.bfloat16)
        w_off = [0]
        for s in sizes[:-1]:
            w_off.append(w_off[-1] + s)
        for (n, k), o in zip(shapes, w_off):
            self.w[o:o + n * k].mul_(k ** -0.5)
        # matmul p reads the first K of matmul p - 1's output (matmul -1's: the input row)
        out_sizes = [n for n, _ in shapes]
        a_off = [0, HIDDEN]
        for s in out_sizes[:-1]:
            a_off.append(a_off[-1] + s)
        self.act = torch.zeros(a_off[-1] + out_sizes[-1], device=device, dtype=torch.bfloat16)
        self.shapes, self.w_off, self.a_off = shapes, w_off, a_off
        lists: list[list[list[int]]] = [[] for _ in range(programs)]
        expect = []
        cursor = 0
        for p, (n, k) in enumerate(shapes):
            groups, chunks = n // bn, k // BK
            takers = set()
            for g in range(groups):
                prog = (cursor + g) % programs
                takers.add(prog)
                for c in range(chunks):
                    flags = (FIRST if c == 0 else 0) | (LAST if c == chunks - 1 else 0)
                    lists[prog].append([w_off[p] + g * bn * k + c * BK, k, a_off[p] + c * BK,
                                        a_off[p + 1] + g * bn, p, flags])
            cursor = (cursor + groups) % programs
            for prog in takers:
                lists[prog][-1][5] |= ARRIVE
            expect.append(len(takers))
        nop = [0, BK, 0, 0, -1, 0]
        longest = max(len(x) for x in lists)
        stride = -(-longest // 4) * 4 + 8  # a multiple of 4, and the places read ahead past the end
        table = [x + [nop] * (stride - len(x)) for x in lists]
        self.items = torch.tensor(table, dtype=torch.int64, device=device).reshape(programs, stride * FIELDS)
        self.count = torch.tensor([-(-len(x) // 4) * 4 for x in lists], dtype=torch.int32, device=device)
        self.expect = torch.tensor(expect, dtype=torch.int32, device=device)
        self.cnt = torch.zeros(len(shapes), dtype=torch.int32, device=device)
        self.stride, self.bn, self.programs = stride, bn, programs

    def weight(self, p: int) -> torch.Tensor:
        n, k = self.shapes[p]
        return self.w[self.w_off[p]:self.w_off[p] + n * k].view(n, k)

    def run(self, wait: bool = True, ahead: int = 2, warps: int = 8) -> None:
        self.cnt.zero_()
        _persistent_kernel[(self.programs,)](self.w, self.act, self.items, self.count, self.cnt, self.expect,
                                             self.stride, BN=self.bn, BK=BK, WAIT=wait, AHEAD=ahead,
                                             num_warps=warps)

    def reference(self) -> list[torch.Tensor]:
        """Every matmul's output, by torch: float32 sums of the bf16 input and weight, rounded to bf16."""
        x = self.act[:HIDDEN]
        outs = []
        for p, (_, k) in enumerate(self.shapes):
            y = F.linear(x[:k].float(), self.weight(p).float()).to(torch.bfloat16)
            outs.append(y)
            x = y
        return outs

    def outputs(self) -> list[torch.Tensor]:
        return [self.act[self.a_off[p + 1]:self.a_off[p + 1] + n] for p, (n, _) in enumerate(self.shapes)]


def row_chain(plan: Plan) -> torch.Tensor:
    x = plan.act[:HIDDEN].view(1, HIDDEN)
    for p, (_, k) in enumerate(plan.shapes):
        x = gemv.row_matmul(x[:, :k], plan.weight(p))  # one row: the slice is contiguous
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--ahead", type=int, nargs="+", default=[0, 2, 4], choices=[0, 2, 4])
    ap.add_argument("--per-sm", type=int, default=1, help="programs an SM (all must be resident at once)")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    programs = args.per_sm * props.multi_processor_count
    L = args.layers
    print(f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{props.multi_processor_count} SMs, {programs} programs, {args.warps} warps; µs a layer, {L} layers")
    plan = Plan(L, args.rows[0], programs)
    plan.act[:HIDDEN] = torch.randn(HIDDEN, device="cuda", dtype=torch.bfloat16)
    ref = plan.reference()
    layer_bytes = sum(n * k for n, k in plan.shapes[:4]) * 2
    row = graph_time(lambda: row_chain(plan), args.reps) / L
    got = row_chain(plan).float().flatten()
    err = ((got - ref[-1].float()).norm() / ref[-1].float().norm()).item()
    print(f"{'engine row kernels':>28} {row * 1e6:8.2f} µs  {layer_bytes / row / 1e12:5.2f} TB/s  rel err {err:.1e}")
    for bn in args.rows:
        if bn != plan.bn:
            seed_x = plan.act[:HIDDEN].clone()
            del plan
            plan = Plan(L, bn, programs)
            plan.act[:HIDDEN] = seed_x
            ref = plan.reference()
        for ahead in args.ahead:
            name = f"persistent {bn} rows, ahead {ahead}"
            try:
                plan.act[HIDDEN:] = float("nan")
                plan.run(ahead=ahead, warps=args.warps)
                torch.cuda.synchronize()
                errs = [((o.float() - r.float()).norm() / r.float().norm()).item()
                        for o, r in zip(plan.outputs(), ref)]
                t = graph_time(lambda plan=plan, a=ahead: plan.run(ahead=a, warps=args.warps), args.reps) / L
            except Exception as e:  # a tile that does not fit the registers, say
                print(f"{name:>28} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            worst = max(errs)
            print(f"{name:>28} {t * 1e6:8.2f} µs  {layer_bytes / t / 1e12:5.2f} TB/s  worst rel err {worst:.1e}"
                  f"{'  WRONG' if not worst < 5e-2 else ''}", flush=True)
        t = graph_time(lambda plan=plan: plan.run(wait=False, ahead=max(args.ahead), warps=args.warps), args.reps) / L
        print(f"{f'no waits (bound), {bn} rows':>28} {t * 1e6:8.2f} µs  {layer_bytes / t / 1e12:5.2f} TB/s")


if __name__ == "__main__":
    main()
