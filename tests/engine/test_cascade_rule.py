"""The cascade cost rule follows the H100 measurements in docs/gpu.md."""

import pytest
import torch

from braid_engine.attention.base import BatchLayout
from braid_engine.attention.flashinfer_backend import cascade_pays, choose_groups


@pytest.mark.parametrize("size,shared,unique,pays", [
    (8, 32768, 128, False),   # measured 0.50: groups of 8 never win
    (32, 1024, 128, False),   # 0.75
    (32, 2048, 64, False),    # 69.6 µs plain vs 70.8 µs cascade
    (32, 4096, 128, True),    # 1.21
    (32, 4096, 1024, False),  # 0.94: the unique part is too long
    (128, 1024, 128, True),   # 1.12
    (256, 32768, 128, True),  # 10.7
])
def test_cascade_pays(size, shared, unique, pays):
    assert cascade_pays(size, shared, unique) is pays


def _layout(n: int, shared_pages: int, ps: int = 16) -> BatchLayout:
    tables = [list(range(shared_pages)) + [1000 + i] for i in range(n)]
    kv = [shared_pages * ps + 5] * n
    return BatchLayout([1] * n, kv, tables, ps, torch.zeros(n, dtype=torch.long))


def test_choose_groups_overrides():
    small = _layout(4, 8)
    assert choose_groups(small, "auto") == []
    assert len(choose_groups(small, "always")) == 1
    big = _layout(32, 256)
    assert len(choose_groups(big, "auto")) == 1
    assert choose_groups(big, "never") == []


def test_auto_leaves_a_step_a_decode_graph_can_run_to_the_graph():
    """A cascade runs eagerly; from a graph, 64 requests on a 4k prompt decoded 2.7× faster
    without it (H100). Only ``always`` still gives up the graph for it."""
    big = _layout(64, 256)
    assert len(choose_groups(big, "auto")) == 1  # an eager step (no graph that large) still cascades
    assert choose_groups(big, "auto", graphed=True) == []
    assert len(choose_groups(big, "always", graphed=True)) == 1
    assert choose_groups(big, "never", graphed=True) == []


def _prefill_layout(query_lens, kv_lens, page_size=16):
    tables = [list(range(-(-kv // page_size))) for kv in kv_lens]
    return BatchLayout(list(query_lens), list(kv_lens), tables, page_size, torch.empty(0))


@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (32, 4, 128), (32, 8, 64)])
@pytest.mark.parametrize("query_lens,kv_lens", [((3,), (8100,)), ((3, 65), (4100, 2500)),
                                                ((200, 200, 100), (30000, 9000, 9000))])
def test_a_split_prefill_fits_flashinfer_s_workspace(hq, hkv, d, query_lens, kv_lens):
    """fa2 keeps a float32 partial output per (128-row query tile, key chunk) and query head:
    the chunks chosen must keep that within the workspace (a 32-head model once overflowed it)."""
    from braid_engine.attention.flashinfer_backend import _WORKSPACE_BYTES, _split_pages

    layout = _prefill_layout(query_lens, kv_lens)
    split = _split_pages(layout, hq, hkv, d)
    pages = [-(-kv // 16) for kv in kv_lens]
    if split is None:
        return
    assert split >= 16
    units = sum(-(-q * (hq // hkv) // 128) * -(-p // split) for q, p in zip(query_lens, pages, strict=True))
    assert units * hq * 128 * d * 4 <= _WORKSPACE_BYTES // 2
    assert max(-(-p // split) for p in pages) >= 2  # a split that splits


def test_short_history_or_many_queries_do_not_split():
    from braid_engine.attention.flashinfer_backend import _split_pages

    assert _split_pages(_prefill_layout((3,), (1000,)), 16, 8, 128) is None  # < 128 pages
    assert _split_pages(_prefill_layout((600,), (9000,)), 16, 8, 128) is None  # > 512 queries


def test_the_eager_short_prefill_bound_is_the_largest_prefill_graph():
    from braid_engine.attention.flashinfer_backend import SHORT_PREFILL_TOKENS
    from braid_engine.engine.model_runner import PREFILL_GRAPH_TOKENS

    assert SHORT_PREFILL_TOKENS == PREFILL_GRAPH_TOKENS[-1]


@pytest.mark.parametrize("hq,hkv,d,at_least_mb", [(16, 8, 128, 128), (16, 2, 128, 264), (32, 4, 64, 128)])
def test_the_fa2_workspace_holds_a_split_over_every_sm(hq, hkv, d, at_least_mb):
    """16 query heads over 2 KV heads (ERNIE-4.5-0.3B) need more than the default 128 MB on an
    H100 (132 SMs): a float32 partial output per (CTA, 128-row tile) for every query head."""
    from braid_engine.attention.flashinfer_backend import fa2_workspace_bytes

    size = fa2_workspace_bytes(hq, hkv, d, num_sms=132)
    assert size >= at_least_mb << 20
    assert size >= hq * (2 * 132 // hkv) * 128 * d * 4  # what FlashInfer was seen to ask for


@pytest.mark.parametrize("hq,hkv,d", [(16, 8, 128), (16, 2, 128)])
@pytest.mark.parametrize("rows", [256, 4096, 16384])
def test_the_fa2_workspace_holds_a_prefill_graph(hq, hkv, d, rows):
    """In graph mode fa2 always splits and pads its CTA count to the query tiles of the graph's
    rows (query heads packed per KV head, 128 packed rows a tile, one more for the padding
    request): a float32 partial output per CTA for every query head, and its log-sum-exps."""
    from braid_engine.attention.flashinfer_backend import fa2_workspace_bytes

    tiles = -(-rows * (hq // hkv) // 128) + 1
    padded = max(2 * 132 // hkv, tiles)
    assert fa2_workspace_bytes(hq, hkv, d, num_sms=132, graph_rows=rows) >= hq * padded * 128 * (d + 1) * 4


def test_paged_kv_lists_each_sequences_pages_and_last_page_fill():
    import torch

    from braid_engine.attention.flashinfer_backend import _paged_kv

    tables = [[7, 3, 9, 4], [5, 6], [8, 1, 2]]
    indptr, indices, last = _paged_kv(tables, [33, 16, 17], 16)
    assert indptr == [0, 3, 4, 6]
    assert indices.dtype == torch.int32 and indices.tolist() == [7, 3, 9, 5, 8, 1]
    assert last == [1, 16, 1]
    indptr, indices, last = _paged_kv(tables, [33, 16, 17], 16, skip=[1, 0, 1])  # a cascade level holds those
    assert (indptr, indices.tolist(), last) == ([0, 2, 3, 4], [3, 9, 5, 1], [1, 16, 1])
    assert _paged_kv([[1]], [1], 16, skip=[1])[1].tolist() == []
