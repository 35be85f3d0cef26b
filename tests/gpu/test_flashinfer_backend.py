"""FlashInfer backend against the torch reference on random paged layouts (GPU only)."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
flashinfer = pytest.importorskip("flashinfer")

from braid_engine.attention.base import BatchLayout  # noqa: E402
from braid_engine.attention.flashinfer_backend import FlashInferBackend  # noqa: E402
from braid_engine.attention.torch_backend import TorchBackend  # noqa: E402

DEV = torch.device("cuda")
LAYERS = 2


def _case(seqs, hq, hkv, d, ps, seed=0):
    """seqs: (query_len, kv_len, group or None, shared pages). Members of a group share their
    leading pages; everything else gets its own shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-kl // ps) for _, kl, _, _ in seqs) + 4
    free = torch.randperm(num_pages, generator=g).tolist()
    shared: dict[int, list[int]] = {}
    tables, slots = [], []
    for ql, kl, grp, n_shared in seqs:
        n = -(-kl // ps)
        head = shared.setdefault(grp, [free.pop() for _ in range(n_shared)]) if grp is not None else []
        table = head + [free.pop() for _ in range(n - len(head))]
        tables.append(table)
        slots.extend(table[p // ps] * ps + p % ps for p in range(kl - ql, kl))
    layout = BatchLayout([s[0] for s in seqs], [s[1] for s in seqs], tables, ps,
                         torch.tensor(slots, device=DEV))
    cache = torch.randn(LAYERS, num_pages, 2, hkv, ps, d, generator=g).to(DEV, torch.bfloat16)
    t = layout.num_tokens
    q, k, v = (torch.randn(t, h, d, generator=g).to(DEV, torch.bfloat16) for h in (hq, hkv, hkv))
    return layout, cache, q, k, v


def _compare(seqs, hq=16, hkv=8, d=128, ps=16, cascade="never", expect_groups=None, small=None):
    layout, cache, q, k, v = _case(seqs, hq, hkv, d, ps)
    ref_cache, fi_cache = cache.clone(), cache.clone()
    ref = TorchBackend(ref_cache, hq, d, "never")
    ref.plan(layout)
    expected = ref.attention(1, q, k, v)
    fi = FlashInferBackend(fi_cache, hq, d, cascade)
    fi.plan(layout)
    if expect_groups is not None:
        assert len(fi.groups) == expect_groups
    assert fi.cascade_steps == int(bool(fi.groups))  # what llm.stats() reports
    if small is not None:  # whether the step runs our split-KV decode kernel
        assert (fi._small_args is not None) == small
    for _ in range(2):  # one plan serves repeated layers
        out = fi.attention(1, q, k, v)
    assert torch.equal(fi_cache, ref_cache)
    err = (out.float() - expected.float()).norm() / expected.float().norm()
    assert err < 1e-2, f"relative error {err:.2e}"
    assert (out.float() - expected.float()).abs().max() < 3e-2


SHAPES = [(16, 8, 128), (32, 4, 128), (16, 8, 64), (32, 4, 64)]


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_prefill(hq, hkv, d):
    _compare([(37, 37, None, 0), (16, 16, None, 0), (5, 5, None, 0), (100, 129, None, 0)], hq, hkv, d)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_few_queries_over_long_kv_split_the_keys(hq, hkv, d):
    """A new turn after a long cached history: the keys are split over CTAs (fa2 wrapper)."""
    seqs = [(3, 4100, None, 0), (65, 2500, None, 0)]
    layout = _case(seqs, hq, hkv, d, 16)[0]
    from braid_engine.attention.flashinfer_backend import _split_pages

    assert _split_pages(layout, hq, hkv, d) is not None
    _compare(seqs, hq, hkv, d)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_decode(hq, hkv, d):
    _compare([(1, kl, None, 0) for kl in (1, 15, 16, 17, 300, 1024)], hq, hkv, d)


@pytest.mark.parametrize("ps", [1, 16])
@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_small_decode_runs_our_kernel(hq, hkv, d, ps):
    """Up to eight sequences decode with braid_engine.kernels.decode_attention; lengths of one
    key, a page ± 1, and long enough for every split; nine go to FlashInfer."""
    _compare([(1, kl, None, 0) for kl in (1, 17, 300, 5000)], hq, hkv, d, ps, small=True)
    _compare([(1, kl, None, 0) for kl in (16, 2049)], hq, hkv, d, ps, small=True)
    _compare([(1, kl, None, 0) for kl in (1, 15, 16, 17, 300, 33, 2049, 64)], hq, hkv, d, ps, small=True)
    _compare([(1, kl, None, 0) for kl in (1, 15, 16, 17, 300, 33, 2049, 64, 5)], hq, hkv, d, ps, small=False)


def test_small_decode_leaves_cascades_and_prefill_to_flashinfer():
    _compare([(1, 64 + n, 0, 4) for n in (1, 5)], cascade="always", expect_groups=1, small=False)
    _compare([(2, 40, None, 0), (1, 17, None, 0)], small=False)


@pytest.mark.parametrize("ps", [1, 16])
def test_mixed_prefill_and_decode(ps):
    _compare([(1, 40, None, 0), (33, 33, None, 0), (1, 17, None, 0), (8, 64, None, 0)], ps=ps)


@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_cascade_decode(hq, hkv, d):
    seqs = [(1, 64 + n, 0, 4) for n in (1, 5, 16, 33)]
    _compare(seqs, hq, hkv, d, cascade="always", expect_groups=1)


def test_cascade_mixed_with_ungrouped_between():
    # group, lone sequence, group: the shared level gathers rows that are not one run
    seqs = [(1, 70, 0, 4), (9, 80, 0, 4), (20, 20, None, 0), (1, 50, 1, 3), (1, 49, 1, 3)]
    _compare(seqs, cascade="always", expect_groups=2)


def test_cascade_page_boundaries():
    # the unique part starts exactly at a page edge and ends on one
    _compare([(1, 48, 0, 2), (16, 64, 0, 2), (1, 33, 0, 2)], cascade="always", expect_groups=1)


def test_cost_rule_keeps_small_groups_plain():
    _compare([(1, 64 + n, 0, 4) for n in range(4)], cascade="auto", expect_groups=0)


def test_cost_rule_cascades_a_large_group():
    # 32 requests sharing 4,096 tokens with short suffixes: cascade measured 1.21× faster
    _compare([(1, 4096 + 20 + n, 0, 256) for n in range(32)], cascade="auto", expect_groups=1)


def test_a_long_prefill_graph_grows_the_fa2_scratch_and_attends_like_the_reference(monkeypatch):
    """A 8,192-row prefill graph on fa2 (all graphs on fa2: fa3_prefill_graph_rows None) with
    16 query heads over 2 KV heads (ERNIE-4.5-0.3B) needs more fa2 scratch than the default
    (graph-mode fa2 always splits); planned for 4,000 new tokens after 300 cached, its wrapper
    attends like the torch reference."""
    from braid_engine.attention.flashinfer_backend import fa2_workspace_bytes

    monkeypatch.setattr(FlashInferBackend, "fa3_prefill_graph_rows", None)

    hq, hkv, d, rows, new = 16, 2, 128, 8192, 4000
    layout, cache, q, k, v = _case([(new, new + 300, None, 0)], hq, hkv, d, 16)
    ref = TorchBackend(cache.clone(), hq, d, "never")
    ref.plan(layout)
    expected = ref.attention(1, q, k, v)
    fi = FlashInferBackend(cache.clone(), hq, d, "never")
    before = fi._fa2_workspace.numel()
    fi.prepare_prefill_graph(rows)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert fi._fa2_workspace.numel() >= fa2_workspace_bytes(hq, hkv, d, sms, rows) > before
    pad_page = next(p for p in range(cache.shape[1]) if p not in set(layout.page_tables[0]))
    fi.plan_prefill_graph(layout, rows, pad_page)
    fi.write_kv(1, k, v, layout.slot_mapping)
    padded = torch.cat([q, torch.zeros(rows - new, hq, d, dtype=q.dtype, device=DEV)])
    out = fi.attend(1, padded)[:new]
    err = (out.float() - expected.float()).norm() / expected.float().norm()
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("cascade", ["auto", "never"])
def test_warm_up_builds_every_eager_kernel_and_leaves_no_trace(cascade):
    """At engine start, each eager wrapper is planned and run once (the kernels FlashInfer would
    otherwise build inside a request's step); nothing is written and no step is counted."""
    cache = torch.randn(LAYERS, 40, 2, 8, 16, 128, generator=torch.Generator().manual_seed(1)).to(DEV, torch.bfloat16)
    before = cache.clone()
    fi = FlashInferBackend(cache, 16, 128, cascade)
    fi.warm_up()
    for wrapper in (fi._prefill, fi._prefill_split, fi._decode, fi._ragged_wrapper):
        assert wrapper._cached_module is not None
    assert (fi._shared._cached_module is not None) == (cascade != "never")
    assert fi._small is not None  # our small-batch decode kernel ran too
    assert torch.equal(cache, before)
    assert (fi.cascade, fi.cascade_steps, fi.layout, fi._rows, fi._active, fi.own_kv) == (
        cascade, 0, None, None, None, False)


@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (32, 4, 64)])
@pytest.mark.parametrize("cascade", ["always", "never"])
def test_a_cascade_twin_graph_matches_the_reference(hq, hkv, d, cascade, monkeypatch):
    """Decode graphs of 8 get a cascade twin (cascade_graph_batch): six sequences sharing 16
    pages, one alone and one padding row, captured on the capture plan and replayed on the
    step's; under "never" the same step replays the plain graph. (A batch of 8 would decode
    through our kernel, which takes no cascade: here FlashInfer's decode takes past 4.)"""
    monkeypatch.setattr(FlashInferBackend, "cascade_graph_batch", 8)
    monkeypatch.setattr(FlashInferBackend, "small_decode_batch", 4)
    bs, ps = 8, 16
    seqs = [(1, 300 + 7 * n, 0, 16) for n in range(6)] + [(1, 50, None, 0)]
    layout, cache, q, k, v = _case(seqs, hq, hkv, d, ps)
    ref = TorchBackend(cache.clone(), hq, d, "never")
    ref.plan(layout)
    expected = ref.attention(1, q, k, v)
    pad_page = cache.shape[1]
    fi_cache = torch.cat([cache, torch.zeros_like(cache[:, :1])], dim=1)  # the pad page past the pool
    fi = FlashInferBackend(fi_cache, hq, d, cascade)
    assert fi.prepare_graph(bs, max_seq_pages=64) == (cascade != "never")
    fi.write_kv(1, k, v, layout.slot_mapping)
    static_q = torch.zeros(bs, hq, d, device=DEV, dtype=torch.bfloat16)
    graphs = {}
    for kind in ("plain", "cascade") if cascade != "never" else ("plain",):
        if kind == "plain":
            fi.plan_graph(BatchLayout([], [], [], ps, torch.empty(0)), bs, pad_page)
        else:
            fi.plan_cascade_capture(BatchLayout([], [], [], ps, torch.empty(0)), bs, pad_page)
        fi.attend(1, static_q)  # warm-up outside the graph
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fi.attend(1, static_q)
        graphs[kind] = (g, out)
    kind = fi.plan_graph(layout, bs, pad_page)
    assert kind == ("cascade" if cascade != "never" else "plain")
    assert fi.cascade_steps == (kind == "cascade")
    if kind == "cascade":
        assert [(g.first, g.last, len(g.shared_pages)) for g in fi.groups] == [(0, 6, 16)]
        assert fi._active is fi._graph_cascade[bs][0]
    static_q[:7].copy_(q)
    g, out = graphs[kind]
    g.replay()
    torch.cuda.synchronize()
    got = out[:7].float()
    err = (got - expected.float()).norm() / expected.float().norm()
    assert err < 1e-2, f"relative error {err:.2e}"
    assert (got - expected.float()).abs().max() < 3e-2


@pytest.mark.parametrize("fa3_rows", [None, 512], ids=["fa2", "fa3-from-512"])
@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (8, 4, 64)])
def test_prefill_graph_replays_are_as_exact_as_the_eager_prefill(hq, hkv, d, fa3_rows, monkeypatch):
    """Prefill graphs captured on the runner's capture plan (one query, the rest padding) and
    replayed on real pieces, many rows padded, one or none (an empty padding request): each replay as close to an fp32
    reference as the eager FlashInfer prefill of the same piece (bf16 rounding apart, nothing
    more), whatever the padding rows hold."""
    monkeypatch.setattr(FlashInferBackend, "fa3_prefill_graph_rows", fa3_rows)
    ps, rows_all = 16, (128, 512, 1024)
    cases = [(1024, 600, 0), (1024, 1000, 0), (1024, 513, 300), (512, 511, 0), (512, 300, 212),
             (128, 88, 512), (128, 1, 900), (1024, 1024, 0), (512, 512, 300), (128, 128, 900)]
    pages = max(-(-(new + cached) // ps) for _, new, cached in cases) + 8
    cache = torch.zeros(LAYERS, pages + 1, 2, hkv, ps, d, device=DEV, dtype=torch.bfloat16)
    pad_page = pages
    fi = FlashInferBackend(cache, hq, d, "never")
    fi.ragged_fresh_prefill = False  # fresh pieces too through the pages (their own keys: the test below)
    fi.reserve_prefill_graph_workspace(rows_all[-1])
    static_q = torch.zeros(rows_all[-1], hq, d, device=DEV, dtype=torch.bfloat16)
    graphs = {}
    for rows in reversed(rows_all):  # as the runner captures them
        fi.prepare_prefill_graph(rows)
        fi.plan_prefill_graph(BatchLayout([1], [1], [[pad_page]], ps, torch.empty(0)), rows, pad_page)
        fi.attend(1, static_q[:rows])
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fi.attend(1, static_q[:rows])
        graphs[rows] = (g, out)
    gen = torch.Generator().manual_seed(3)
    for rows, new, cached in cases:
        kl = new + cached
        table = torch.randperm(pages, generator=gen)[:-(-kl // ps)].tolist()
        slots = torch.tensor([table[p // ps] * ps + p % ps for p in range(cached, kl)], device=DEV)
        layout = BatchLayout([new], [kl], [table], ps, slots)
        cache[1, :pages].copy_(torch.randn(pages, 2, hkv, ps, d, generator=gen))
        q = torch.randn(new, hq, d, generator=gen).to(DEV, torch.bfloat16)
        ref = TorchBackend(cache.float(), hq, d, "never")
        ref.own_kv_fresh = False  # the keys are in the cache (no k/v handed over)
        ref.plan(layout)
        expected = ref.attend(1, q.float())
        fi.plan(layout)
        eager = fi.attend(1, q).float()
        fi.plan_prefill_graph(layout, rows, pad_page)
        static_q.normal_()  # padding rows hold garbage, as in the engine
        static_q[:new].copy_(q)
        g, out = graphs[rows]
        g.replay()
        torch.cuda.synchronize()
        got = out[:new].float()
        e_eager = ((eager - expected).norm() / expected.norm()).item()
        e_graph = ((got - expected).norm() / expected.norm()).item()
        print(f"rows {rows} new {new} cached {cached}: rel err eager {e_eager:.2e}, graph {e_graph:.2e}")
        assert e_graph < 1.25 * e_eager + 2e-4, (rows, new, cached, e_eager, e_graph)


@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (8, 4, 64)])
def test_fresh_prompts_attend_their_own_keys_like_the_reference(hq, hkv, d, monkeypatch):
    """A step whose sequences are all fresh (no key before their queries) and past the short
    bound attends its own k/v, handed over as the strided views of a qkv row that the fused
    prologue leaves them in; eagerly and in a fa3 prefill graph's fresh twin (padding rows
    attending their own garbage keys), each as close to an fp32 reference as the paged prefill
    of the same step. A step with any cached key, or a short one, stays on the paged path."""
    import braid_engine.attention.flashinfer_backend as fb

    monkeypatch.setattr(fb, "RAGGED_HEAD_DIMS", (d,))  # the head dims this test passes go into the default
    ps, rows_all = 16, (512, 1024)
    cases = [(1024, [600]), (1024, [1024]), (512, [511]), (512, [300]), (None, [300, 400, 2])]
    pages = 200
    cache = torch.zeros(LAYERS, pages + 1, 2, hkv, ps, d, device=DEV, dtype=torch.bfloat16)
    pad_page = pages
    fi = FlashInferBackend(cache, hq, d, "never")
    assert [fi.fresh_prefill_graph(r) for r in (256, 512, 8192)] == [False, True, True]
    fi.reserve_prefill_graph_workspace(rows_all[-1])
    width = (hq + 2 * hkv) * d
    static = torch.zeros(rows_all[-1], width, device=DEV, dtype=torch.bfloat16)  # the step's qkv rows

    def views(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = qkv[:, :hq * d].unflatten(1, (hq, d))
        k, v = qkv[:, hq * d:].unflatten(1, (2 * hkv, d)).chunk(2, dim=1)
        return q, k, v

    graphs = {}
    capture = BatchLayout([1], [1], [[pad_page]], ps, torch.empty(0))
    for rows in reversed(rows_all):
        fi.prepare_prefill_graph(rows)
        fi.prepare_prefill_graph(rows, fresh=True)
        fi.plan_prefill_graph(capture, rows, pad_page, fresh=True)
        assert fi.own_kv
        fi.attend(1, *views(static[:rows]))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fi.attend(1, *views(static[:rows]))
        graphs[rows] = (g, out)
    with pytest.raises(ValueError, match="only its own keys"):
        fi.plan_prefill_graph(BatchLayout([5], [9], [[0]], ps, torch.empty(0)), 512, pad_page, fresh=True)
    gen = torch.Generator().manual_seed(4)
    for rows, news in cases:
        free = torch.randperm(pages, generator=gen).tolist()
        tables = [[free.pop() for _ in range(-(-n // ps))] for n in news]
        slots = torch.tensor([t[p // ps] * ps + p % ps for t, n in zip(tables, news, strict=True)
                              for p in range(n)], device=DEV)
        layout = BatchLayout(news, news, tables, ps, slots)
        qkv = torch.randn(sum(news), width, generator=gen).to(DEV, torch.bfloat16)
        q, k, v = views(qkv)
        ref = TorchBackend(cache.float(), hq, d, "never")
        ref.plan(layout)
        expected = ref.attention(1, q.float(), k.float(), v.float())
        fi.ragged_fresh_prefill = False  # the paged prefill of the same step
        fi.plan(layout)
        assert not fi.own_kv
        paged = fi.attention(1, q, k, v).float()
        fi.ragged_fresh_prefill = True
        fi.plan(layout)
        assert fi.own_kv
        eager = fi.attention(1, q, k, v).float()
        e_paged = ((paged - expected).norm() / expected.norm()).item()
        e_eager = ((eager - expected).norm() / expected.norm()).item()
        msg = f"{news}: rel err paged {e_paged:.2e}, own k/v eager {e_eager:.2e}"
        assert e_eager < 1.25 * e_paged + 2e-4, msg
        if rows is not None:
            (n,) = news
            fi.plan_prefill_graph(layout, rows, pad_page, fresh=True)
            static.normal_()  # padding rows hold garbage, as in the engine
            static[:n].copy_(qkv)
            g, out = graphs[rows]
            g.replay()
            torch.cuda.synchronize()
            e_graph = ((out[:n].float() - expected).norm() / expected.norm()).item()
            msg += f", own k/v graph {e_graph:.2e}"
            assert e_graph < 1.25 * e_paged + 2e-4, msg
        print(msg)
    for seqs in ([(300, 300), (5, 40)], [(200, 200)], [(600, 700)]):  # a cached key, or short: paged
        layout = BatchLayout([a for a, _ in seqs], [b for _, b in seqs], [list(range(-(-b // ps))) for _, b in seqs],
                             ps, torch.empty(0))
        fi.plan(layout)
        assert not fi.own_kv
