import asyncio
import time

import pytest

from braid_engine import SamplingParams
from braid_engine.detokenizer import IncrementalDetokenizer
from tests.threads import within


def test_stream_deltas_add_up_to_generate(qwen3_llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompt = "東京 café 😀 Tell me a story"
    whole = qwen3_llm.generate(prompt, params)[0]
    deltas = list(qwen3_llm.stream(prompt, params))
    assert [t for d in deltas for t in d.token_ids] == whole.token_ids
    assert "".join(d.text for d in deltas) == whole.text
    assert [d.finish_reason for d in deltas] == [None] * (len(deltas) - 1) + ["length"]


def test_multibyte_characters_are_never_split(qwen3_llm):
    tok = qwen3_llm.tokenizer
    text = "東京 😀 café Привет"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split()), "the test needs characters spread over several tokens"
    detok = IncrementalDetokenizer(tok, [], [], True)
    pieces = []
    for t in ids:
        detok.add(t)
        pieces.append(detok.take(final=False))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def _detok_run(tok, text, stop):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, [], stop, True)
    pieces = []
    for t in ids:
        detok.add(t)
        pieces.append(detok.take(final=detok.stopped))
        if detok.stopped:
            break
    return pieces, detok


def test_stop_string_is_never_returned_even_partially(qwen3_llm):
    tok = qwen3_llm.tokenizer
    pieces, detok = _detok_run(tok, "The quick brown fox jumps over the lazy dog.", ["jumps over"])
    assert detok.stopped
    assert "".join(pieces) == "The quick brown fox "
    assert not any("jum" in p for p in pieces)


def test_stop_strings_end_generation_in_the_engine(qwen3_llm):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = qwen3_llm.generate("Hello there", params)[0]
    stop = full.text[10:13]
    assert stop and stop not in full.text[:10]
    cut = qwen3_llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=40,
                                                           ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    streamed = "".join(d.text for d in qwen3_llm.stream("Hello there", SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])))
    assert streamed == cut.text


def test_stop_token_ids(qwen3_llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = qwen3_llm.generate("Hello there", params)[0]
    target = full.token_ids[5]
    first = full.token_ids.index(target)
    out = qwen3_llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                           stop_token_ids=[target]))[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop"


def test_abandoned_stream_is_aborted_and_frees_its_pages(tiny_qwen3):
    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False, page_size=4)
    it = llm.stream("Tell me a long story", SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    for i, _ in enumerate(it):
        if i == 3:
            break
    it.close()
    deadline = time.time() + 10
    while not llm.engine.idle and time.time() < deadline:
        time.sleep(0.01)
    stats = llm.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0
    assert stats["steps"] < 100
    assert len(llm.generate("Hi", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0].token_ids) == 3
    llm.shutdown()


async def test_astream_does_not_block_the_event_loop(qwen3_llm):
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    tokens = [t async for d in qwen3_llm.astream("Hello there", params) for t in d.token_ids]
    task.cancel()
    assert tokens == qwen3_llm.generate("Hello there", params)[0].token_ids
    assert ticks > len(tokens)


def test_many_threads_are_batched_together(qwen3_llm):
    from concurrent.futures import ThreadPoolExecutor

    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(8)]
    alone = [qwen3_llm.generate(p, params)[0].token_ids for p in prompts]
    steps0 = qwen3_llm.stats()["steps"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: qwen3_llm.generate(p, params)[0].token_ids, prompts))
    assert together == alone
    assert qwen3_llm.stats()["steps"] - steps0 < 8 * 20


def test_prompt_forms_give_the_same_tokens(qwen3_llm):
    """A string, a list of ids, and a {"prompt_token_ids": ...} dict, alone or in a list."""
    ids = qwen3_llm.encode("Tell me a story")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = qwen3_llm.generate(ids, params)[0].token_ids
    for prompt in ("Tell me a story", {"prompt_token_ids": ids}, [{"prompt_token_ids": ids}], [ids]):
        outs = qwen3_llm.generate(prompt, params)
        assert len(outs) == 1 and outs[0].prompt_token_ids == ids and outs[0].token_ids == want, prompt


def test_shutdown_fails_requests_in_flight_instead_of_leaving_them_waiting(tiny_qwen3):
    """A request still running (or queued) when the engine shuts down gets EngineClosedError
    from its stream, and its pages go back to the pool; before, ``result()`` waited forever."""
    import threading

    import pytest

    from braid_engine import LLM
    from braid_engine.errors import EngineClosedError

    llm = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False, page_size=4)
    params = SamplingParams(temperature=0, max_tokens=5000, ignore_eos=True)
    running = llm.engine.add_request(llm.encode("Tell me a long story"), params)
    next(iter(running))  # it has started
    llm.shutdown()
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(pytest.raises(EngineClosedError, running.result)))
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive(), "result() hangs after shutdown"
    assert "shut down" in str(outcome[0].value) and "new LLM" in str(outcome[0].value)
    stats = llm.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    with pytest.raises(EngineClosedError, match="create a new LLM"):
        llm.generate("Hi", params)


async def test_cancelled_astream_aborts_its_request_and_frees_its_pages(tiny_qwen3):
    """Cancelling the task that reads ``astream`` (a client gone, a timeout) aborts the request:
    no more steps run for it and its pages return; the engine serves the next request."""
    import pytest

    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False, page_size=4)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    started = asyncio.Event()

    async def consume():
        async for _ in llm.astream("Tell me a long story", params):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.time() + 10
    while not llm.engine.idle and time.time() < deadline:
        await asyncio.sleep(0.01)
    stats = llm.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["decoded_tokens"] < 200
    out = [d async for d in llm.astream("Hi", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))]
    assert sum(len(d.token_ids) for d in out) == 3 and out[-1].finish_reason == "length"
    llm.shutdown()


def test_numpy_integer_ids_are_prompts_as_in_the_engine(qwen3_llm):
    """The engine takes numpy integers as token ids; LLM.generate/stream took a list of them
    for a batch of one-token 'prompts' and refused each ("got int64")."""
    import numpy as np

    ids = qwen3_llm.encode("Tell me a story")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    want = qwen3_llm.generate(ids, params)[0].token_ids
    as_numpy = list(np.array(ids, dtype=np.int64))
    for prompt in (as_numpy, [as_numpy], [list(np.array(ids, dtype=np.int32))]):
        outs = qwen3_llm.generate(prompt, params)
        assert len(outs) == 1 and outs[0].prompt_token_ids == ids and outs[0].token_ids == want
    assert [t for d in qwen3_llm.stream(as_numpy, params) for t in d.token_ids] == want


def test_a_late_abort_of_a_finished_request_spares_the_next_one_with_its_id(tiny_qwen3):
    """A stream closed after its request finished but before its last output was read (a loop
    left early; a generator finalized later by the collector) aborts by request id; once the
    id was taken again by a new request, that abort stopped the new one. Now an abort reaches
    only the request it was made for."""
    import threading

    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    clean = llm.generate([[5, 6, 7]], params)[0].token_ids
    old = iter(engine.add_request([5, 6, 7], params, request_id="chat-1"))
    next(old)
    deadline = time.time() + 30
    while "chat-1" in engine._streams and time.time() < deadline:  # it finishes unread
        time.sleep(0.01)
    with engine.together():  # the loop takes both at once
        new = engine.add_request([5, 6, 7], params, request_id="chat-1")
        old.close()  # its caller leaves: the final output was never read
    out = new.result()
    assert (out.token_ids, out.finish_reason) == (clean, "length")

    # an abort made while the old request ran, read by the loop after it finished and its id
    # was taken again
    finish, again, added = engine._finish, [], threading.Event()

    def finish_with_a_racing_abort(seq, reason):
        if seq.request_id == "chat-2" and not again:
            engine.abort("chat-2")  # the old one still runs
            finish(seq, reason)
            again.append(engine.add_request([5, 6, 7], params, request_id="chat-2"))
            added.set()
            return
        finish(seq, reason)

    engine._finish = finish_with_a_racing_abort
    try:
        assert engine.add_request([5, 6, 7], params, request_id="chat-2").result().token_ids == clean
        added.wait(30)
        out = again[0].result()
    finally:
        del engine._finish
    assert (out.token_ids, out.finish_reason) == (clean, "length")
    llm.shutdown()


def test_streams_nobody_reads_hold_up_nothing(tiny_qwen3):
    """A stream whose reader never comes (its event loop closed before the first output, or a
    caller that never iterates) neither stalls the engine nor keeps pages: the first is aborted
    at its first output, the second runs to its end with its outputs queued, and the engine
    serves the next request as before."""
    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    clean = llm.generate([[5, 6, 7]], params)[0].token_ids
    decoded = llm.stats()["decoded_tokens"]
    loop = asyncio.new_event_loop()
    gone = engine.add_request([8, 9, 10], params, loop=loop)
    loop.close()
    unread = engine.add_request([11, 12, 13], params)
    deadline = time.time() + 30
    while not engine.idle and time.time() < deadline:
        time.sleep(0.01)
    assert engine.idle
    assert gone._queue.qsize() == 0  # nothing could be handed to its loop
    # the unread one decoded its 39 tokens after the first; the other none: aborted at its first
    assert llm.stats()["decoded_tokens"] - decoded == 39
    assert unread.result().token_ids == llm.generate([[11, 12, 13]], params)[0].token_ids
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == clean
    llm.engine.clear_cache()
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages
    llm.shutdown()


def test_shutdown_racing_submissions_strands_nobody(tiny_qwen3):
    """Requests submitted from many threads while the engine shuts down: each is refused
    (EngineClosedError at submission), finished, or ended by the shutdown (EngineClosedError
    from its stream); no caller waits forever and every page comes back."""
    import threading

    from braid_engine import LLM
    from braid_engine.errors import EngineClosedError

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    outcomes = []
    start = threading.Barrier(17)

    def submit(i):
        start.wait()
        try:
            stream = llm.engine.add_request([i + 3, 4, 5], params)
        except EngineClosedError as e:
            outcomes.append(("refused", str(e)))
            return
        try:
            outcomes.append(("finished", len(stream.result().token_ids)))
        except EngineClosedError as e:
            outcomes.append(("closed", str(e)))

    threads = [threading.Thread(target=submit, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    start.wait()
    llm.shutdown()
    for t in threads:
        t.join(30)
    assert len(outcomes) == 16, "a caller was left waiting"
    for kind, detail in outcomes:
        assert kind in ("refused", "finished", "closed")
        assert (detail == 50) if kind == "finished" else ("create a new LLM" in detail)
    assert llm.stats()["running"] == llm.stats()["waiting"] == 0
    llm.engine.clear_cache()
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


def _hold_steps(monkeypatch, engine, where="execute"):
    """Make the loop thread stop inside its next step (holding the engine's state lock) at
    ``engine.runner.execute`` or ``engine.scheduler.schedule``, until the returned ``go`` is set;
    ``inside`` is set once it is there."""
    import threading

    inside, go = threading.Event(), threading.Event()
    owner = engine.runner if where == "execute" else engine.scheduler
    original = getattr(owner, where)

    def held(*args):
        inside.set()
        go.wait(30)
        return original(*args)

    monkeypatch.setattr(owner, where, held)
    return inside, go


def _in_a_thread(body, seconds=20):
    """``body()``'s result (or the error it raised), or ``"hung"`` if it had not returned in ``seconds``."""
    return within(body, seconds, "hung")


def test_stats_count_a_request_the_loop_has_not_yet_taken_as_waiting(tiny_qwen3):
    """A request added is waiting from then on: stats() counted only the scheduler's queue, so
    until the loop thread took a new request it read 0 running and 0 waiting, as if none had come.
    Inside together() the loop cannot take it, which holds that moment still."""
    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    with engine.together():
        streams = [engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=2)) for _ in range(2)]
        inside = engine.stats()
    assert (inside["waiting"], inside["running"]) == (2, 0)
    assert [len(s.result().token_ids) for s in streams] == [2, 2]
    after = engine.stats()
    assert (after["waiting"], after["running"]) == (0, 0)
    assert after["pages_used"] == after["pages_cached"]  # only the prompt's page, kept by the prefix cache


def test_stats_and_cache_control_inside_together_wait_for_the_step_not_forever(tiny_qwen3, monkeypatch):
    """together() holds the lock the loop takes new requests under; stats(), clear_cache() and a
    pin's release take the state lock the loop holds through a step. The loop took the first
    lock inside its step, to forget a request that finished there: a block that asked for the
    stats during such a step waited for the step, which waited for the block, forever. Now the
    loop never waits for that lock while it holds the state lock: inside the block these calls
    wait for the step alone, and see what it did."""
    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    handle = llm.pin([5, 6, 7, 8, 9, 10])  # 2 pages
    before = llm.stats()
    assert before["pages_pinned"] == 2 and before["pages_used"] == 2
    prompt = [20, 21, 22, 23, 24]
    inside, go = _hold_steps(monkeypatch, engine)
    stream = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    assert inside.wait(30)  # the loop is in the step that finishes the request

    def block():
        with engine.together():
            go.set()
            during = engine.stats()  # after the step: the request finished in it
            handle.release()
            engine.clear_cache()
            return during, engine.stats()

    result = _in_a_thread(block)
    assert result != "hung", "stats() inside together() deadlocked with the loop thread"
    assert not isinstance(result, Exception), result
    during, after = result
    assert (during["running"], during["waiting"]) == (0, 0)
    assert during["steps"] == before["steps"] + 1
    assert during["prefilled_tokens"] == before["prefilled_tokens"] + 5
    assert during["pages_used"] == 2 + 2 and during["pages_pinned"] == 2  # its prompt cached
    assert (after["pages_used"], after["pages_pinned"], after["pages_cached"]) == (0, 0, 0)
    monkeypatch.undo()
    out = stream.result()
    assert (len(out.token_ids), out.finish_reason) == (1, "length")
    assert out.token_ids == llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1))[0].token_ids
    llm.shutdown()


def test_shutdown_inside_together_stops_the_engine_without_hanging(tiny_qwen3, monkeypatch):
    """shutdown() joined the loop thread, which takes together()'s lock to stop: inside the
    block it hung for the join's 30 s and returned with the loop still running. Now it waits
    with that lock given up, as outside the block: requests added after it are refused, and
    those running or queued have ended with EngineClosedError when it returns, their pages
    back; the grammar's helper thread, which fills a guided request's masks, stops only once no
    step can use it (stopped under a step, it fails the step's requests)."""
    import threading

    import pytest

    from braid_engine import LLM, GuidedDecoding
    from braid_engine.errors import EngineClosedError

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    long_string = {"type": "object", "properties": {"a": {"type": "string", "minLength": 300}}, "required": ["a"]}
    guided = SamplingParams(temperature=0, max_tokens=200, guided=GuidedDecoding(json_schema=long_string))
    running = iter(engine.add_request([5, 6, 7], guided))
    next(running)  # its masks are filled on the grammar's helper thread now
    pool, stops = engine._grammar._pool, []
    assert pool is not None
    stop = engine._grammar.shutdown

    def stop_and_tell():  # whether a step could still run (the loop thread is on)
        stops.append(engine._thread.is_alive() and threading.current_thread() is not engine._thread)
        stop()

    engine._grammar.shutdown = stop_and_tell
    inside, go = _hold_steps(monkeypatch, engine, "schedule")  # before the step fills its mask
    assert inside.wait(30)

    def block():
        with engine.together():
            queued = engine.add_request([8, 9, 10], SamplingParams(temperature=0, max_tokens=200))
            go.set()
            start = time.monotonic()
            engine.shutdown()
            took = time.monotonic() - start
            with pytest.raises(EngineClosedError, match="create a new LLM"):
                engine.add_request([11, 12], SamplingParams(max_tokens=2))
            assert not engine._thread.is_alive()
        return took, queued

    result = _in_a_thread(block)
    assert result != "hung", "shutdown() inside together() hung"
    assert not isinstance(result, Exception), result
    took, queued = result
    assert took < 10
    for stream in (running, iter(queued)):
        with pytest.raises(EngineClosedError, match="shut down before request .* finished"):
            list(stream)
    assert pool._shutdown and stops and not any(stops)
    stats = llm.stats()
    assert (stats["running"], stats["waiting"]) == (0, 0)
    engine.clear_cache()
    assert llm.stats()["pages_used"] == 0


def test_waiting_inside_together_for_an_output_is_refused(tiny_qwen3):
    """The loop thread takes together()'s lock between steps, so inside the block no output comes
    that is not already on its way: a wait there (a pin(), generate(), reading a stream, sync or
    async, added inside the block or before it) waited forever. It is refused with
    WaitInsideTogetherError and its request aborted, nothing leaked; outputs already delivered
    are still read there."""
    from braid_engine import LLM, WaitInsideTogetherError

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3)
    want = llm.generate([[5, 6, 7]], params)[0].token_ids

    def block():
        errors = []
        done = engine.add_request([5, 6, 7], params)
        while not engine.idle:  # all its outputs delivered, none read (stats() counts no request
            time.sleep(0.01)     # the loop has not yet taken: it can read 0 running, 0 waiting first)
        running = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=500))
        reading = iter(running)  # (kept: a dropped iterator aborts its request)
        next(reading)  # taken by the loop, far from done
        with engine.together():
            for wait in (running.result, lambda: llm.pin([8, 9, 10, 11, 12]),
                         lambda: llm.generate([[5, 6, 7]], params),
                         lambda: engine.add_request([5, 6, 7], params).result(),
                         lambda: asyncio.run(engine.add_request([5, 6, 7], params,
                                                                loop=asyncio.new_event_loop()).aresult())):
                try:
                    wait()
                except WaitInsideTogetherError as e:
                    errors.append(str(e))
            out = done.result()  # delivered already: read inside the block
        return out, errors, running

    result = _in_a_thread(block)
    assert result != "hung", "a wait inside together() hung"
    assert not isinstance(result, Exception), result
    out, errors, running = result
    assert out.token_ids == want
    assert len(errors) == 5 and all("read their results after it" in e for e in errors), errors
    assert llm.generate([[5, 6, 7]], params)[0].token_ids == want  # still serving
    assert running.result().finish_reason == "abort"  # aborted by the refused read
    assert engine.stats()["pages_pinned"] == 0
    engine.clear_cache()
    stats = engine.stats()
    assert (stats["pages_used"], stats["running"], stats["waiting"]) == (0, 0, 0)
    llm.shutdown()


def test_shutdown_returns_at_once_when_the_loop_thread_dies_meanwhile(tiny_qwen3, monkeypatch):
    """shutdown() waits for the loop thread to say it stopped; a thread that dies of a bug while
    it stops (here in ending the unfinished requests) says so too, so shutdown() returns at once
    instead of after its 30 s limit."""
    import threading

    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    engine = llm.engine
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True))
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the bug's traceback, expected

    def broken():
        raise RuntimeError("a bug while stopping")

    monkeypatch.setattr(engine, "_fail_unfinished", broken)
    start = time.perf_counter()
    llm.shutdown()
    assert time.perf_counter() - start < 5
    assert not engine._thread.is_alive()


def test_chat_takes_a_batch_of_conversations(qwen3_llm):
    """As in vLLM, ``chat`` takes a list of conversations too (each a list of messages; it read
    the first conversation as a message without a role): one output each, batched, each as it
    would be alone, with one SamplingParams for all or one each."""
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = [{"role": "user", "content": "Hello there"}]
    second = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    alone = [qwen3_llm.chat(c, greedy)[0].token_ids for c in (first, second)]
    assert [o.token_ids for o in qwen3_llm.chat([first, second], greedy)] == alone
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = qwen3_llm.chat([first, second], [greedy, short])
    assert [o.token_ids for o in outs] == [alone[0], alone[1][:2]]


def _threads(engine, *bodies, seconds=10):
    """Each body on a daemon thread of its own, all started at once: their results (or the errors
    they raised), ``"hung"`` for one still running after ``seconds``. A deadlocked engine's
    shutdown and aborts are made no-ops, and it is taken off the exit hook's list: its LLM's
    finalizer, its streams' and that hook, run later by any collection or at exit, would wait for
    its locks forever too."""
    import threading

    from braid_engine.llm import _LIVE_ENGINES

    boxes = [["hung"] for _ in bodies]

    def run(body, box):
        try:
            box[0] = body()
        except Exception as e:  # noqa: BLE001 - the error is what the test looks at
            box[0] = e

    threads = [threading.Thread(target=run, args=(body, box), daemon=True) for body, box in zip(bodies, boxes)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    results = [box[0] for box in boxes]
    if any(isinstance(r, str) and r == "hung" for r in results):
        _LIVE_ENGINES.discard(engine)
        engine._abort = lambda stream: None
        engine.shutdown = lambda: None
    return results


def _giving_up(stream, how):
    """A callable that gives ``stream``'s request up (read once: it runs, holding pages) from the
    thread that calls it: by id, or by dropping the last reference to its partly read iterator,
    whose ``finally`` aborts it, at once ("dropped") or in a collection of the cycle that holds it
    ("collected"; the caller keeps the collector off until then)."""
    import gc

    reading = iter(stream)
    next(reading)
    if how == "by id":
        kept = reading  # (until the abort: dropped, it would abort the request itself)

        def by_id():
            stream.engine.abort(stream.request_id)
            kept.close()
        return by_id
    box = [reading]
    del reading
    if how == "dropped":
        return box.clear
    box.append(box)
    del box
    return gc.collect


def _ended_by_the_abort(llm, stream):
    """``stream``'s request ended aborted, before its length limit, and every page came back."""
    out = within(stream.result, 30, "hung")
    assert out != "hung" and not isinstance(out, Exception), out
    assert out.finish_reason == "abort" and len(out.token_ids) < 500
    deadline = time.time() + 30
    while not llm.engine.idle and time.time() < deadline:
        time.sleep(0.01)
    stats = llm.stats()
    assert (stats["pages_used"], stats["running"], stats["waiting"]) == (0, 0, 0)
    assert llm.engine.pool.num_free == llm.engine.pool.num_pages


@pytest.mark.parametrize("how", ["by id", "dropped", "collected"])
def test_an_abort_from_a_thread_holding_the_state_lock_does_not_deadlock_with_together(tiny_qwen3, how):
    """A stream's iterator aborts its request in its ``finally``, which runs wherever the iterator
    is dropped or collected: on a thread holding the engine's state lock (inside stats(), or the
    loop thread in a step), the abort waited for together()'s lock, while a block inside
    together() waited in stats() for the state lock: both hung. Now an abort waits for no lock."""
    import gc
    import threading

    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False, page_size=4)
    engine = llm.engine
    stream = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    gc.disable()  # the cycle of "collected" is freed where the test says, not at some allocation
    try:
        give_up = _giving_up(stream, how)
        inside, holding = threading.Event(), threading.Event()

        def stats_inside_together():
            # first the block: the loop then stops before its next step, the request unfinished,
            # and lets the state lock go (stepping back to back, it would keep it from a thread
            # waiting for it until the request ended)
            with engine.together():
                inside.set()
                assert holding.wait(10)
                return engine.stats()

        def hold_the_state_lock():
            assert inside.wait(10)
            with engine._state:
                holding.set()
                give_up()

        block, held = _threads(engine, stats_inside_together, hold_the_state_lock)
    finally:
        gc.enable()
    assert (block, held) != ("hung", "hung"), "the abort and stats() inside together() deadlocked"
    assert isinstance(block, dict) and held is None, (block, held)
    _ended_by_the_abort(llm, stream)
    llm.shutdown()


@pytest.mark.parametrize("how", ["dropped", "collected"])
def test_a_stream_finalized_on_the_loop_thread_mid_step_does_not_deadlock(tiny_qwen3, monkeypatch, how):
    """The loop thread runs a step holding the state lock; a collection it sets off there (or a
    last reference dropped) finalizes an abandoned stream iterator, whose abort waited for
    together()'s lock, held by a block waiting in stats() for that step to end. Now the step goes
    on, stats() returns after it, and the loop ends the request at its next turn."""
    import gc
    import threading

    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False, page_size=4)
    engine = llm.engine
    stream = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
    gc.disable()
    try:
        give_up = _giving_up(stream, how)
        in_step, inside = threading.Event(), threading.Event()
        schedule = engine.scheduler.schedule

        def schedule_after_a_finalizer():
            if not in_step.is_set():
                in_step.set()
                if inside.wait(10):
                    give_up()
            return schedule()

        monkeypatch.setattr(engine.scheduler, "schedule", schedule_after_a_finalizer)

        def stats_inside_together():
            assert in_step.wait(10)
            with engine.together():
                inside.set()
                return engine.stats()

        (block,) = _threads(engine, stats_inside_together)
    finally:
        gc.enable()
    assert block != "hung", "a stream finalized mid-step deadlocked the loop with stats() inside together()"
    assert isinstance(block, dict), block
    _ended_by_the_abort(llm, stream)
    llm.shutdown()


def test_an_abort_while_the_loop_sleeps_and_together_holds_its_lock_is_taken(tiny_qwen3):
    """A request added inside together() while the loop thread sleeps, aborted by id meanwhile
    from a thread holding the state lock (which a stats() in the block waits for): the abort
    returns at once, without together()'s lock, and the loop, woken by the request, takes both
    in one turn, so the request ends aborted before any step computes it."""
    import threading

    from braid_engine import LLM

    llm = LLM(tiny_qwen3, device="cpu", enable_prefix_caching=False, page_size=4)
    engine = llm.engine
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))
    deadline = time.time() + 30
    while not engine.idle and time.time() < deadline:  # the loop thread sleeps now
        time.sleep(0.01)
    before = llm.stats()
    holding, added, streams = threading.Event(), threading.Event(), []

    def abort_under_the_state_lock():
        with engine._state:
            holding.set()
            assert added.wait(10)
            engine.abort("late")

    def add_inside_together():
        assert holding.wait(10)
        with engine.together():
            streams.append(engine.add_request(
                [8, 9, 10], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True), request_id="late"))
            added.set()
            return engine.stats()

    held, block = _threads(engine, abort_under_the_state_lock, add_inside_together)
    assert (held, block) != ("hung", "hung"), "abort() and stats() inside together() deadlocked"
    assert held is None and isinstance(block, dict), (held, block)
    assert block["waiting"] == 1
    _ended_by_the_abort(llm, streams[0])
    out = streams[0].result()
    assert out.token_ids == [] and llm.stats()["prefilled_tokens"] == before["prefilled_tokens"]
    llm.shutdown()
