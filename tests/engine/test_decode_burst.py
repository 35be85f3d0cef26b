"""Decode bursts: several decode steps run back to back, each feeding its tokens (greedy or
drawn) to the next on the device, read by the host once. They must never change an output, a stop inside a burst
must drop the steps after it, and the pages and prefix cache must end as without bursts.
Likewise with ``pipeline_bursts``, where the next burst is launched before the host reads the
last one's tokens and a sequence that stopped in the last one drops its share of the next."""

import pytest

from braid_engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def stepwise(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", page_size=16, decode_burst=1, enable_prefix_caching=False)
    yield llm
    llm.shutdown()


def _prompts():
    # lengths put the first decoded position at different offsets inside a page
    return [[(11 * i + 5 * j) % 400 + 3 for j in range(n)] for i, n in enumerate((5, 16, 17, 30, 9))]


def _bursting(path, pipeline=False, **kw):
    return LLM(path, device="cpu", page_size=16, decode_burst=8, pipeline_bursts=pipeline, **kw)


def test_bursts_pipeline_only_with_cuda_graphs_by_default(tiny_qwen3):
    """'auto' (the default) pipelines where CUDA graphs queue the bursts on a GPU; on the CPU the
    host computes each burst itself, so there is nothing to overlap."""
    llm = LLM(tiny_qwen3, device="cpu")
    try:
        assert llm.engine.config.pipeline_bursts is False
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        assert llm.stats()["pipelined_bursts"] == 0 and llm.stats()["decode_bursts"] >= 1
    finally:
        llm.shutdown()


@pytest.mark.parametrize("bad", [None, 1, "on", "Auto"])
def test_a_bad_pipeline_setting_is_refused(tiny_qwen3, bad):
    with pytest.raises(ValueError, match="pipeline_bursts must be 'auto', True or False"):
        LLM(tiny_qwen3, device="cpu", pipeline_bursts=bad)


def _run(llm, prompts, params, final_only=False):
    with llm.engine.together():
        streams = [llm.engine.add_request(p, q, final_only=final_only) for p, q in zip(prompts, params, strict=True)]
    return [s.result() for s in streams]


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("final_only", [False, True])
def test_bursts_match_single_steps_and_a_stop_inside_a_burst_drops_the_rest(tiny_qwen3, stepwise, final_only,
                                                                            pipeline):
    """Streams take a burst's tokens one by one; callers that want only the result (generate)
    take each sequence's column in bulk — both must end exactly as single steps do."""
    prompts = _prompts()
    free = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * len(prompts)
    ref = _run(stepwise, prompts, free)
    # each request stops on the token it emits at a different step, mostly mid-burst
    stop = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                           stop_token_ids=[r.token_ids[3 + 4 * i]]) for i, r in enumerate(ref)]
    ref_stop = _run(stepwise, prompts, stop)
    assert any(len(r.token_ids) < 40 for r in ref_stop), "no request stopped early; pick other stops"
    # a length limit before the stop token; one on the stop token itself (the stop wins); stops
    # well inside the limit
    firsts = [next(j for j in range(6, 40) if r.token_ids[j] not in r.token_ids[:j]) for r in ref]
    tight = [SamplingParams(temperature=0, max_tokens=j + (0, 1, 5, 5, 5)[i], ignore_eos=True,
                            stop_token_ids=[ref[i].token_ids[j]]) for i, j in enumerate(firsts)]
    ref_tight = _run(stepwise, prompts, tight)
    assert [r.finish_reason for r in ref_tight] == ["length"] + ["stop"] * 4
    assert [len(r.token_ids) for r in ref_tight] == [firsts[0]] + [j + 1 for j in firsts[1:]]
    assert stepwise.stats()["decode_bursts"] == 0

    llm = _bursting(tiny_qwen3, pipeline)
    quiet = llm.engine._append_quiet
    bulk = []
    llm.engine._append_quiet = lambda seq, column, *a: bulk.append(len(column)) or quiet(seq, column, *a)
    try:
        for params, expect in ((free, ref), (stop, ref_stop), (tight, ref_tight)):
            outs = _run(llm, prompts, params, final_only)
            assert [o.token_ids for o in outs] == [r.token_ids for r in expect]
            assert [o.text for o in outs] == [r.text for r in expect]
            assert [o.finish_reason for o in outs] == [r.finish_reason for r in expect]
        stats = llm.stats()
        assert stats["decode_bursts"] > 0
        assert (stats["pipelined_bursts"] > 0) == pipeline
        assert bool(bulk) == final_only
        # every computed token was counted once: the dropped steps after a stop are not
        assert stats["decoded_tokens"] == sum(len(o.token_ids) - 1 for o in ref + ref_stop + ref_tight)
        # the retained answers are exact: continuing each conversation reuses them
        follow = [p + r.token_ids[:-1] + [7, 8] for p, r in zip(prompts, ref_stop, strict=True)]
        params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * len(follow)
        before = llm.stats()["reused_tokens"]
        assert [o.token_ids for o in _run(llm, follow, params)] == \
            [o.token_ids for o in _run(stepwise, follow, params)]
        assert llm.stats()["reused_tokens"] - before >= sum(len(f) - 2 for f in follow)
        llm.engine.clear_cache()
        assert llm.stats()["pages_used"] == 0
        assert llm.engine.pool.num_free == llm.config.num_pages
    finally:
        llm.shutdown()


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_burst_never_crosses_a_page_or_the_length_limit(tiny_qwen3, stepwise, pipeline):
    llm = _bursting(tiny_qwen3, pipeline)
    seen = []
    launch_burst = llm.engine.runner.launch_burst

    def spy(batch, steps, after=None):
        ahead = 0 if after is None else after.steps  # a follow-up starts where ``after`` will end
        for seq, _ in batch:
            first, last = seq.num_computed + ahead, seq.num_computed + ahead + steps - 1
            seen.append(steps)
            assert first // 16 == last // 16, f"positions {first}..{last} cross a page"
            assert len(seq) + ahead + steps - 1 <= seq.max_len
            assert len(seq.page_table) > last // 16  # its page reserved
        return launch_burst(batch, steps, after)

    llm.engine.runner.launch_burst = spy
    try:
        prompt = [5, 6, 7, 8, 9, 10, 11]
        params = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
        out = llm.generate([prompt], params)[0]
        assert out.token_ids == stepwise.generate([prompt], params)[0].token_ids
        assert len(out.token_ids) == 29
        # 29 tokens from position 7: the prefill samples one, then a burst of 8 to the page's end,
        # one single step (position 15; pipelined, a burst of 1 after the first), and bursts of
        # 8, 8 and the last 3
        assert seen == ([8, 1, 8, 8, 3] if pipeline else [8, 8, 8, 3]), seen
        assert llm.stats()["pipelined_bursts"] == (4 if pipeline else 0)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("final_only", [False, True])
def test_sampled_requests_burst_and_draw_the_tokens_of_single_steps(tiny_qwen3, stepwise, final_only, pipeline):
    """Sampled requests decode in bursts too, each step's tokens drawn on the device and fed to
    the next: a seeded request draws from its generator step by step as single steps do, so
    its tokens are the same, beside greedy rows and others' filters, with a stop mid-burst."""
    prompts = _prompts()
    settings = [dict(temperature=0.8, seed=1), dict(temperature=0), dict(temperature=1.2, top_k=20, seed=2),
                dict(temperature=0.7, top_p=0.9, seed=3), dict(temperature=1.0, min_p=0.05, top_k=50, seed=4)]
    free = [SamplingParams(max_tokens=30, ignore_eos=True, **kw) for kw in settings]
    ref = _run(stepwise, prompts, free)
    greedy = _run(stepwise, prompts, [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 5)
    assert sum(r.token_ids != g.token_ids for r, g in zip(ref, greedy)) >= 3  # they were drawn
    stop = [SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[r.token_ids[5 + 3 * i]], **kw)
            for i, (r, kw) in enumerate(zip(ref, settings))]
    ref_stop = _run(stepwise, prompts, stop)
    assert stepwise.stats()["decode_bursts"] == 0
    llm = _bursting(tiny_qwen3, pipeline, enable_prefix_caching=False)
    try:
        for params, expect in ((free, ref), (stop, ref_stop)):
            outs = _run(llm, prompts, params, final_only)
            assert [o.token_ids for o in outs] == [r.token_ids for r in expect]
            assert [o.finish_reason for o in outs] == [r.finish_reason for r in expect]
        stats = llm.stats()
        assert stats["decode_bursts"] > 0 and (stats["pipelined_bursts"] > 0) == pipeline
        assert stats["pages_used"] == 0
    finally:
        llm.shutdown()


def test_guided_and_waiting_requests_take_single_steps(tiny_qwen3):
    """A grammar's mask is filled on the host between steps: a guided request decodes step by step."""
    from braid_engine import GuidedDecoding

    llm = LLM(tiny_qwen3, device="cpu", page_size=16, decode_burst=8)
    try:
        llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=12, guided=GuidedDecoding(json_object=True)))
        assert llm.stats()["decode_bursts"] == 0
        llm.generate([[3, 4, 5]], SamplingParams(temperature=0.8, seed=1, max_tokens=20, ignore_eos=True))
        assert llm.stats()["decode_bursts"] > 0
    finally:
        llm.shutdown()


def test_requests_of_one_generate_call_prefill_in_one_step(tiny_qwen3):
    llm = LLM(tiny_qwen3, device="cpu", page_size=16)
    try:
        llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=1))
        assert llm.stats()["steps"] == 1
    finally:
        llm.shutdown()


def test_a_full_batch_keeps_bursting_while_others_wait(tiny_qwen3):
    """Waiting requests stop bursts only when they could join; with max_num_seqs running they
    cannot, and the running ones keep bursting."""
    llm = LLM(tiny_qwen3, device="cpu", page_size=16, decode_burst=8, max_num_seqs=2)
    waiting_during_bursts = []
    run_burst = llm.engine._run_burst

    def spy(batch, steps):
        waiting_during_bursts.append(len(llm.engine.scheduler.waiting))
        return run_burst(batch, steps)

    llm.engine._run_burst = spy
    try:
        outs = llm.generate(_prompts()[:3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        assert 1 in waiting_during_bursts  # the third request waited while the first two burst
        single = LLM(tiny_qwen3, device="cpu", page_size=16, decode_burst=1, max_num_seqs=2)
        try:
            ref = single.generate(_prompts()[:3], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        finally:
            single.shutdown()
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_decode_burst_must_be_a_positive_int(tiny_qwen3, bad):
    with pytest.raises(ValueError, match="decode_burst must be an int"):
        LLM(tiny_qwen3, device="cpu", decode_burst=bad)


def test_a_stop_token_on_the_length_limit_inside_a_burst_is_a_stop(tiny_qwen3, stepwise):
    """generate() takes a burst's tokens in bulk; where the stop token is also the last allowed
    token, the result must say "stop", as single steps do (stop tokens are checked first)."""
    llm = LLM(tiny_qwen3, device="cpu", page_size=16, decode_burst=8, enable_prefix_caching=False)
    try:
        prompt = [5, 6, 7, 8, 9, 10, 11]  # output 0 from the prefill, 1-8 a burst, 9 alone, 10-17 a burst
        free = stepwise.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
        j = next(j for j in range(11, 17) if free.token_ids[j] not in free.token_ids[:j])
        bursts = llm.stats()["decode_bursts"]
        for limit, reason in ((j + 1, "stop"), (j, "length")):
            params = SamplingParams(temperature=0, max_tokens=limit, ignore_eos=True,
                                    stop_token_ids=[free.token_ids[j]])
            out = llm.generate([prompt], params)[0]
            ref = stepwise.generate([prompt], params)[0]
            assert (out.finish_reason, out.token_ids, out.text) == (reason, free.token_ids[:limit], ref.text)
            assert ref.finish_reason == reason
        assert llm.stats()["decode_bursts"] - bursts >= 3  # the stop-and-limit token ends a burst of ≥ 2
    finally:
        llm.shutdown()


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("final_only", [False, True])
def test_requests_finish_in_the_order_single_steps_finish_them(tiny_qwen3, stepwise, final_only, pipeline):
    """The prefix cache takes a finished answer when it finishes; inside a burst the finishes
    must come step by step in batch order, as single steps make them, also when results are
    taken in bulk."""
    prompts = _prompts()
    free = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * len(prompts)
    ref = _run(stepwise, prompts, free)
    # stops at steps 6, 3, 6, 2 and 5 of one burst (tokens 9-16 after the prefill's first)
    stop = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                           stop_token_ids=[r.token_ids[j]]) for r, j in zip(ref, (14, 11, 14, 10, 13), strict=True)]
    llm = _bursting(tiny_qwen3, pipeline, enable_prefix_caching=False)
    orders = []
    try:
        for engine in (stepwise, llm):
            order = []
            finish = engine.engine._finish
            engine.engine._finish = lambda seq, reason, order=order, finish=finish: (
                order.append(prompts.index(seq.prompt_token_ids)), finish(seq, reason))
            try:
                outs = _run(engine, prompts, stop, final_only)
            finally:
                engine.engine._finish = finish
            orders.append((order, [o.token_ids for o in outs]))
        assert orders[0] == orders[1]
        assert len(set(len(o) for o in orders[0][1])) > 2  # the requests stopped at different steps
    finally:
        llm.shutdown()


def test_pipelined_bursts_in_a_pool_too_small_for_every_follow_up(tiny_qwen3, stepwise):
    """A follow-up burst reserves its sequences' next pages before it launches; where the pool is
    short it is not launched (and nothing is preempted for it): the step is scheduled as usual.
    Same tokens, and every page back at the end."""
    llm = _bursting(tiny_qwen3, True, num_pages=14, enable_prefix_caching=False)
    refused = []
    follow = llm.engine._follow
    reserve = llm.engine.scheduler._reserve

    def spy(burst):
        llm.engine.scheduler._reserve = lambda seq, n: reserve(seq, n) or refused.append(n) or False
        try:
            return follow(burst)
        finally:
            llm.engine.scheduler._reserve = reserve

    llm.engine._follow = spy
    try:
        prompts = _prompts()
        params = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)] * len(prompts)
        out = _run(llm, prompts, params)
        assert [o.token_ids for o in out] == [r.token_ids for r in _run(stepwise, prompts, params)]
        stats = llm.stats()
        assert refused and stats["pipelined_bursts"] > 0
        assert stats["pages_used"] == 0 and llm.engine.pool.num_free == llm.config.num_pages
    finally:
        llm.shutdown()


def test_a_pipelined_chain_ends_after_a_few_bursts(tiny_qwen3, stepwise):
    """One step chains at most PIPELINE_CHAIN follow-ups: the engine's state lock (stats, cache
    control, shutdown) is given up every few bursts, even for one long greedy request."""
    from braid_engine.engine.engine import PIPELINE_CHAIN

    llm = _bursting(tiny_qwen3, True, enable_prefix_caching=False)
    chains = []
    run_burst, take = llm.engine._run_burst, llm.engine._take_burst

    def counted_run(batch, steps):
        chains.append(0)
        return run_burst(batch, steps)

    def counted_take(burst, scheduled):
        chains[-1] += 1
        return take(burst, scheduled)

    llm.engine._run_burst, llm.engine._take_burst = counted_run, counted_take
    try:
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        prompt = [5, 6, 7, 8, 9, 10, 11]
        assert llm.generate([prompt], params)[0].token_ids == stepwise.generate([prompt], params)[0].token_ids
        assert max(chains) == PIPELINE_CHAIN + 1 and len(chains) >= 2, chains
    finally:
        llm.shutdown()


def test_streams_closed_mid_chain_give_back_every_page(tiny_qwen3):
    """Closing a stream aborts its request; with pipelined bursts the abort stops the chain, the
    request's tokens computed ahead are dropped, and the others go on with theirs."""
    llm = _bursting(tiny_qwen3, True, enable_prefix_caching=False)
    try:
        params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
        prompts = _prompts()[:3]
        ref = [o.token_ids for o in llm.generate(prompts, params)]
        streams = [llm.stream(p, params) for p in prompts]
        got = [[], [], []]
        for k, s in enumerate(streams):
            got[k] += next(s).token_ids
        while len(got[1]) < 20:
            got[1] += next(streams[1]).token_ids
        streams[1].close()  # abort mid-generation
        for k in (0, 2):
            for delta in streams[k]:
                got[k] += delta.token_ids
        assert got[0] == ref[0] and got[2] == ref[2]
        assert got[1] == ref[1][:len(got[1])]
        stats = llm.stats()
        assert stats["pipelined_bursts"] > 0 and stats["running"] == 0
        assert stats["pages_used"] == 0 and llm.engine.pool.num_free == llm.config.num_pages
    finally:
        llm.shutdown()
