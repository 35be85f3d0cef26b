"""Bad input gets a typed error that names the problem and the way out; the engine keeps serving."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from braid_engine import (
    LLM,
    ChatTemplateError,
    CheckpointError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    RequestFailedError,
    SamplingParams,
    UnsupportedArchitectureError,
)
from braid_engine.testing import make_tiny_checkpoint
from tests.threads import within

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a local directory nor a hub id"):
        LLM(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        LLM(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", arch="llama")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3ForCausalLM.*|.*LlamaForCausalLM"):
        LLM(path, device="cpu")


def test_truncated_safetensors(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", arch="llama")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*re-download"):
        LLM(path, device="cpu")


def test_corrupt_safetensors_header(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", arch="llama")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(path, device="cpu")


def test_missing_tensor_and_wrong_shape(tmp_path):
    from safetensors.torch import load_file

    path = make_tiny_checkpoint(tmp_path / "m", arch="llama")
    tensors = load_file(path / "model.safetensors")
    dropped = dict(tensors)
    dropped.pop("model.layers.1.mlp.down_proj.weight")
    save_file(dropped, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        LLM(path, device="cpu")
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        LLM(path, device="cpu")


def test_pickled_weights_are_never_loaded(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "m", arch="llama")
    (path / "model.safetensors").unlink()
    torch.save({"x": torch.ones(1)}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        LLM(path, device="cpu")


def test_sharded_checkpoint_loads_and_matches_single_file(tmp_path):
    single = make_tiny_checkpoint(tmp_path / "single", arch="qwen3", seed=3)
    sharded = make_tiny_checkpoint(tmp_path / "sharded", arch="qwen3", seed=3, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = LLM(single, device="cpu").generate("Hello there", GREEDY)[0].token_ids
    b = LLM(sharded, device="cpu").generate("Hello there", GREEDY)[0].token_ids
    assert a == b
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        LLM(sharded, device="cpu")


def test_tokenizer_without_chat_template(tmp_path):
    llm = LLM(make_tiny_checkpoint(tmp_path / "m", arch="qwen3", chat_template=False), device="cpu")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert llm.generate("hi", GREEDY)[0].finish_reason == "length"


def test_request_errors_leave_the_engine_serving(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=64, page_size=4)
    vocab = llm.model_config.vocab_size
    with pytest.raises(PromptTooLongError, match=r"100 tokens but max_model_len is 64"):
        llm.generate([[5] * 100], GREEDY)
    with pytest.raises(InvalidRequestError, match=f"token id {vocab}.*outside the vocabulary"):
        llm.generate([[1, 2, vocab]], GREEDY)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[1, -4]], GREEDY)
    for bad in (3.0, "7", 2**70, None):  # not integers, or past any int64
        with pytest.raises(InvalidRequestError, match=f"token id {bad!r} is outside the vocabulary"):
            llm.generate([[1, 2, bad, 3]], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        llm.generate("hi", {"temperature": 0})
    for bad in (None, 5):  # not a prompt nor a list of them (was a bare TypeError)
        with pytest.raises(InvalidRequestError, match="a prompt must be a string or a list of token ids"):
            llm.generate(bad, GREEDY)
    # one bad prompt in a batch: none of the batch is queued
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        llm.generate([[5, 6, 7], [8, 9], [1, vocab]], GREEDY)
    assert not llm.engine._pending and not llm.engine._streams
    # nothing was admitted, nothing leaked, and it still serves
    assert llm.stats()["pages_used"] == 0 and llm.stats()["steps"] == 0
    out = llm.generate("Hello", GREEDY)[0]
    assert len(out.token_ids) == 8
    llm.engine.clear_cache()
    assert llm.stats()["pages_used"] == 0


def test_a_checked_prompt_keeps_its_ids_as_a_tensor(tiny_qwen3):
    """validate_prompt packs the ids it checks into the int64 tensor the request's steps read:
    bools and numpy integers are integers there, as in the list."""
    import numpy as np

    llm = LLM(tiny_qwen3, device="cpu", max_model_len=64, page_size=4)
    ids = [5, True, np.int64(7), np.int32(300), 0]
    checked = llm.engine.validate_prompt(ids)
    assert checked.dtype == torch.int64 and checked.tolist() == [5, 1, 7, 300, 0]
    stream = llm.engine.add_request(ids, GREEDY)
    assert stream.result().token_ids == llm.generate([[5, 1, 7, 300, 0]], GREEDY)[0].token_ids


def test_pool_too_small_for_max_model_len(tiny_qwen3):
    with pytest.raises(ValueError, match="max_model_len=64 needs 17 KV pages.*the pool has 16"):
        LLM(tiny_qwen3, device="cpu", page_size=4, num_pages=16, max_model_len=64)
    assert LLM(tiny_qwen3, device="cpu", page_size=4, num_pages=16).config.max_model_len == 60


@pytest.mark.parametrize("pool", [dict(page_size=1, num_pages=2), dict(page_size=1, kv_cache_memory=1),
                                  dict(page_size=16, num_pages=1)])
def test_a_pool_that_holds_no_request_is_refused_at_construction(tiny_qwen3, pool):
    """max_model_len left out is what the pool holds less one spare page; a pool where that is
    below 2 tokens (a prompt token and one to generate) was accepted and then refused every
    prompt (one page: no spare at all, unlike an explicit max_model_len)."""
    with pytest.raises(ValueError, match="a request needs 2.*give the KV cache more memory"):
        LLM(tiny_qwen3, device="cpu", **pool)
    llm = LLM(tiny_qwen3, device="cpu", page_size=1, num_pages=3)  # the smallest that serves
    assert llm.config.max_model_len == 2
    assert len(llm.generate([[5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].token_ids) == 1
    llm.shutdown()


def test_a_gpu_pool_is_sized_after_torch_hands_back_its_unused_blocks(monkeypatch):
    """The default KV pool on a GPU is the share of the card left over; memory torch's allocator
    keeps cached but unused (an engine shut down before, the loader's temporaries) reads as used
    in the driver's figures, so it is handed back before they are read (the figures below are
    what the driver reports before and after)."""
    gib = 1 << 30
    state = {"free": 30 * gib}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.update(free=70 * gib))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (state["free"], 80 * gib))
    per_token = 1024
    assert LLM._default_kv_bytes(torch.device("cuda", 0), 0.9, per_token, 4096) == 72 * gib - 10 * gib


def test_generation_stops_at_max_model_len(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=32, page_size=4)
    out = llm.generate([[7] * 30], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


def test_trust_remote_code_is_never_implied(tmp_path, monkeypatch):
    import transformers

    seen = {}
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    path = make_tiny_checkpoint(tmp_path / "m", arch="llama")
    LLM(path, device="cpu")
    assert seen["trust_remote_code"] is False
    shutil.rmtree(path)


def test_a_failed_request_raises_its_error_again_when_asked_again(tiny_qwen3):
    """A stream that ended in an error raises it again on a second ``result()`` or iteration
    (a retry, a second reader); before, it waited forever on a queue nothing would fill."""
    import threading

    from braid_engine import KVCacheFullError

    llm = LLM(tiny_qwen3, device="cpu", page_size=4, num_pages=16, max_model_len=60)
    handle = llm.pin([(3 * j) % 300 + 3 for j in range(28)])
    stream = llm.engine.add_request([(5 * j) % 300 + 3 for j in range(56)], GREEDY)
    with pytest.raises(KVCacheFullError, match="release pins"):
        stream.result()
    raised = []

    def again():
        for ask in (stream.result, lambda: list(stream)):
            with pytest.raises(KVCacheFullError, match="release pins") as e:
                ask()
            raised.append(e.value)

    waiter = threading.Thread(target=again, daemon=True)
    waiter.start()
    waiter.join(10)
    assert len(raised) == 2, "asking a failed stream again waits forever"
    assert stream.finish_reason == "error"
    handle.release()
    assert len(llm.generate([[9, 8, 7]], GREEDY)[0].token_ids) == 8
    llm.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), r"max_num_seqs must be an int ≥ 1"),  # every request failed as "KV cache full"
    (dict(page_size=0), r"page_size must be an int ≥ 1"),  # ZeroDivisionError
    (dict(num_pages=0), r"num_pages must be an int ≥ 1 or None"),  # every request failed as "KV cache full"
    (dict(max_model_len=0), r"max_model_len must be an int ≥ 2 or None"),  # silently the model's maximum
    (dict(max_model_len=-5), r"max_model_len must be an int ≥ 2 or None"),  # every prompt "too long"
    (dict(max_pinned_fraction=1.5), r"max_pinned_fraction must be a number in \[0, 1\]"),
    (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must be a number in \(0, 1\]"),  # a pool past the card
    (dict(gpu_memory_utilization=0), r"gpu_memory_utilization must be a number in \(0, 1\]"),  # silently one request's KV
    (dict(kv_cache_memory=-1), r"kv_cache_memory must be an int ≥ 1 or None"),  # silently a 1-page pool
    (dict(kv_cache_memory=0), r"kv_cache_memory must be an int ≥ 1 or None"),  # silently the default
    (dict(max_num_batched_tokens=0), r"max_num_batched_tokens must be an int ≥ 1"),  # silently 1
    (dict(max_num_batched_tokens=2.5), r"max_num_batched_tokens must be an int ≥ 1"),  # every request failed
])
def test_engine_sizes_out_of_range_are_refused_before_loading(tiny_qwen3, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_qwen3, device="cpu", **kwargs)


def test_every_error_is_exported_from_the_package():
    """Callers catch errors as ``from braid_engine import ...``; EngineClosedError was missing."""
    import inspect

    import braid_engine
    from braid_engine import errors

    defined = {n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.BraidError)}
    assert "EngineClosedError" in defined
    assert defined <= set(braid_engine.__all__)
    assert all(getattr(braid_engine, n) is getattr(errors, n) for n in defined)


def test_an_unknown_device_is_a_value_error_naming_the_choices(tiny_qwen3):
    """torch's own RuntimeError listed two dozen backends braid does not run on."""
    with pytest.raises(ValueError, match=r"device='tpu'.*'auto', 'cpu', 'cuda' or 'cuda:N'"):
        LLM(tiny_qwen3, device="tpu")


def _result_within(stream, seconds=30):
    """``stream.result()`` (or the error it raised), or ``"stranded"`` if it never came."""
    return within(stream.result, seconds, "stranded")


def _no_pages_held(llm):
    import time

    deadline = time.time() + 30
    while not llm.engine.idle and time.time() < deadline:
        time.sleep(0.01)
    llm.engine.clear_cache()  # a page (or a tree lock) still held by a lost request stays used
    assert llm.stats()["pages_used"] == 0


def _failed_in_the_engine(out, message, request_id=None):
    """``out`` is the typed error a request failed inside the engine gets: it names the request
    and the fault, says what to do, and chains the fault as its cause."""
    from braid_engine import RequestFailedError

    assert isinstance(out, RequestFailedError), out
    assert isinstance(out.__cause__, RuntimeError) and str(out.__cause__) == message
    text = str(out)
    assert f"(RuntimeError: {message})" in text and "submit it again" in text, text
    if request_id is not None:
        assert f"request {request_id} failed inside the engine" in text, text


def test_a_request_taken_off_the_queue_by_a_failing_schedule_gets_the_error(tiny_qwen3, monkeypatch):
    """schedule() can fail after it took a waiting request off the queue and gave it cached pages
    (neither waiting nor running then); that request gets the error, instead of its caller
    waiting forever on pages nobody gives back, and the engine keeps serving."""
    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    prompt = [(3 * j) % 300 + 3 for j in range(30)]
    llm.generate([prompt], GREEDY)  # the second request's prefix is then cached
    scheduler = llm.engine.scheduler
    in_flight, calls = scheduler._prefix_in_flight, []

    def fail_after_the_match(seq):  # (a failing match itself fails that request alone)
        if not calls:
            calls.append(seq)
            assert seq.page_table  # it holds its cached pages
            raise RuntimeError("scheduling broke")
        return in_flight(seq)

    monkeypatch.setattr(scheduler, "_prefix_in_flight", fail_after_the_match)
    out = _result_within(llm.engine.add_request(prompt + [7, 8], GREEDY))
    _failed_in_the_engine(out, "scheduling broke")
    assert len(llm.generate([prompt + [9]], GREEDY)[0].token_ids) == 8
    _no_pages_held(llm)
    llm.shutdown()


def test_a_failing_abort_fails_only_the_aborted_request(tiny_qwen3, monkeypatch):
    """An error while aborting a request (outside the step) killed the loop thread, stranding
    every other request; now the aborted request is failed and the others run on."""
    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine, failed = llm.engine, []
    finish = engine._finish

    def finish_or_fail(seq, reason):
        if reason == "abort" and not failed:
            failed.append(seq.request_id)
            raise RuntimeError("abort broke")
        finish(seq, reason)

    monkeypatch.setattr(engine, "_finish", finish_or_fail)
    other = engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    aborted = iter(engine.add_request([9, 10, 11], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)))
    next(aborted)
    aborted.close()  # aborts it
    out = _result_within(other)
    assert failed and not isinstance(out, (str, Exception)), out
    assert len(out.token_ids) == 200
    _no_pages_held(llm)
    llm.shutdown()


def _free_pages_when_idle(llm):
    """The pool's free pages once the engine is idle and the prefix cache is cleared: a page (or
    a tree lock) still held by a lost request stays out of it."""
    import time

    deadline = time.time() + 30
    while not llm.engine.idle and time.time() < deadline:
        time.sleep(0.01)
    llm.engine.clear_cache()
    return llm.engine.pool.num_free


LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("broken", ["finish", "put"])
def test_a_failing_fail_leaves_the_loop_serving(tiny_qwen3, monkeypatch, broken):
    """``_fail`` runs in the loop's error handler; when it raised too (the scheduler's finish of
    the failed request, or its stream refusing the error) the loop thread died and every other
    request waited forever. Now the failed request still ends with its error, the request queued
    behind it runs as in a clean run, and every page comes back."""
    from braid_engine.engine.engine import RequestStream

    llm = LLM(tiny_qwen3, device="cpu", page_size=4, max_num_seqs=1)  # the other one waits
    engine = llm.engine
    other_prompt = [9, 10, 11, 12, 13]
    clean = llm.generate([other_prompt], LONG)[0].token_ids
    free = _free_pages_when_idle(llm)
    assert free == engine.pool.num_pages
    execute, finish, put = engine.runner.execute, engine.scheduler.finish, RequestStream._put

    def execute_or_fail(batch):
        if any(s.request_id == "doomed" for s, _ in batch):
            raise RuntimeError("forward broke")
        return execute(batch)

    def finish_or_fail(seq):
        if seq.request_id == "doomed":
            raise RuntimeError("finish broke")
        finish(seq)

    def put_or_fail(stream, item):
        if stream.request_id == "doomed":
            raise RuntimeError("put broke")
        put(stream, item)

    monkeypatch.setattr(engine.runner, "execute", execute_or_fail)
    if broken == "finish":
        monkeypatch.setattr(engine.scheduler, "finish", finish_or_fail)
    else:
        monkeypatch.setattr(RequestStream, "_put", put_or_fail)
    with engine.together():
        doomed = engine.add_request([5, 6, 7, 8], LONG, request_id="doomed")
        other = engine.add_request(other_prompt, LONG)
    out = _result_within(other)
    assert not isinstance(out, (str, Exception)), out
    assert out.token_ids == clean
    # the stream that refused the error still raises it to a reader that comes after
    failed = _result_within(doomed)
    _failed_in_the_engine(failed, "forward broke", "doomed")
    assert _free_pages_when_idle(llm) == free
    assert engine._thread.is_alive()
    llm.shutdown()


def _fails_on_call(n, original, message, counted=lambda *args: True):
    """``original`` that raises RuntimeError(message) on its n-th call (of those ``counted``)."""
    calls = [0]

    def fail(*args, **kwargs):
        calls[0] += counted(*args)
        if calls[0] == n and counted(*args):
            raise RuntimeError(message)
        return original(*args, **kwargs)

    return fail


@pytest.mark.parametrize("burst", [1, 8])
@pytest.mark.parametrize("stage", ["detokenize", "stop strings", "stream", "finish"])
def test_a_request_failing_in_its_own_output_fails_alone(tiny_qwen3, stage, burst):
    """An error in one request's own output handling (its detokenizer, its stop strings, its
    stream, its last text at the finish) failed every request of the step with it, or, raised
    at the finish, stranded that request (finished in the scheduler, never told). Now that
    request alone ends with the error; the others in its batch finish as in a clean run."""
    from braid_engine.engine.sequence import RequestOutput

    llm = LLM(tiny_qwen3, device="cpu", page_size=4, decode_burst=burst)
    engine = llm.engine
    # a stop string that never comes: the detokenizer checks and holds back text every token
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=["\x00never"])
    prompts = ([5, 6, 7, 8], [9, 10, 11, 12, 13])

    def run(fault=None):
        with engine.together():
            streams = [engine.add_request(p, params) for p in prompts]
            if fault:
                fault(engine._pending[0], streams[0])
        return [_result_within(s) for s in streams]

    clean = run()
    assert (engine.bursts > 0) == (burst > 1)  # the tokens after the first come in bursts
    free = _free_pages_when_idle(llm)
    message = f"{stage} broke"

    def fault(seq, stream):
        detok = seq.detok
        if stage == "detokenize":
            detok.add = _fails_on_call(6, detok.add, message)
        elif stage == "stop strings":
            detok._held_back = _fails_on_call(6, detok._held_back, message)
        elif stage == "stream":
            # its 6th delta (the error itself goes through)
            stream._put = _fails_on_call(6, stream._put, message, lambda item: isinstance(item, RequestOutput))
        else:
            detok.flush = _fails_on_call(1, detok.flush, message)

    doomed, other = run(fault)
    _failed_in_the_engine(doomed, message)
    assert not isinstance(other, (str, Exception)), other
    assert (other.token_ids, other.text, other.finish_reason) == (
        clean[1].token_ids, clean[1].text, clean[1].finish_reason)
    assert _free_pages_when_idle(llm) == free
    assert len(llm.generate([prompts[0]], params)[0].token_ids) == 20
    llm.shutdown()


def test_a_request_whose_grammar_mask_fails_fails_alone(tiny_qwen3):
    """Guided requests' token masks are filled together, during the forward: one request's
    matcher raising there failed every request of the step. Now that request alone ends with the
    error; the others (guided or not) finish as in a clean run, and no page is lost."""
    from braid_engine import GuidedDecoding

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    guided = SamplingParams(temperature=0, max_tokens=12, guided=GuidedDecoding(json_object=True))
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    jobs = (([5, 6, 7, 8], guided), ([9, 10, 11, 12, 13], guided), ([14, 15, 16], plain))

    class Failing:  # the doomed request's matcher, whose 3rd mask raises
        def __init__(self, inner):
            self.inner = inner
            self.fill_next_token_bitmask = _fails_on_call(3, inner.fill_next_token_bitmask, "mask broke")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    def run(fault=False):
        with engine.together():
            streams = [engine.add_request(p, params) for p, params in jobs]
            if fault:
                seq = engine._pending[0]
                seq.matcher = Failing(seq.matcher)
        return [_result_within(s) for s in streams]

    clean = run()
    free = _free_pages_when_idle(llm)
    doomed, *others = run(fault=True)
    _failed_in_the_engine(doomed, "mask broke")
    for out, ref in zip(others, clean[1:], strict=True):
        assert not isinstance(out, (str, Exception)), out
        assert (out.token_ids, out.text, out.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason)
    assert _free_pages_when_idle(llm) == free
    assert llm.generate([jobs[0][0]], guided)[0].token_ids == clean[0].token_ids
    llm.shutdown()


@pytest.mark.parametrize("stage", ["forward", "burst", "burst tokens", "sampling", "caching"])
def test_a_failed_step_fails_its_batch_and_the_engine_serves_on(tiny_qwen3, monkeypatch, stage):
    """A fault in a step's shared work (the forward, a decode burst and its read, sampling, the
    prefix cache's insert) fails the requests of that step; the request waiting behind them
    runs as in a clean run, the same prompts again (reusing what the failed ones cached) give
    the clean outputs, and every page comes back."""
    import braid_engine.engine.engine as engine_module
    from braid_engine.engine.model_runner import Burst

    llm = LLM(tiny_qwen3, device="cpu", page_size=4, max_num_seqs=2,
              decode_burst=1 if stage == "sampling" else 8)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = ([5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24], [12, 13, 14])  # the third waits

    def run():
        with engine.together():
            streams = [engine.add_request(p, params) for p in prompts]
        return [_result_within(s) for s in streams]

    clean = [out.token_ids for out in run()]
    free = _free_pages_when_idle(llm)
    message = f"{stage} broke"
    if stage == "forward":
        monkeypatch.setattr(engine.runner, "execute", _fails_on_call(1, engine.runner.execute, message))
    elif stage == "burst":
        monkeypatch.setattr(engine.runner, "launch_burst", _fails_on_call(2, engine.runner.launch_burst, message))
    elif stage == "burst tokens":
        monkeypatch.setattr(Burst, "tokens", _fails_on_call(2, Burst.tokens, message))
    elif stage == "sampling":
        monkeypatch.setattr(engine_module, "sample", _fails_on_call(4, engine_module.sample, message))
    else:  # the second prompt's insert, once its prompt is computed
        monkeypatch.setattr(engine.scheduler, "cache_sequence",
                            _fails_on_call(2, engine.scheduler.cache_sequence, message))
    first, second, third = run()
    for failed in (first, second):
        _failed_in_the_engine(failed, message)
    assert not isinstance(third, (str, Exception)), third
    assert third.token_ids == clean[2]
    monkeypatch.undo()
    assert [out.token_ids for out in run()] == clean
    assert _free_pages_when_idle(llm) == free
    llm.shutdown()


def test_a_generate_that_raises_aborts_the_rest_of_its_batch(tiny_qwen3):
    """generate() reads its requests' results in order; when one raised (a failed request, a
    KeyboardInterrupt while waiting), the rest of the batch went on to their ends for nobody,
    holding the engine (and pages) for every later request. Now they are aborted."""
    import threading

    llm = LLM(tiny_qwen3, device="cpu", page_size=4, decode_burst=1)
    engine = llm.engine
    # (a stop string: the text is decoded token by token, where the fault is put)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, stop=["\x00never"])
    streams, aborted, waited = [], threading.Event(), []
    add_requests, abort, execute = engine.add_requests, engine._abort, engine.runner.execute

    def add_and_break_the_first(*args, **kwargs):
        streams.extend(add_requests(*args, **kwargs))
        seq = engine._pending[0]
        seq.detok.add = _fails_on_call(3, seq.detok.add, "detokenize broke")
        return streams

    def abort_and_tell(stream):
        abort(stream)
        aborted.set()

    def execute_after_the_aborts(batch):
        if engine._seqs.get(streams[0].request_id) is None and not waited:  # the first failed:
            waited.append(aborted.wait(30))  # the next step waits for generate's aborts
        return execute(batch)

    engine.add_requests, engine._abort, engine.runner.execute = (
        add_and_break_the_first, abort_and_tell, execute_after_the_aborts)
    with pytest.raises(RequestFailedError, match="detokenize broke"):
        llm.generate([[5, 6, 7], [8, 9, 10], [11, 12, 13]], params)
    rest = [s.result() for s in streams[1:]]
    assert [(len(o.token_ids), o.finish_reason) for o in rest] == [(4, "abort")] * 2
    _no_pages_held(llm)
    llm.shutdown()


def _with_config(src, tmp_path, edit):
    """A copy of checkpoint ``src`` whose config.json ``edit`` has changed."""
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _legacy_rope(kind):
    def edit(cfg):
        cfg["rope_theta"] = (cfg.pop("rope_parameters", None) or {}).get("rope_theta", 10000.0)
        cfg["rope_scaling"] = {"type": kind, "factor": 4.0}
    return edit


@pytest.mark.parametrize("edit, message", [
    # rope scaling written with the older "type" key (LLaMA-2-7B-32K, Qwen2.5's yarn snippet):
    # loaded and ignored before, logits ~1.3 away from transformers'
    (_legacy_rope("linear"), "rope type 'linear' is not supported"),
    (_legacy_rope("yarn"), "rope type 'yarn' is not supported"),
    (_legacy_rope("dynamic"), "rope type 'dynamic' is not supported"),
    # a sliding window transformers applies: full attention was run instead (older configs have
    # no layer_types; where they are given, transformers follows them)
    (lambda cfg: cfg.pop("layer_types") and cfg.update(use_sliding_window=True, sliding_window=8, max_window_layers=0),
     "sliding-window"),
    (lambda cfg: cfg.update(layer_types=["full_attention", "sliding_attention"], sliding_window=8), "sliding-window"),
    # transformers' defaults where keys are missing: a 4096-token window
    (lambda cfg: [cfg.pop(k) for k in ("layer_types", "sliding_window")] and cfg.update(
        use_sliding_window=True, max_window_layers=0), "sliding-window"),
    # a plain ValueError from inside the model's construction before
    (lambda cfg: cfg.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
])
def test_configs_the_engine_would_compute_differently_are_refused(tiny_qwen3, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        LLM(str(_with_config(tiny_qwen3, tmp_path, edit)), device="cpu")


def _logits_match_transformers(path, ids):
    """The engine's fp32 logits of ``ids`` on checkpoint ``path`` equal transformers'."""
    from transformers import AutoModelForCausalLM

    from braid_engine.testing import forward_logits

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    got = forward_logits(LLM(str(path), device="cpu", dtype="float32"), ids)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("edit", [
    _legacy_rope("default"),
    lambda cfg: cfg.update(use_sliding_window=False, sliding_window=8, max_window_layers=0),
    # the window on from layer max_window_layers on: none of the model's layers
    lambda cfg: cfg.pop("layer_types") and cfg.update(use_sliding_window=True, sliding_window=8,
                                                       max_window_layers=cfg["num_hidden_layers"]),
    # transformers' defaults where keys are missing: the window from layer 28 on (none here)
    lambda cfg: [cfg.pop(k) for k in ("layer_types", "max_window_layers")] and cfg.update(
        use_sliding_window=True, sliding_window=8),
    # given layer_types rule over use_sliding_window, in transformers as here
    lambda cfg: cfg.update(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    lambda cfg: cfg.update(layer_types=["full_attention"] * cfg["num_hidden_layers"]),
])
def test_configs_that_compute_as_full_default_rope_attention_load_and_match(tiny_qwen3, tmp_path, edit):
    """What transformers computes as plain attention with default RoPE loads, and its logits
    match transformers' on the same config."""
    _logits_match_transformers(_with_config(tiny_qwen3, tmp_path, edit), list(range(3, 43)))


def test_an_ernie_config_without_tie_word_embeddings_ties_them_as_transformers_does(tmp_path):
    """ERNIE-4.5's config class ties the embeddings unless told otherwise: a config.json without
    the key was refused for a missing lm_head.weight."""
    tied = make_tiny_checkpoint(tmp_path / "ernie", arch="ernie4_5", tie_word_embeddings=True)
    _logits_match_transformers(_with_config(tied, tmp_path, lambda cfg: cfg.pop("tie_word_embeddings")),
                               list(range(3, 23)))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_prompt_may_be_a_one_dimensional_integer_array(tiny_qwen3, kind):
    """A tokenizer's return_tensors="np"/"pt" row is a prompt as its list is."""
    import numpy as np

    llm = LLM(tiny_qwen3, device="cpu", max_model_len=64, page_size=4)
    ids = [5, 9, 7, 300, 0]
    arr = np.array(ids, dtype=np.int64) if kind == "numpy" else torch.tensor(ids)
    assert llm.generate([arr], GREEDY)[0].token_ids == llm.generate([ids], GREEDY)[0].token_ids
    assert [o.token_ids for o in llm.generate(arr, GREEDY)] == [llm.generate([ids], GREEDY)[0].token_ids]
    with pytest.raises(InvalidRequestError, match="one-dimensional"):
        llm.generate([arr.reshape(1, -1)], GREEDY)
    with pytest.raises(InvalidRequestError, match="integer"):
        llm.generate([arr.astype(np.float32) if kind == "numpy" else arr.float()], GREEDY)


@pytest.mark.parametrize("edit, message", [
    # found by review: each was a bare TypeError, ValueError or AttributeError, or loaded and then
    # refused every prompt
    (lambda cfg: cfg.update(vocab_size=None), "wrong kind"),
    (lambda cfg: cfg.update(max_position_embeddings=None), "wrong kind"),
    (lambda cfg: cfg.update(rms_norm_eps="1e-6x"), "wrong kind"),
    (lambda cfg: cfg.update(rope_parameters=[1, 2]), "wrong kind"),
    (lambda cfg: cfg.update(architectures="Qwen3ForCausalLM"), "must list the model class name"),
    (lambda cfg: cfg.update(max_position_embeddings=1), "max_position_embeddings is 1"),
    (lambda cfg: cfg.update(num_hidden_layers=0), "num_hidden_layers is 0"),
])
def test_config_fields_of_the_wrong_kind_are_checkpoint_errors(tiny_qwen3, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        LLM(str(_with_config(tiny_qwen3, tmp_path, edit)), device="cpu")


def test_broken_side_files_of_a_checkpoint_are_checkpoint_errors(tiny_qwen3, tmp_path):
    """A config.json that is no object, a generation_config.json that is no JSON, a shard index
    whose weight_map is a list, and no tokenizer files at all (transformers made an empty
    tokenizer of the model type: every text an empty prompt, token 0 an end of sequence)."""
    def copy(name):
        dst = tmp_path / name
        shutil.copytree(tiny_qwen3, dst)
        return dst

    d = copy("list_config")
    (d / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="holds a list"):
        LLM(str(d), device="cpu")
    d = copy("bad_generation_config")
    (d / "generation_config.json").write_text("{eos")
    with pytest.raises(CheckpointError, match="generation_config.json is not a JSON object"):
        LLM(str(d), device="cpu")
    d = copy("bad_index")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(CheckpointError, match="weight_map must map"):
        LLM(str(d), device="cpu")
    d = copy("no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (d / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer vocabulary"):
        LLM(str(d), device="cpu")


def test_prompts_and_messages_of_the_wrong_kind_are_named(tiny_qwen3):
    """Found by review: bytes were read as token ids, a lone surrogate failed inside the
    tokenizer (TypeError), prompt_token_ids=None was a TypeError; messages without a role or
    with non-text content were dropped or rendered as a Python repr; template variables the
    engine sets itself were a TypeError."""
    llm = LLM(tiny_qwen3, device="cpu", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="decode it to a str"):
        llm.generate(b"hello", GREEDY)
    with pytest.raises(InvalidRequestError, match="not valid Unicode.*index 1"):
        llm.generate("a\ud800b", GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids must be a list"):
        llm.generate({"prompt_token_ids": None}, GREEDY)
    with pytest.raises(ChatTemplateError, match=r"messages\[1\] must be a dict with a 'role'"):
        llm.chat([{"role": "user", "content": "hi"}, {"content": "no role"}], GREEDY)
    with pytest.raises(ChatTemplateError, match=r"messages\[0\] holds 'image_url' content.*text only"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], GREEDY)
    with pytest.raises(ChatTemplateError, match="set by the engine itself"):
        llm.chat([{"role": "user", "content": "hi"}], GREEDY, tokenize=True)
    with pytest.raises(InvalidRequestError, match="not valid Unicode"):
        llm.chat([{"role": "user", "content": "a\udfffb"}], GREEDY)
    # text blocks are the text they hold
    blocks = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    assert llm.apply_chat_template([{"role": "user", "content": blocks}]) == \
        llm.apply_chat_template([{"role": "user", "content": "Hello"}])
    # other content reaches the template as it is: Llama 3's writes a tool's dict result with tojson
    from braid_engine.chat import render_chat

    class Template:
        chat_template = "x"

        def apply_chat_template(self, messages, **kwargs):
            return repr([m["content"] for m in messages])

    data = [{"role": "tool", "content": {"temperature": 22}}, {"role": "tool", "content": [{"t": 1}]}]
    assert render_chat(Template(), data) == repr([{"temperature": 22}, [{"t": 1}]])
    assert llm.generate("Hello", GREEDY)[0].finish_reason == "length"  # still serving
    assert llm.stats()["pages_used"] == llm.stats()["pages_cached"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(device="meta"), "runs on 'cpu' or 'cuda'"),
    (dict(dtype=torch.int8), "float32, float16 or bfloat16"),
])
def test_devices_and_dtypes_the_engine_cannot_run_on_are_refused(tiny_qwen3, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(tiny_qwen3, **{"device": "cpu", **kwargs})


def test_a_tokenizer_longer_than_the_model_s_vocabulary_is_named_as_the_cause(tmp_path):
    """Found by review: text encoded to ids past config.json's vocab_size was refused as a bad
    token id, with advice to encode prompts with this model's tokenizer, which it had done."""
    path = make_tiny_checkpoint(tmp_path / "short_vocab", arch="qwen3", vocab_size=256)
    llm = LLM(path, device="cpu", max_model_len=128)
    text = " ".join(llm.tokenizer.convert_ids_to_tokens(list(range(300, 320)))).replace("Ġ", "")
    assert max(llm.tokenizer(text)["input_ids"]) >= 256
    with pytest.raises(InvalidRequestError, match="tokenizer and weights do not match"):
        llm.generate(text, GREEDY)
    with pytest.raises(InvalidRequestError, match="tokenizer and weights do not match"):
        llm.chat([{"role": "user", "content": text}], GREEDY)
    assert llm.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"  # still serving


def test_a_failed_copy_of_a_cached_partial_page_fails_that_request_alone(tiny_qwen3, monkeypatch):
    """A request whose cached prefix ends inside a page copies that page into one of its own as
    it is admitted (copy-on-write). When the copy raised (a device fault), the page just taken
    for it and its lock on the cached path were never given back, and the whole step failed
    with it: every running request ended with its error. Now that request alone ends with the
    error; the one admitted beside it runs as in a clean run, the same prompt again gives the
    uncached output, and every page comes back."""
    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    prefix = [(3 * j) % 300 + 3 for j in range(30)]  # 7 full pages and 2 tokens of the 8th
    first = llm.generate([prefix], GREEDY)[0]
    doomed_prompt = prefix + [first.token_ids[0] + 1, 5]  # its cached prefix ends at token 30
    other_prompt = [9, 10, 11, 12, 13]
    plain = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False)
    clean = {tuple(p): plain.generate([p], GREEDY)[0].token_ids for p in (doomed_prompt, other_prompt)}
    plain.shutdown()
    copies = []

    def copy_fails(src, dst):
        copies.append((src, dst))
        raise RuntimeError("copy broke")

    monkeypatch.setattr(engine.scheduler, "copy_page", copy_fails)
    with engine.together():  # admitted in one schedule, the other first
        other = engine.add_request(other_prompt, GREEDY)
        doomed = engine.add_request(doomed_prompt, GREEDY, request_id="doomed")
    _failed_in_the_engine(_result_within(doomed), "copy broke", "doomed")
    out = _result_within(other)
    assert not isinstance(out, (str, Exception)), out
    assert out.token_ids == clean[tuple(other_prompt)]
    assert len(copies) == 1
    _wait_idle(llm)
    assert all(node.lock == 0 for node in engine.cache.nodes())  # no lock left on the cached path
    stats = llm.stats()
    assert stats["pages_used"] == stats["pages_cached"]  # and no page outside the tree
    monkeypatch.undo()
    again = llm.generate([doomed_prompt], GREEDY)[0]
    assert again.num_cached_tokens == 30 and again.token_ids == clean[tuple(doomed_prompt)]
    _no_pages_held(llm)
    llm.shutdown()


def _wait_idle(llm):
    import time

    deadline = time.time() + 30
    while not llm.engine.idle and time.time() < deadline:
        time.sleep(0.01)
    assert llm.engine.idle
