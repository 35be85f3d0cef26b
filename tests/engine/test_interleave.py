"""Prompts chunked while others decode (``prefill_chunk_while_decoding``): the decodes and each
prompt chunk run as forwards of their own, and no output changes."""

import pytest

from braid_engine import LLM, SamplingParams


def _run(path, chunk, spy=None):
    llm = LLM(str(path), device="cpu", dtype="float32", max_num_batched_tokens=64, enable_prefix_caching=False,
              prefill_chunk_while_decoding=chunk)
    try:
        if spy is not None:
            execute = llm.engine.runner.execute
            llm.engine.runner.execute = lambda batch: spy.append([n for _, n in batch]) or execute(batch)
        prompts = [[(7 * i + 3 * k) % 300 + 3 for i in range(10 + k)] for k in range(3)]
        prompts.append([(11 * i) % 300 + 3 for i in range(300)])
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
        return [o.token_ids for o in outs], llm.stats()
    finally:
        llm.shutdown()


def test_prompt_chunks_interleave_with_decodes_and_change_no_token(tiny_qwen3):
    ref, ref_stats = _run(tiny_qwen3, None)
    calls = []
    got, stats = _run(tiny_qwen3, 16, calls)
    assert got == ref
    assert ref_stats["split_steps"] == 0
    assert stats["split_steps"] > 0
    # no forward mixes decodes with prompt tokens; while the short requests decode, the long
    # prompt advances 16 tokens a step (its first chunk shared the opening step with their prompts)
    assert all(set(c) == {1} or len(c) == 1 or 1 not in c for c in calls)
    long_chunks = [c[0] for c in calls if len(c) == 1 and c[0] > 1]
    assert long_chunks and max(long_chunks) == 16
    assert sum(long_chunks) == 300 - (64 - sum(10 + k for k in range(3)))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "16", "Auto"])
def test_a_bad_chunk_is_refused(tiny_qwen3, bad):
    with pytest.raises(ValueError, match="prefill_chunk_while_decoding must be 'auto', None or an int"):
        LLM(str(tiny_qwen3), device="cpu", dtype="float32", prefill_chunk_while_decoding=bad)


def test_auto_chunks_only_with_cuda_graphs(tiny_qwen3):
    """'auto' (the default) splits steps only where graphs run them; without graphs (the CPU)
    one mixed forward reads the weights once for decodes and prompt alike."""
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32")
    try:
        assert llm.config.prefill_chunk_while_decoding is None
        assert llm.engine.runner.graph_prefill_chunks is False
    finally:
        llm.shutdown()


def test_two_prompts_ending_in_one_step_keep_their_own_logits(tiny_qwen3, monkeypatch):
    """On the GPU a prefill graph's logits are a view of its output buffer, which the next replay
    of that graph overwrites: two prompts whose last chunks take the same graph in one step must
    each sample from their own. Modelled on the CPU with one output tensor per graph size."""
    from types import SimpleNamespace

    import torch

    from braid_engine.attention.base import BatchLayout

    syncs = []  # the wait before a graph is planned again (no stream on the CPU)
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: SimpleNamespace(synchronize=lambda: syncs.append(1)))
    prompts = [[(7 * i + 3 * k) % 300 + 3 for i in range(10 + k)] for k in range(3)]
    prompts += [[(11 * i) % 300 + 3 for i in range(84)], [(13 * i) % 300 + 5 for i in range(55)]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for chunk in (None, 16):
        llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", max_num_batched_tokens=64,
                  enable_prefix_caching=False, prefill_chunk_while_decoding=chunk)
        r, buffers, replays = llm.engine.runner, {}, []
        if chunk is not None:
            r.prefill_sizes, r.prefill_graphs = (16, 32, 64), dict.fromkeys((16, 32, 64))

            def replay(n, piece, layout, graph, r=r, buffers=buffers, replays=replays):
                rows = next(t for t in r.prefill_sizes if t >= n)
                assert graph == (rows, False)  # the smallest graph that holds the piece (no twins on the CPU)
                ids, positions, slots = piece
                r.backend.plan(BatchLayout(layout.query_lens, layout.kv_lens, layout.page_tables, r.page_size, slots))
                logits = r.model.compute_logits(r.model(ids, positions, r.backend)[-1:])
                replays.append(rows)
                return buffers.setdefault(rows, torch.empty_like(logits)).copy_(logits)

            r._replay_prefill = replay
        try:
            outs[chunk] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            llm.shutdown()
        if chunk is not None:
            assert replays.count(16) >= 2 and llm.stats()["split_steps"] > 0 and syncs
    assert outs[16] == outs[None]
