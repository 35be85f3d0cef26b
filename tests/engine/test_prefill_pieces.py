"""How one sequence's prefill is cut into pieces for the prefill CUDA graphs (host-side rule;
the graphs themselves are tested on the GPU in tests/gpu/test_cuda_graphs.py)."""

from types import SimpleNamespace

import pytest
import torch

from braid_engine.engine.model_runner import prefill_graph_sizes, prefill_pieces

SHORT = prefill_graph_sizes(256)
LONG = prefill_graph_sizes(8192)


def test_sizes():
    assert SHORT == (16, 32, 64, 128, 256)
    assert LONG == SHORT + (512, 1024, 2048, 4096, 8192)
    for bad in (100, 0, 255.0, True, "256", 32768):
        with pytest.raises(ValueError, match="prefill_graph_tokens must be one of"):
            prefill_graph_sizes(bad)


def test_short_graphs_take_one_piece_below_the_largest_and_none_from_it():
    assert [prefill_pieces(n, SHORT) for n in (2, 15, 16, 100, 256)] == [[2], [15], [16], [100], [256]]
    assert prefill_pieces(257, SHORT) is None and prefill_pieces(5000, SHORT) is None


@pytest.mark.parametrize("n", [2, 255, 256, 300, 383, 511, 512, 700, 1024, 1535, 3000, 4096, 5000, 8000, 8192])
def test_long_pieces_cover_the_tokens_and_pad_little(n):
    pieces = prefill_pieces(n, LONG)
    assert sum(pieces) == n and all(p > 0 for p in pieces)
    graphs = [next(t for t in LONG if t >= p) for p in pieces]
    # every piece but the last fills its graph; the last pads at most a quarter of a graph
    # above 256 rows
    assert all(g == p for g, p in zip(graphs[:-1], pieces[:-1], strict=True))
    assert graphs[-1] <= 256 or 4 * (graphs[-1] - pieces[-1]) <= graphs[-1]
    assert len(pieces) <= 4


def test_examples():
    assert prefill_pieces(1024, LONG) == [1024]  # the 1,024-row graph, no padding
    assert prefill_pieces(4096, LONG) == [4096]
    assert prefill_pieces(1025, LONG) == [1024, 1]  # not one 2,048-row graph half empty
    assert prefill_pieces(3000, LONG) == [2048, 952]
    assert prefill_pieces(8000, LONG) == [8000]
    assert prefill_pieces(383, LONG) == [256, 127]
    assert prefill_pieces(640, LONG) == [512, 128]
    assert prefill_pieces(8192, LONG) == [8192] and prefill_pieces(8193, LONG) is None


def test_llm_refuses_a_prefill_graph_size_off_the_ladder(tiny_qwen3):
    from braid_engine import LLM

    with pytest.raises(ValueError, match="prefill_graph_tokens must be one of"):
        LLM(tiny_qwen3, device="cpu", prefill_graph_tokens=1000)


def test_no_graph_larger_than_a_step_can_use():
    assert prefill_graph_sizes(16384, max_step_tokens=8192) == LONG
    assert prefill_graph_sizes(16384, max_step_tokens=5000)[-1] == 8192
    assert prefill_graph_sizes(4096, max_step_tokens=100) == SHORT
    assert prefill_graph_sizes(256, max_step_tokens=100) == SHORT


# a ladder with a gap (no 512) takes 600 tokens as 256 + 256 + 88: the same graph twice in a row
GAPPED = SHORT + (1024,)


@pytest.mark.parametrize("n,sizes,pieces,synced", [(383, LONG, [256, 127], []), (3000, LONG, [2048, 952], []),
                                                   (100, LONG, [100], []), (600, GAPPED, [256, 256, 88], [1])])
def test_each_piece_attends_the_keys_before_it(monkeypatch, n, sizes, pieces, synced):
    """The runner's pieces: their own slices of ids, positions and slots, kv lengths that count
    the cached history and every earlier piece, and a wait before a graph is planned again for
    the next piece (its last plan's copies may still be queued)."""
    from braid_engine.attention.base import BatchLayout
    from braid_engine.engine.model_runner import ModelRunner

    calls, syncs = [], []

    def replay(m, rows, layout, graph):
        assert graph == (next(t for t in sizes if t >= m), False)  # 100 cached tokens before these
        calls.append((m, *(r.tolist() for r in rows), layout.query_lens, layout.kv_lens, layout.page_tables))
        return f"logits of piece {len(calls)}"

    fake = SimpleNamespace(prefill_sizes=sizes, _last_prefill_graph=None, page_size=16, device=torch.device("cpu"),
                           _replay_prefill=replay, fresh_prefill_graphs=dict.fromkeys(sizes))
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(synchronize=lambda: syncs.append(len(calls))))
    cached = 100
    ids, positions = list(range(1000, 1000 + n)), list(range(cached, cached + n))
    slots = [p + 7 for p in positions]
    table = list(range(-(-(cached + n) // 16)))
    layout = BatchLayout([n], [cached + n], [table], 16, torch.empty(0))
    rows = torch.tensor([ids, positions, slots])
    assert ModelRunner._replay_prefill_pieces(fake, n, rows, layout) == f"logits of piece {len(pieces)}"
    assert [c[0] for c in calls] == pieces
    starts = [sum(pieces[:i]) for i in range(len(pieces) + 1)]
    for c, a, b in zip(calls, starts, starts[1:], strict=False):
        assert c[1:4] == (ids[a:b], positions[a:b], slots[a:b])
        assert (c[4], c[5], c[6]) == ([b - a], [cached + b], [table])
    assert syncs == synced


def test_a_graph_planned_again_after_another_call_waits_for_the_stream(monkeypatch):
    """The wait before re-planning a graph holds across calls: the next chunk of a prompt (or
    another prompt's chunk in the same step) may plan the graph the last call replayed while
    that replay's copies are still queued."""
    from braid_engine.attention.base import BatchLayout
    from braid_engine.engine.model_runner import ModelRunner

    syncs = []
    fake = SimpleNamespace(prefill_sizes=LONG, _last_prefill_graph=None, page_size=16, device=torch.device("cpu"),
                           _replay_prefill=lambda *a: "logits", fresh_prefill_graphs={})
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(synchronize=lambda: syncs.append(1)))
    for n in (16, 16, 100, 16):
        layout = BatchLayout([n], [n], [[0] * 8], 16, torch.empty(0))
        ModelRunner._replay_prefill_pieces(fake, n, torch.arange(n).expand(3, n), layout)
    assert len(syncs) == 1  # only the second 16 follows a replay of its own graph
    assert fake._last_prefill_graph == (16, False)


@pytest.mark.parametrize("twins, fresh", [((256, 1024), [True, False, False]), ((1024,), [False, False, False])])
def test_only_a_fresh_prompts_first_piece_replays_the_fresh_twin(monkeypatch, twins, fresh):
    """A prompt with nothing cached: its first piece has no keys but its own and replays the
    graph's fresh twin (which attends the piece's own k/v) where that size has one; the pieces
    after it attend the first one's keys in the cache and replay the plain graphs. A wait comes
    only before the same graph, twin or not, is planned again."""
    from braid_engine.attention.base import BatchLayout
    from braid_engine.engine.model_runner import ModelRunner

    calls, syncs = [], []
    fake = SimpleNamespace(prefill_sizes=GAPPED, _last_prefill_graph=None, page_size=16,
                           device=torch.device("cpu"), fresh_prefill_graphs=dict.fromkeys(twins),
                           _replay_prefill=lambda m, rows, layout, g: calls.append((m, layout.kv_lens, g[1])))
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(synchronize=lambda: syncs.append(len(calls))))
    n = 600  # pieces of 256, 256 and 88 (the 128-row graph)
    ModelRunner._replay_prefill_pieces(fake, n, torch.arange(n).expand(3, n),
                                       BatchLayout([n], [n], [list(range(38))], 16, torch.empty(0)))
    assert calls == [(256, [256], fresh[0]), (256, [512], fresh[1]), (88, [600], fresh[2])]
    assert syncs == ([] if fresh[0] else [1])  # the second 256 follows the twin, a graph of its own


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prompt_tensor", [True, False])
def test_a_long_step_builds_the_rows_of_the_python_loop(seed, prompt_tensor):
    """A sequence's ``LONG_ROWS``+ new tokens get their ids, positions and KV slots from tensor
    ops: the same rows as the loop over positions that shorter steps run, from any start inside
    a page, over prompt and output tokens alike, with the prompt's ids taken from the tensor
    made when the request was checked or (without one) converted from the list."""
    import random

    from braid_engine.engine.model_runner import LONG_ROWS, _rows_tensor, _sequence_rows
    from braid_engine.engine.sequence import Sequence
    from braid_engine.sampling import SamplingParams

    rng = random.Random(seed)
    ps = rng.choice([1, 4, 16])
    prompt = [rng.randrange(3, 400) for _ in range(rng.randrange(1, 700))]
    output = [rng.randrange(3, 400) for _ in range(rng.randrange(0, 300))]
    start = rng.randrange(0, len(prompt) + len(output) - 1)
    n = max(1, min(rng.randrange(LONG_ROWS, 900), len(prompt) + len(output) - start))
    pages = -(-(start + n) // ps)
    table = rng.sample(range(5 * pages), pages)  # shuffled, not contiguous
    seq = Sequence("r", prompt, SamplingParams(), None, len(prompt) + len(output) + 1,
                   output_token_ids=output, page_table=table, num_computed=start,
                   prompt_ids=torch.tensor(prompt) if prompt_tensor else None)
    pos = range(start, start + n)
    loop = _rows_tensor((prompt + output)[start:start + n], list(pos), [table[p // ps] * ps + p % ps for p in pos])
    rows = _sequence_rows(seq, n, ps)
    assert rows.dtype == loop.dtype and rows.shape == (3, n)
    assert torch.equal(rows, loop)
