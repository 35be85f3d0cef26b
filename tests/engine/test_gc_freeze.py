"""A full cyclic collection over everything loaded with a model (torch, transformers, modules)
takes hundreds of ms: the objects alive once an LLM is built are frozen out of the collector."""

import gc

from braid_engine import LLM, SamplingParams


def test_the_built_engine_is_out_of_the_collectors_reach(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu")
    try:
        assert gc.get_freeze_count() > 0
        tracked = {id(o) for o in gc.get_objects()}
        for obj in (llm, llm.engine, llm.engine.runner, llm.engine.runner.model, llm.engine.scheduler):
            assert id(obj) not in tracked, f"{type(obj).__name__} is still scanned by every full collection"
        out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4  # serving goes on as before
    finally:
        llm.shutdown()


def test_a_shut_down_engine_is_collected(tiny_qwen3):
    """Frozen objects are never collected: shutting down hands them back, so an engine (its
    model and KV cache) that is dropped after shutdown is freed."""
    import weakref

    llm = LLM(tiny_qwen3, device="cpu")
    model, cache = weakref.ref(llm.engine.runner.model), weakref.ref(llm.engine.runner.backend.kv_cache)
    llm.shutdown()
    del llm
    gc.collect()
    assert model() is None and cache() is None
