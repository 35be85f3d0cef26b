"""Whether one persistent kernel can stream a batch-1 decode step's matmul weights faster than
four one-row matmul kernels a layer (GPU only for the timing).

    python -m benchmarks.persistent_layers [--layers 28] [--configs 8/32/2 4/16/1 ...]

The one-row matmuls (``braid_engine/kernels/gemv.py``) reach ~2.0 TB/s on an H100 for a layer's
four matmuls: each kernel boundary drains the memory pipe, and under PDL only programs that are
resident read ahead of their wait. Here one program per SM runs every layer: for each of the
four matmuls it reads its share of the weights, waits at a grid-wide barrier (a counter in global
memory) for the matmul before, reads that one's output, and writes its rows; as soon as its rows
are out it starts loading its share of the next matmul's weights — they depend on nothing — so
those loads are in flight while it waits. Norms, residual adds and SiLU·mul are computed where
the engine's row kernels compute them; attention is left out (o_proj reads the q columns of
qkv's output in its place), as in ``row_kernels.py``, which this prints beside it.

The kernel needs every program resident at once (one an SM): a grid larger than the card holds
would never pass its first barrier.
"""

from __future__ import annotations

import argparse
import functools

import torch
import triton
import triton.language as tl

HIDDEN, INTER, QKV, Q = 1024, 3072, 4096, 2048
EPS = 1e-6


@triton.jit
def _wait(cnt_ptr, phase, programs, SPIN_LOAD: tl.constexpr):
    # every program has written its rows of this phase once the count reaches the grid; on the
    # GPU the count is polled with acquire loads (a read-modify-write from every SM would queue at
    # the counter's L2 slice), in the interpreter with an atomic
    if phase >= 0:
        if SPIN_LOAD:
            seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [cnt_ptr + phase],
                                             dtype=tl.int32, is_pure=False, pack=1)
            while seen < programs:
                seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [cnt_ptr + phase],
                                                 dtype=tl.int32, is_pure=False, pack=1)
        else:
            seen = tl.atomic_add(cnt_ptr + phase, 0, sem="acquire", scope="gpu")
            while seen < programs:
                seen = tl.atomic_add(cnt_ptr + phase, 0, sem="acquire", scope="gpu")


@triton.jit
def _signal(cnt_ptr, phase):
    tl.debug_barrier()  # the whole program's stores before the count
    tl.atomic_add(cnt_ptr + phase, 1, sem="release", scope="gpu")


@triton.jit
def _chunk(w_ptr, chunk, N, K: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr):
    """Rows chunk·CH … chunk·CH + CH - 1 of an [N, K] weight (none past N) and their indices."""
    rows = chunk * CH + tl.arange(0, CH)
    k = tl.arange(0, KP)
    w = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=(rows[:, None] < N) & (k[None, :] < K), other=0.0)
    return w, rows


@triton.jit
def _normed(x_ptr, r_ptr, nw_ptr, K: tl.constexpr, eps):
    k = tl.arange(0, K)
    x = tl.load(x_ptr + k, cache_modifier=".cg")
    if r_ptr is not None:
        x += tl.load(r_ptr + k, cache_modifier=".cg")
    nw = tl.load(nw_ptr + k).to(tl.float32)
    return x * tl.math.rsqrt(tl.sum(x * x, axis=0) / K + eps) * nw


@triton.jit
def _matvec(w_ptr, w, rows, h, out_ptr, x_ptr, o_ptr, pid, programs, N, K: tl.constexpr, KP: tl.constexpr,
            CH: tl.constexpr, RESIDUAL: tl.constexpr, STAGES: tl.constexpr):
    """out[rows] = W[rows] · h for this program's chunks: the first already loaded (w, rows), the
    rest read here, STAGES - 1 ahead of the one being summed. RESIDUAL: out = x + o + W · h (the
    new residual stream)."""
    _rows_out(w, rows, h, out_ptr, x_ptr, o_ptr, N, RESIDUAL)
    for c in tl.range(pid + programs, tl.cdiv(N, CH), programs, num_stages=STAGES):
        w_c, rows_c = _chunk(w_ptr, c, N, K, KP, CH)
        _rows_out(w_c, rows_c, h, out_ptr, x_ptr, o_ptr, N, RESIDUAL)


@triton.jit
def _rows_out(w, rows, h, out_ptr, x_ptr, o_ptr, N, RESIDUAL: tl.constexpr):
    y = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    ok = rows < N
    if RESIDUAL:
        y += tl.load(x_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
        y += tl.load(o_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(out_ptr + rows, y, mask=ok)


@triton.jit
def _layers_kernel(x_ptr, qkv_ptr, o_ptr, gu_ptr, cnt_ptr, wqkv_ptr, wo_ptr, wgu_ptr, wd_ptr, n1_ptr, n2_ptr,
                   layers, eps, N_HIDDEN: tl.constexpr, N_INTER: tl.constexpr, N_QKV: tl.constexpr,
                   N_Q: tl.constexpr, N_INTER_P: tl.constexpr, CH: tl.constexpr, CH_O: tl.constexpr,
                   CH_D: tl.constexpr, STAGES: tl.constexpr, SPIN_LOAD: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    kq = tl.arange(0, N_Q)
    kd = tl.arange(0, N_INTER_P)
    w, rows = _chunk(wqkv_ptr, pid, N_QKV, N_HIDDEN, N_HIDDEN, CH)
    for layer in range(layers):
        # qkv = W_qkv · rmsnorm(x)
        _wait(cnt_ptr, 4 * layer - 1, programs, SPIN_LOAD)
        h = _normed(x_ptr, None, n1_ptr + layer * N_HIDDEN, N_HIDDEN, eps)
        _matvec(wqkv_ptr + layer * N_QKV * N_HIDDEN, w, rows, h, qkv_ptr, x_ptr, o_ptr, pid, programs, N_QKV,
                N_HIDDEN, N_HIDDEN, CH, False, STAGES)
        _signal(cnt_ptr, 4 * layer)
        wo_l = wo_ptr + layer * N_HIDDEN * N_Q
        w, rows = _chunk(wo_l, pid, N_HIDDEN, N_Q, N_Q, CH_O)
        # o = W_o · q (attention's output in the engine)
        _wait(cnt_ptr, 4 * layer, programs, SPIN_LOAD)
        a = tl.load(qkv_ptr + kq, cache_modifier=".cg")
        _matvec(wo_l, w, rows, a, o_ptr, x_ptr, o_ptr, pid, programs, N_HIDDEN, N_Q, N_Q, CH_O, False, STAGES)
        _signal(cnt_ptr, 4 * layer + 1)
        wgu_l = wgu_ptr + layer * 2 * N_INTER * N_HIDDEN
        w, rows = _chunk(wgu_l, pid, 2 * N_INTER, N_HIDDEN, N_HIDDEN, CH)
        # gate_up = W_gu · rmsnorm(x + o)
        _wait(cnt_ptr, 4 * layer + 1, programs, SPIN_LOAD)
        h = _normed(x_ptr, o_ptr, n2_ptr + layer * N_HIDDEN, N_HIDDEN, eps)
        _matvec(wgu_l, w, rows, h, gu_ptr, x_ptr, o_ptr, pid, programs, 2 * N_INTER, N_HIDDEN, N_HIDDEN, CH, False,
                STAGES)
        _signal(cnt_ptr, 4 * layer + 2)
        wd_l = wd_ptr + layer * N_HIDDEN * N_INTER
        w, rows = _chunk(wd_l, pid, N_HIDDEN, N_INTER, N_INTER_P, CH_D)
        # x += o + W_d · (silu(gate) · up), each program for its own rows
        _wait(cnt_ptr, 4 * layer + 2, programs, SPIN_LOAD)
        g = tl.load(gu_ptr + kd, mask=kd < N_INTER, other=0.0, cache_modifier=".cg")
        u = tl.load(gu_ptr + N_INTER + kd, mask=kd < N_INTER, other=0.0, cache_modifier=".cg")
        _matvec(wd_l, w, rows, g / (1.0 + tl.exp(-g)) * u, x_ptr, x_ptr, o_ptr, pid, programs, N_HIDDEN, N_INTER,
                N_INTER_P, CH_D, True, STAGES)
        _signal(cnt_ptr, 4 * layer + 3)
        w, rows = _chunk(wqkv_ptr + (layer + 1) * N_QKV * N_HIDDEN, pid, N_QKV * (layer + 1 < layers), N_HIDDEN,
                         N_HIDDEN, CH)


def persistent_layers(x: torch.Tensor, ws: dict[str, torch.Tensor], programs: int, warps: int = 8,
                      chunk_kb: int = 32, stages: int = 2, scratch: dict | None = None) -> torch.Tensor:
    """Every layer's four matmuls in one launch of ``programs`` programs; x [HIDDEN] float32 is the
    residual stream, updated in place. ``ws``: stacked weights (wqkv [L, 4096, 1024], wo, wgu, wd,
    n1, n2); each program reads its rows in chunks of about ``chunk_kb`` KB."""
    layers, qkv, hidden = ws["wqkv"].shape
    q, inter = ws["wo"].shape[2], ws["wd"].shape[2]
    s = scratch if scratch is not None else {}
    if not s:
        dev = x.device
        s.update(qkv=torch.empty(qkv, device=dev), o=torch.empty(hidden, device=dev),
                 gu=torch.empty(2 * inter, device=dev), cnt=torch.zeros(4 * layers, dtype=torch.int32, device=dev))
    s["cnt"].zero_()
    inter_p = triton.next_power_of_2(inter)

    def rows(k: int) -> int:  # a power of two: chunk_kb KB of bf16 rows of k (padded) columns, at least one
        return 1 << max(0, (chunk_kb * 512 // k).bit_length() - 1)

    _layers_kernel[(programs,)](
        x, s["qkv"], s["o"], s["gu"], s["cnt"], ws["wqkv"], ws["wo"], ws["wgu"], ws["wd"], ws["n1"], ws["n2"],
        layers, EPS, N_HIDDEN=hidden, N_INTER=inter, N_QKV=qkv, N_Q=q, N_INTER_P=inter_p, CH=rows(hidden),
        CH_O=rows(q), CH_D=rows(inter_p), STAGES=stages, SPIN_LOAD=x.device.type == "cuda",
        num_warps=warps)
    return x


def persistent_layers_ref(x: torch.Tensor, ws: dict[str, torch.Tensor]) -> torch.Tensor:
    def norm(v, w):
        return v * torch.rsqrt(v.square().mean() + EPS) * w.float()

    x = x.clone()
    for i in range(ws["wqkv"].shape[0]):
        qkv = ws["wqkv"][i].float() @ norm(x, ws["n1"][i])
        o = ws["wo"][i].float() @ qkv[:ws["wo"].shape[2]]
        x2 = x + o
        gate, up = (ws["wgu"][i].float() @ norm(x2, ws["n2"][i])).chunk(2)
        x = x2 + ws["wd"][i].float() @ (torch.nn.functional.silu(gate) * up)
    return x


def weights(layers: int, device, dtype=torch.bfloat16, seed: int = 0, hidden: int = HIDDEN, inter: int = INTER,
            qkv: int = QKV, q: int = Q) -> dict[str, torch.Tensor]:
    """Stacked random weights of ``layers`` layers (Qwen3-0.6B's shapes unless given)."""
    g = torch.Generator(device="cpu").manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).to(device, dtype)

    return dict(wqkv=w(layers, qkv, hidden), wo=w(layers, hidden, q), wgu=w(layers, 2 * inter, hidden),
                wd=w(layers, hidden, inter), n1=(torch.rand(layers, hidden, generator=g) + 0.5).to(device, dtype),
                n2=(torch.rand(layers, hidden, generator=g) + 0.5).to(device, dtype))


def main() -> None:
    from benchmarks.common import graph_time
    from benchmarks.row_kernels import layers as row_layers
    from benchmarks.row_kernels import row_step
    from braid_engine.kernels import gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--configs", type=lambda v: tuple(map(int, v.split("/"))), nargs="+",
                    default=[(8, 64, 2), (8, 32, 3), (4, 32, 3), (8, 32, 2)],
                    help="warps/chunk KB/pipeline stages of each run")
    ap.add_argument("--reps", type=int, default=100)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    ws = weights(args.layers, dev)
    nbytes = sum(ws[k].nbytes for k in ("wqkv", "wo", "wgu", "wd"))
    print(f"card: {torch.cuda.get_device_name()}; {args.layers} layers, {nbytes / 1e9:.2f} GB of matmul weights; "
          f"{sms} SMs")
    # the engine's row kernels, same shapes (their own weights: distinct per layer, the same bytes)
    rws = row_layers(args.layers)
    x1 = torch.randn(1, HIDDEN, device=dev, dtype=torch.bfloat16)
    r1, o_in = torch.randn_like(x1), torch.randn(1, Q, device=dev, dtype=torch.bfloat16)
    shapes = [(QKV, HIDDEN, gemv.NORM), (HIDDEN, Q, gemv.PLAIN), (2 * INTER, HIDDEN, gemv.NORM),
              (HIDDEN, INTER, gemv.SILU)]
    configs = [gemv.default_config(n, k, p) for n, k, p in shapes]
    base = graph_time(lambda: row_step(rws, x1, r1, o_in, configs), args.reps)
    print(f"{'row kernels (4 a layer, PDL)':40s} {base / args.layers * 1e6:7.2f} µs/layer {nbytes / base / 1e12:5.2f} TB/s")
    x0 = torch.randn(HIDDEN, device=dev)
    ref = persistent_layers_ref(x0, ws)
    for warps, chunk_kb, stages in args.configs:
        scratch: dict = {}
        x = x0.clone()
        persistent_layers(x, ws, sms, warps, chunk_kb, stages, scratch)
        err = ((x - ref).norm() / ref.norm()).item()
        t = graph_time(functools.partial(persistent_layers, x, ws, sms, warps, chunk_kb, stages, scratch), args.reps)
        print(f"{f'persistent, {sms} programs, {warps} warps, {chunk_kb} KB chunks, {stages} stages':40s} "
              f"{t / args.layers * 1e6:7.2f} µs/layer {nbytes / t / 1e12:5.2f} TB/s {base / t:5.2f}x "
              f"(first run against float32 torch: rel. err {err:.1e})")

if __name__ == "__main__":
    main()
