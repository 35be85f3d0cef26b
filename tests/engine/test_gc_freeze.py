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


def test_a_script_that_never_shuts_down_ends_with_its_engine_stopped(tiny_qwen3):
    """An engine left running when its script ends is shut down (its thread stopped and joined)
    before the interpreter tears anything down, and the process exits cleanly. The check runs
    as the last exit hook (registered before any engine exists)."""
    import subprocess
    import sys

    script = (
        "import atexit, threading\n"
        "atexit.register(lambda: print('engine threads at exit:', "
        "[t.name for t in threading.enumerate() if t.name == 'braid-engine']))\n"
        "from braid_engine import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_qwen3)!r}, device='cpu')\n"
        "out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))\n"
        "print('tokens', len(out[0].token_ids))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tokens 3" in done.stdout
    assert "engine threads at exit: []" in done.stdout, done.stdout
