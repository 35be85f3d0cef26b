"""The plot reads what benchmarks/decode.py prints (checked on a recorded H100 log)."""

from pathlib import Path

from benchmarks.plot_decode import parse

ROOT = Path(__file__).resolve().parents[1]


def test_plot_parses_a_recorded_decode_log():
    card, weights, bandwidth, rows = parse((ROOT / "docs/data/decode-h100-2026-11-27-run1.txt").read_text())
    assert card == "NVIDIA H100 80GB HBM3"
    assert (weights, bandwidth) == (1.19e9, 2.94e12)
    assert [r[0] for r in rows] == [1, 8, 32, 128]
    assert rows[0] == (1, 504.3, 15.9, 421.3)
    assert [r[3] for r in rows[1:]] == [None, None, None]


def test_the_graph_timeline_charges_each_kernel_up_to_the_next_start():
    """graph_timeline.analyse on a made-up timeline of 3 steps of a 2-layer model: each kernel's
    share runs from its start to the next kernel's start (overlaps and gaps included), the
    shares of a step add up to the step, a matmul that runs several times a layer is told apart
    by its place in the layer, and the idle time between steps is what lies after the last
    kernel's end."""
    import pytest

    from benchmarks.graph_timeline import analyse

    # one step: norm, mm, attn, mm per layer, then the head; starts/ends in µs from the step's start
    step = [("norm", 0, 2), ("mm", 1, 6), ("attn", 6, 9), ("mm", 10, 13),
            ("norm", 13, 15), ("mm", 14, 19), ("attn", 19, 22), ("mm", 23, 26), ("head", 26, 40)]
    events = [(n, a + 45 * s, b + 45 * s) for s in range(3) for n, a, b in step]
    rows, step_us, idle = analyse(list(reversed(events)), 3, 2)
    assert step_us == 45 and idle == 5
    by = {r.label: r for r in rows}
    assert set(by) == {"norm", "mm [0]", "mm [1]", "attn", "head"}
    assert (by["mm [0]"].per_step, by["mm [0]"].share_us, by["mm [0]"].duration_us) == (2, 5 + 5, 5)
    assert (by["mm [1]"].share_us, by["head"].share_us, by["norm"].share_us) == (3 + 3, 19, 1 + 1)
    assert sum(r.share_us for r in rows) == step_us
    assert rows[0].label == "head"
    with pytest.raises(ValueError, match="same kernels"):
        analyse(events[:-1] + [("other", 116, 120)], 3, 2)
    with pytest.raises(ValueError, match="do not split"):
        analyse(events[:-1], 3, 2)


def test_the_compiled_baselines_draw_keeps_the_tokens_transformers_keeps():
    """decode.py's compiled transformers baseline samples with its own filters (plain torch that
    compiles into one graph): with top-k (the k largest through torch.topk) and without (the
    whole row sorted), every token it draws is one transformers' warpers keep, and it draws more
    than one of them."""
    import torch

    from benchmarks.decode import draw
    from braid_engine import SamplingParams
    from tests.engine.test_sampling import _warped

    torch.manual_seed(0)
    logits = torch.randn(1, 500) * 3
    for t, k, p, m in [(0.7, 20, 0.95, 0.0), (0.9, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.05), (0.6, 7, 1.0, 0.0)]:
        kept = torch.isfinite(_warped(logits, t, k, p, m))
        params = SamplingParams(temperature=t, top_k=k if k > 0 else -1, top_p=p, min_p=m)
        drawn = torch.cat([draw(logits.expand(400, -1), params) for _ in range(5)]).flatten()
        assert bool(kept[drawn].all()), (t, k, p, m)
        assert 1 < drawn.unique().numel() <= int(kept.sum()), (t, k, p, m)
