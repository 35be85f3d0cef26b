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


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "16"])
def test_a_bad_chunk_is_refused(tiny_qwen3, bad):
    with pytest.raises(ValueError, match="prefill_chunk_while_decoding must be None or an int"):
        LLM(str(tiny_qwen3), device="cpu", dtype="float32", prefill_chunk_while_decoding=bad)
