"""One layer's prefill attention, each way the engine can run it (GPU only): FlashInfer's default
backend eagerly (fa3 on Hopper: the engine's ``_prefill``), its fa2 backend eagerly, and fa2 in
CUDA-graph mode as the engine's prefill graphs plan it — split-KV (what graph mode does unasked)
and with ``disable_split_kv=True`` —, and the default backend in CUDA-graph mode
(``FlashInferBackend.fa3_prefill_graph_rows``). For a fresh prompt (rows = keys) also FlashInfer's
ragged-KV prefill and torch's SDPA over contiguous keys, as the layer has them before the cache
write: what a prefill that skipped the paged read could gain; and each of SDPA's backends (flash,
cuDNN, memory-efficient) by name, with GQA and with the kv heads repeated.

    python -m benchmarks.prefill_attention [--cases 1024 4096 8192 3:8192]

A case ``n`` is n query rows over n keys, ``q:kv`` q rows over kv keys (the queries are the last
q keys' positions), causal. Qwen3-0.6B attention: 16 q / 8 kv heads, head dim 128, bf16, HND
pages of 16, shuffled. A graph variant runs the smallest prefill graph of at least q rows (model_runner's
sizes), its other rows (if any) a second request on a pad page, planned at capture as ``capture_graphs``
plans it and before the replay as ``plan_prefill_graph`` does. The default cases are the
engine's pieces: a 4096-token prompt fills the 4096-row graph, 4097 tokens would be 4096 + 1.

Prints the median µs of ``triton.testing.do_bench`` (L2 flushed before each call), TFLOP/s of the
causal work (padding rows not counted), the largest |difference| from the default backend's
output, and each fa2 plan's CTA rows (FlashInfer's padded batch) and whether it splits the keys.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import card
from braid_engine.attention.base import BatchLayout
from braid_engine.attention.flashinfer_backend import (
    _WORKSPACE_BYTES,
    _paged_kv,
    _split_pages,
    fa2_workspace_bytes,
)
from braid_engine.engine.model_runner import LONG_PREFILL_GRAPH_TOKENS, PREFILL_GRAPH_TOKENS

HQ, HKV, D, PS = 16, 8, 128, 16
GRAPH_SIZES = PREFILL_GRAPH_TOKENS + LONG_PREFILL_GRAPH_TOKENS


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def _graph_plan(q: int, kv: int, table: list[int], pad_page: int, rows: int) -> tuple:
    """qo indptr, page indptr, page indices, last-page fills of one sequence's q rows over kv keys
    padded to a graph of ``rows`` rows: the padding is a second request of rows - q rows over as
    many keys, all on the pad page (``plan_prefill_graph``)."""
    pad = rows - q
    indptr, indices, last = _paged_kv([table, [pad_page] * -(-pad // PS)], [kv, pad], PS)
    return _i32([0, q, rows]), _i32(indptr), indices, _i32(last)


def _plan_note(w) -> str:
    """An fa2 plan's CTA rows and split, read from its PrefillPlanInfo (padded_batch_size first,
    split_kv last); '-' for another backend's plan."""
    if getattr(w, "_backend", None) != "fa2":
        return "-"
    try:
        info = [int(x) for x in w._plan_info]
        return f"{info[0]} CTA rows x {HKV} KV heads, {'split' if info[14] else 'no split'}"
    except (TypeError, ValueError, IndexError):
        return "?"


def _causal_flops(q: int, kv: int) -> float:
    """QKᵀ and PV of q queries that are the last of kv keys: query i attends kv - q + i + 1 keys."""
    return 4 * D * HQ * (q * (kv - q) + q * (q + 1) / 2)


def _variants(flashinfer, q: int, kv: int, rows: int | None, sms: int, common: dict) -> list[tuple]:
    """(name, wrapper, call returning the q output rows) of each variant, planned, graphs captured."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    pages = -(-kv // PS)
    pad_page = pages  # the cache's last page; the sequence's pages are shuffled over the others
    cache = torch.randn(pages + 1, 2, HKV, PS, D, device=dev, dtype=bf)
    table = torch.randperm(pages).tolist()
    q_all = torch.randn(rows or q, HQ, D, device=dev, dtype=bf)  # a graph's static input
    qs = q_all[:q]
    indptr, indices, last = _paged_kv([table], [kv], PS)
    eager_kv = (_i32(indptr), indices, _i32(last))

    def space(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.uint8, device=dev)

    def buf(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int32, device=dev)

    # (a) the default backend, eagerly, on the engine's 128 MB workspace
    a = flashinfer.BatchPrefillWithPagedKVCacheWrapper(space(_WORKSPACE_BYTES), "HND")
    a.plan(_i32([0, q]), *eager_kv, **common)
    # (b) fa2 eagerly, on the engine's fa2 workspace, with the key split the engine asks for when
    # few queries meet long keys (else None: FlashInfer's own choice)
    split = _split_pages(BatchLayout([q], [kv], [table], PS, torch.empty(0)), HQ, HKV, D)
    b = flashinfer.BatchPrefillWithPagedKVCacheWrapper(space(fa2_workspace_bytes(HQ, HKV, D, sms)), "HND",
                                                       backend="fa2")
    b.plan(_i32([0, q]), *eager_kv, fixed_split_size=split, **common)
    out = [(f"a eager, default backend ({a._backend})", a, lambda: a.run(qs, cache)),
           (f"b eager, fa2 ({f'split {split} pages' if split else 'own split'})", b, lambda: b.run(qs, cache))]
    if q == kv:
        # a fresh prompt's keys are also at hand contiguous (the layer's own k and v before the
        # cache write): (f) FlashInfer's ragged-KV prefill over them, default backend (TMA loads
        # on Hopper, where the paged kernel gathers page by page), and (g) torch's SDPA on them
        pos = torch.arange(kv, device=dev)
        rows_of = torch.tensor(table, device=dev)[pos // PS]
        k = cache[rows_of, 0, :, pos % PS].contiguous()  # [kv, HKV, D]
        v = cache[rows_of, 1, :, pos % PS].contiguous()
        f = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(space(_WORKSPACE_BYTES), "NHD")
        f.plan(_i32([0, q]), _i32([0, kv]), HQ, HKV, D, causal=True, pos_encoding_mode="NONE",
               sm_scale=D ** -0.5, q_data_type=bf, kv_data_type=bf)
        out.append((f"f eager, ragged KV ({f._backend})", f, lambda: f.run(qs, k, v)))
        qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (qs, k, v))

        def sdpa() -> torch.Tensor:
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
            return o[0].transpose(0, 1)

        out.append(("g eager, torch SDPA, contiguous", None, sdpa))
        # (h) each of torch's SDPA backends named, with the kv heads shared (GQA) and, where a
        # backend takes no GQA, repeated per query head beforehand (not timed): whether one of
        # them beats FlashInfer's fa3 for a fresh prompt
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kr, vr = (x.repeat_interleave(HQ // HKV, dim=1) for x in (kt, vt))
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                               ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            for gqa in (True, False):
                def named(backend=backend, gqa=gqa) -> torch.Tensor:
                    with sdpa_kernel(backend):
                        o = torch.nn.functional.scaled_dot_product_attention(
                            qt, kt if gqa else kr, vt if gqa else vr, is_causal=True, enable_gqa=gqa)
                    return o[0].transpose(0, 1)

                name = f"h SDPA {label}{'' if gqa else ', kv repeated'}"
                try:
                    named()
                except RuntimeError as e:  # the backend does not take this case
                    print(f"      ({name}: {str(e).splitlines()[0][:80]})")
                    continue
                out.append((name, None, named))
    if rows is None:
        return out
    # (c), (d) fa2 in graph mode: captured on the capture plan (one row over one key on the pad
    # page, the rest padding), replayed on the case's plan; (d) unsplit at both; (e) the default
    # backend in graph mode
    for name, backend, unsplit in (("c graph, fa2, split-KV", "fa2", False),
                                   ("d graph, fa2, disable_split_kv", "fa2", True),
                                   ("e graph, default backend", "auto", False)):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            space(fa2_workspace_bytes(HQ, HKV, D, sms, rows)), "HND", use_cuda_graph=True,
            qo_indptr_buf=buf(3), paged_kv_indptr_buf=buf(3), paged_kv_indices_buf=buf(pages + 1 + -(-rows // PS)),
            paged_kv_last_page_len_buf=buf(2), backend=backend)
        if unsplit:
            # unsplit, a graph-mode fa2 plan still launches its padded CTA count with no mask of
            # the valid ones: CTAs past the plan's work read (request, tile) entries no plan
            # wrote. Zeros make them redo request 0's first tile (same values, same rows)
            w._pin_memory_int_workspace_buffer.zero_()
        w.plan(*_graph_plan(1, 1, [pad_page], pad_page, rows), disable_split_kv=unsplit, **common)
        w.run(q_all, cache)  # warm-up outside the graph, as the runner does
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o = w.run(q_all, cache)
        w.plan(*_graph_plan(q, kv, table, pad_page, rows), disable_split_kv=unsplit, **common)

        def replay(graph=graph, o=o) -> torch.Tensor:
            graph.replay()
            return o[:q]

        out.append((f"{name} ({w._backend})" if backend == "auto" else name, w, replay))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["1024", "4096", "8192", "3:8192"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("prefill_attention: no CUDA device; skipped (FlashInfer's kernels are GPU only)")
        return
    try:
        import flashinfer
        from triton.testing import do_bench
    except ImportError as e:
        print(f"prefill_attention: needs flashinfer and triton ({e}); skipped")
        return
    dev, bf = torch.device("cuda"), torch.bfloat16
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    common = dict(num_qo_heads=HQ, num_kv_heads=HKV, head_dim_qk=D, page_size=PS, causal=True,
                  pos_encoding_mode="NONE", sm_scale=D ** -0.5, q_data_type=bf, kv_data_type=bf)
    print(f"card: {card(dev)} ({sms} SMs), flashinfer {flashinfer.__version__}; one layer, "
          f"{HQ}/{HKV} heads, head dim {D}, bf16, HND pages of {PS}")
    print(f"{'rows':>5} {'keys':>5} {'graph':>5}  {'variant':<34} {'µs':>8} {'TFLOP/s':>8} {'max |Δ| vs a':>13}  plan")
    for case in args.cases:
        q, kv = (int(x) for x in case.split(":")) if ":" in case else (int(case), int(case))
        if not 0 < q <= kv:
            raise SystemExit(f"case {case}: need 0 < query rows <= keys")
        rows = next((t for t in GRAPH_SIZES if t >= q), None)  # the engine's graph for q rows
        ref = None
        for name, w, fn in _variants(flashinfer, q, kv, rows, sms, common):
            o = fn().float()
            ref = o if ref is None else ref
            diff = (o - ref).abs().max().item()
            us = do_bench(fn, return_mode="median") * 1e3
            print(f"{q:>5} {kv:>5} {rows or '-':>5}  {name:<34} {us:>8.1f} {_causal_flops(q, kv) / us / 1e6:>8.1f}"
                  f" {diff:>13.2e}  {_plan_note(w)}")
        print()


if __name__ == "__main__":
    main()
