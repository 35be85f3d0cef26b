"""Decode CUDA graphs (GPU only): the same tokens as eager FlashInfer decode, padding included."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from braid_engine import LLM, SamplingParams  # noqa: E402
from braid_engine.testing import forward_logits, make_tiny_checkpoint  # noqa: E402

# a token may differ between two bf16 computations only where the top two logits are this close.
# This model's logits (std ~5, up to ~20) move by up to 0.59 (mean 0.09) between bf16 and fp32
# (CPU, torch path, a 308-token prompt's last 20 positions): two bf16 engines that round apart
# (graphs' split-KV plans and cascade twins against eager plans) can flip a top two 0.3 apart,
# as the cascade-twin test below did at token 11 once fresh prompts attended their own k/v
# (which changes the prefix's roundings in both engines alike; through the pages: no flip)
NEAR_TIE = 0.5


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("graphs"), arch="qwen3", num_hidden_layers=4,
                                hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=64)
    kw = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer", max_num_seqs=16)
    # prefill graphs up to 256 rows (the default is 8,192): longer prompts and histories here
    # are prefilled eagerly in both engines; long_graphs below takes them through graphs
    graphed = LLM(path, cuda_graphs=True, prefill_graph_tokens=256, **kw)
    eager = LLM(path, cuda_graphs=False, **kw)
    yield graphed, eager
    graphed.shutdown()
    eager.shutdown()


@pytest.mark.parametrize("batch", [1, 3, 5, 16])
def test_graphs_give_the_eager_tokens(engines, batch):
    graphed, eager = engines
    assert sorted(graphed.engine.runner.graphs) == [1, 2, 4, 8, 16]
    assert sorted(graphed.engine.runner.prefill_graphs) == [16, 32, 64, 128, 256]
    assert not eager.engine.runner.graphs
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist()
               for n in torch.randint(5, 90, (batch,), generator=gen)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    before = graphed.engine.runner.graph_replays
    a = [o.token_ids for o in graphed.generate(prompts, params)]
    b = [o.token_ids for o in eager.generate(prompts, params)]
    assert graphed.engine.runner.graph_replays - before >= 20
    assert a == b


def test_penalized_requests_burst_in_the_graphs_with_the_eager_tokens(engines):
    """A batch holding a penalized request decodes in bursts of graph replays, its draws op by op
    (no draw graph), the penalties applied to a float32 copy of the graph's logits and each
    step's tokens counted on the device: the eager engine's tokens, and other tokens than
    without the penalties. ``penalize`` on CUDA: the repetition penalty is
    transformers' processor's there, bit for bit (CUDA divides by a number as a multiplication by
    its reciprocal, the CPU does not: the two differ in the last place), the rest the CPU's."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from braid_engine.sampling import penalize

    graphed, eager = engines
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist() for n in (20, 45, 70)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, **kw)
              for kw in (dict(repetition_penalty=1.5, presence_penalty=0.5), dict(),
                         dict(frequency_penalty=1.0))]
    runner = graphed.engine.runner
    bursts, replays, captures = graphed.stats()["decode_bursts"], runner.graph_replays, runner.draw_captures
    a = [o.token_ids for o in graphed.generate(prompts, params)]
    assert graphed.stats()["decode_bursts"] > bursts and runner.graph_replays - replays >= 20
    assert runner.draw_captures == captures
    assert a == [o.token_ids for o in eager.generate(prompts, params)]
    plain = graphed.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert a[1] == plain[1].token_ids and a[0] != plain[0].token_ids and a[2] != plain[2].token_ids
    logits = torch.randn(3, 5000, generator=gen) * 3
    outs = [torch.randint(0, 50, (30,), generator=gen).tolist() for _ in range(3)]
    cpu, cuda = logits.clone(), logits.cuda()
    penalize(cpu, params, prompts, outs)
    penalize(cuda, params, prompts, outs)
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=1e-6)
    assert not torch.equal(cpu, logits)
    alone = logits[:1].cuda()
    penalize(alone, [SamplingParams(repetition_penalty=1.5)], prompts[:1], outs[:1])
    ids = torch.tensor([prompts[0] + outs[0]], device="cuda")
    assert torch.equal(alone, RepetitionPenaltyLogitsProcessor(1.5)(ids, logits[:1].cuda()))


def test_logprobs_in_bursts_are_those_of_single_graph_steps(engines):
    """Requests asking for log-probabilities decode in bursts of graph replays, their draws op by
    op (no draw graph), each step's log-probabilities ranked on the device and copied to the host
    with the burst's tokens: the entries of the same graphs replayed a step at a time."""
    graphed, _ = engines
    stepwise = LLM(graphed.model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                   max_num_seqs=16, cuda_graphs=True, prefill_graph_tokens=256, decode_burst=1)
    runner = graphed.engine.runner
    try:
        gen = torch.Generator().manual_seed(21)
        prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist() for n in (15, 50, 33)]
        params = [SamplingParams(max_tokens=24, ignore_eos=True, enable_prefix_caching=False, **kw)
                  for kw in (dict(temperature=0, logprobs=3), dict(temperature=0.7, seed=2),
                             dict(temperature=0.9, seed=4, top_k=20, top_p=0.9, logprobs=1))]
        bursts, captures = graphed.stats()["decode_bursts"], runner.draw_captures
        got = graphed.generate(prompts, params)
        assert graphed.stats()["decode_bursts"] > bursts and runner.draw_captures == captures
        want = stepwise.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert [o.logprobs for o in got] == [o.logprobs for o in want]
        assert got[1].logprobs is None and len(got[0].logprobs) == len(got[2].logprobs) == 24
    finally:
        stepwise.shutdown()


def _agree_up_to_near_tie(eager, prompt: list[int], out: list[int], ref: list[int]) -> int | None:
    """Index where two greedy continuations part (None if they do not); they may part only
    where the eager model's top two logits are within NEAR_TIE."""
    part = next((i for i, (a, b) in enumerate(zip(out, ref, strict=True)) if a != b), None)
    if part is not None:
        top2 = forward_logits(eager, prompt + ref[:part])[-1].topk(2).values
        gap = (top2[0] - top2[1]).item()
        print(f"graphs and eager part at token {part} (eager top-2 gap there {gap:.4f})")
        assert gap < NEAR_TIE, f"graphs and eager diverged at token {part} without a near-tie"
    return part


def test_graphs_and_prefix_cache_continue_a_conversation(engines):
    """Both engines reuse their cache the same way, so only the graphs differ. In bf16 they may
    still round apart: a graph's decode plan always splits the keys and merges the parts, an
    eager plan does not split short sequences (~1 bf16 unit in some outputs). So the tokens must
    agree up to a near-tie of the eager model's logits, and the turns up to it reuse the same
    number of tokens. (Exactness of reuse itself is the fp32 CPU suite's job.)"""
    graphed, eager = engines
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = list(range(10, 60))
    for _ in range(3):
        out = graphed.generate([prompt], params)[0]
        ref = eager.generate([prompt], params)[0]
        assert out.num_cached_tokens == ref.num_cached_tokens
        if _agree_up_to_near_tie(eager, prompt, out.token_ids, ref.token_ids) is not None:
            break  # the caches now hold different answers
        prompt = prompt + out.token_ids + [7, 8, 9]
    else:
        assert out.num_cached_tokens > 0


def test_graphs_plan_requests_that_share_a_long_prefix(engines):
    """Sequences sharing a prefix each list its pages: a decode step's page indices outnumber
    the pool's pages (here 8 × 39 against 80), which the graphs' index buffers must hold."""
    path = engines[0].model_path
    kw = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer", max_num_seqs=16,
              num_pages=80, cascade="never")
    # the 600-token prefix prefilled eagerly in both engines, as in the fixture: through a
    # 1,024-row graph its KV differs from the eager prefill's by bf16 rounding, which then
    # moves some greedy tokens; the long graphs have tests of their own below
    graphed = LLM(path, cuda_graphs=True, prefill_graph_tokens=256, **kw)
    eager = LLM(path, cuda_graphs=False, **kw)
    try:
        prefix = [(7 * i) % 390 + 3 for i in range(600)]
        prompts = [prefix + [100 + i] for i in range(8)]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        for llm in (graphed, eager):
            llm.generate([prefix], SamplingParams(temperature=0, max_tokens=1))  # cache the prefix
        before = graphed.engine.runner.graph_replays
        outs = graphed.generate(prompts, params)
        refs = eager.generate(prompts, params)
        assert graphed.engine.runner.graph_replays - before >= 7
        for prompt, out, ref in zip(prompts, outs, refs, strict=True):
            assert out.num_cached_tokens == ref.num_cached_tokens >= 592
            _agree_up_to_near_tie(eager, prompt, out.token_ids, ref.token_ids)
    finally:
        graphed.shutdown()
        eager.shutdown()


@pytest.fixture(scope="module", params=[None, 512], ids=["fa2", "fa3-from-512"])
def long_graphs(engines, request):
    """Prefill graphs up to 2,048 rows, all on fa2 or (FlashInferBackend.fa3_prefill_graph_rows)
    those of 512 rows and more on FlashInfer's default backend."""
    from braid_engine.attention.flashinfer_backend import FlashInferBackend

    default = FlashInferBackend.fa3_prefill_graph_rows
    FlashInferBackend.fa3_prefill_graph_rows = request.param
    try:
        llm = LLM(engines[0].model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                  max_num_seqs=16, cuda_graphs=True, prefill_graph_tokens=2048)
    finally:
        FlashInferBackend.fa3_prefill_graph_rows = default
    backends = {t: w._backend for t, w in llm.engine.runner.backend._graph_prefill.items()}
    assert (backends[2048] != "fa2") == (request.param is not None and torch.cuda.get_device_capability()[0] == 9)
    assert backends[256] == "fa2"
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("cached,new", [(0, 300), (0, 383), (0, 1024), (0, 1535), (0, 2000), (0, 2048),
                                        (300, 383), (300, 700), (300, 1500)])
def test_long_prefills_replay_graphs_in_pieces(engines, long_graphs, cached, new):
    """With prefill graphs up to 2,048 rows a long prompt is taken in graph-sized pieces, each
    attending the keys of the pieces before it (and of a cached history); 383 new tokens are
    256 + 127 rows, 1,024 or 2,048 fill their graph with no padding. Eagerly the same prompt is one fa3 pass, so bf16 may
    round apart: the tokens must agree up to a near-tie."""
    from braid_engine.engine.model_runner import prefill_pieces

    eager, graphed = engines[1], long_graphs
    assert graphed.engine.runner.prefill_sizes[-1] == 2048
    g = torch.Generator().manual_seed(7 * cached + new)
    history = torch.randint(3, 400, (cached,), generator=g).tolist()
    # the eager engine saw this prompt in the other fixture's round; whether it still holds it
    # depends on the pool size free memory gave it: both start without it
    for llm in (graphed, eager):
        llm.engine.clear_cache()
    for llm in (graphed, eager) if cached else ():
        llm.generate([history], SamplingParams(temperature=0, max_tokens=1))
    prompt = history + torch.randint(3, 400, (new,), generator=g).tolist()
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    before = graphed.engine.runner.prefill_replays
    a = graphed.generate([prompt], params)[0]
    b = eager.generate([prompt], params)[0]
    assert a.num_cached_tokens == b.num_cached_tokens
    assert a.num_cached_tokens >= cached - 16
    pieces = prefill_pieces(len(prompt) - a.num_cached_tokens, graphed.engine.runner.prefill_sizes)
    assert graphed.engine.runner.prefill_replays - before == len(pieces)
    _agree_up_to_near_tie(eager, prompt, a.token_ids, b.token_ids)


@pytest.mark.parametrize("new_tokens", [2, 15, 16, 17, 100, 255, 256])
def test_prefill_graphs_give_the_eager_first_token_after_a_cached_history(engines, new_tokens):
    graphed, eager = engines
    history = list(range(100, 400))
    one = SamplingParams(temperature=0, max_tokens=1)
    for llm in engines:
        llm.generate([history], one)
    prompt = history + [(7 * i + new_tokens) % 300 + 3 for i in range(new_tokens)]  # no case extends another
    before = graphed.engine.runner.prefill_replays
    a = graphed.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    b = eager.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert graphed.engine.runner.prefill_replays - before == 1
    assert a.num_cached_tokens == b.num_cached_tokens >= 288
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("requests", [3, 6])
def test_decode_bursts_replay_the_graph_with_the_tokens_of_single_steps(engines, requests):
    """A burst replays one plan for up to a page of steps, moving only the last page's fill and
    feeding each argmax to the next step on the device; it must give the tokens of planning and
    reading every step, also when a request stops inside a burst. (Requests of one call join
    one batch: in bf16 a prompt prefilled in another batch composition rounds differently.)
    Three requests replay the graph of 4 (our split-KV decode kernel, kv lengths moved by
    set_graph_fill), six the graph of 8 (FlashInfer's decode)."""
    graphed, _ = engines
    stepwise = LLM(graphed.model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                   max_num_seqs=16, cuda_graphs=True, decode_burst=1)
    try:
        gen = torch.Generator().manual_seed(7)
        prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist()
                   for n in torch.randint(5, 90, (requests,), generator=gen)]
        free = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, enable_prefix_caching=False)
        ref = stepwise.generate(prompts, free)
        bursts, replays = graphed.stats()["decode_bursts"], graphed.engine.runner.graph_replays
        out = graphed.generate(prompts, free)
        assert [o.token_ids for o in out] == [r.token_ids for r in ref]
        assert graphed.stats()["decode_bursts"] > bursts
        assert graphed.engine.runner.graph_replays - replays >= 40
        # one request stops mid-burst; the batch stays in its graph either way (a burst
        # keeps its batch to its end, single steps shrink it: another graph rounds otherwise)
        stops = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, enable_prefix_caching=False,
                                stop_token_ids=[r.token_ids[13]] if i == 2 else None) for i, r in enumerate(ref)]
        # each engine takes the requests in one batch, so both compute the same kernels
        with graphed.engine.together():
            a = [graphed.engine.add_request(p, s) for p, s in zip(prompts, stops, strict=True)]
        with stepwise.engine.together():
            b = [stepwise.engine.add_request(p, s) for p, s in zip(prompts, stops, strict=True)]
        assert [s.result().token_ids for s in a] == [s.result().token_ids for s in b]
        graphed.engine.clear_cache()
        assert graphed.stats()["pages_used"] == 0
    finally:
        stepwise.shutdown()


def test_cascade_twins_keep_a_shared_prefix_in_the_decode_graphs(engines, monkeypatch):
    """With cascade twins (FlashInferBackend.cascade_graph_batch), requests sharing a cached
    prefix decode from graphs with the prefix attended once, and give the eager tokens."""
    from braid_engine.attention.flashinfer_backend import FlashInferBackend

    monkeypatch.setattr(FlashInferBackend, "cascade_graph_batch", 8)
    # batches of 8 and less decode through our split-KV kernel, which takes no cascade (and gets no
    # twin): 4 keeps batch 8 on FlashInfer's decode, with its twin
    monkeypatch.setattr(FlashInferBackend, "small_decode_batch", 4)
    graphed = LLM(engines[0].model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                  max_num_seqs=16, cuda_graphs=True, cascade="always", prefill_graph_tokens=256,
                  pipeline_bursts=False)
    eager = engines[1]
    try:
        runner, backend = graphed.engine.runner, graphed.engine.runner.backend
        assert sorted(runner.cascade_graphs) == [8, 16]
        prefix = [(5 * i) % 390 + 3 for i in range(300)]
        for llm in (graphed, eager):
            llm.generate([prefix], SamplingParams(temperature=0, max_tokens=1))  # the prefix, cached
        prompts = [prefix + [(11 * i + 7 * j) % 390 + 3 for j in range(5 + i)] for i in range(10)]
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        twins, cascaded = runner.cascade_replays, backend.cascade_steps
        a = graphed.generate(prompts, params)
        b = eager.generate(prompts, params)
        assert runner.cascade_replays - twins >= 15 - 1  # decode from the twin of 16 (the first token is the prefill's)
        assert backend.cascade_steps - cascaded >= 15  # every twin step counted, and the cascaded prefill
        for prompt, x, y in zip(prompts, a, b, strict=True):
            assert x.num_cached_tokens >= 288
            _agree_up_to_near_tie(eager, prompt, x.token_ids, y.token_ids)
        # pipelined bursts (the default with graphs) planning the twin for each follow-up, from
        # the same cache state: the same tokens
        piped = LLM(engines[0].model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                    max_num_seqs=16, cuda_graphs=True, cascade="always", prefill_graph_tokens=256)
        try:
            assert piped.engine.config.pipeline_bursts is True
            piped.generate([prefix], SamplingParams(temperature=0, max_tokens=1))
            twins = piped.engine.runner.cascade_replays
            c = piped.generate(prompts, params)
            assert [x.token_ids for x in c] == [x.token_ids for x in a]
            assert piped.stats()["pipelined_bursts"] >= 1
            assert piped.engine.runner.cascade_replays - twins >= 15 - 1
        finally:
            piped.shutdown()
    finally:
        graphed.shutdown()


def test_prompt_chunks_interleaved_with_decodes_replay_the_prefill_graphs(engines):
    """prefill_chunk_while_decoding: while three requests decode, a 600-token prompt advances 64
    tokens a step through the prefill graphs (chunks that sample nothing included) in a forward
    of its own; every request's tokens agree with the eager engine's up to a near-tie."""
    graphed = LLM(engines[0].model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                  max_num_seqs=16, cuda_graphs=True, prefill_graph_tokens=256, max_num_batched_tokens=256,
                  enable_prefix_caching=False, prefill_chunk_while_decoding=64)
    try:
        prompts = [[(7 * i + 3 * k) % 390 + 3 for i in range(10 + k)] for k in range(3)]
        prompts.append([(11 * i) % 390 + 3 for i in range(600)])
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        before = graphed.engine.runner.prefill_replays
        outs = graphed.generate(prompts, params)
        refs = engines[1].generate(prompts, params)
        assert graphed.stats()["split_steps"] >= 5
        assert graphed.engine.runner.prefill_replays - before >= 5  # the 64-token chunks, through graphs
        for prompt, out, ref in zip(prompts, outs, refs, strict=True):
            _agree_up_to_near_tie(engines[1], prompt, out.token_ids, ref.token_ids)
    finally:
        graphed.shutdown()


def test_graphed_engines_chunk_prompts_while_decoding_by_default(engines, monkeypatch):
    """prefill_chunk_while_decoding="auto" (the default) is 2,048 tokens where graphs run: a prompt
    that arrives while two requests decode is prefilled in a forward of its own, through the
    same prefill graphs as on the idle engine, so the logits of its first token are the idle
    engine's, bit for bit."""
    from braid_engine.engine import engine as engine_module
    from braid_engine.llm import AUTO_PREFILL_CHUNK_WHILE_DECODING

    graphed = LLM(engines[0].model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                  max_num_seqs=16, cuda_graphs=True, prefill_graph_tokens=256, enable_prefix_caching=False)
    long = [(11 * i) % 390 + 3 for i in range(200)]  # one piece: the 256-row graph
    first_logits = []  # the long prompt's first-token logits, each time it is sampled
    sample = engine_module.sample

    def spy(logits, params, generators, *args):
        # each request keeps a copy of its parameters: the long prompt's are the ones asking for one token
        first_logits.extend(logits[i].clone() for i, p in enumerate(params) if p.max_tokens == 1)
        return sample(logits, params, generators, *args)

    monkeypatch.setattr(engine_module, "sample", spy)
    once = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    try:
        assert graphed.config.prefill_chunk_while_decoding == AUTO_PREFILL_CHUNK_WHILE_DECODING == 2048
        idle = graphed.generate([long], once)[0].token_ids
        streams = [graphed.stream([(5 * i + k) % 390 + 3 for i in range(12)],
                                  SamplingParams(temperature=0, max_tokens=512, ignore_eos=True)) for k in range(2)]
        firsts = [len(next(s).token_ids) for s in streams]  # both decoding (512 tokens each: still at it)
        replays = graphed.engine.runner.prefill_replays
        busy = graphed.generate([long], once)[0].token_ids
        for s, first in zip(streams, firsts, strict=True):
            assert first + sum(len(d.token_ids) for d in s) == 512
        assert graphed.stats()["split_steps"] >= 1
        assert graphed.engine.runner.prefill_replays - replays >= 1  # through the graph
        assert len(first_logits) == 2 and busy == idle
        assert torch.equal(first_logits[0], first_logits[1])
    finally:
        graphed.shutdown()


@pytest.mark.parametrize("requests", [1, 3, 6])
def test_pipelined_bursts_give_the_tokens_of_bursts_read_in_turn(engines, requests):
    """pipeline_bursts ("auto": on with graphs): the next burst is launched from the last one's
    argmax on the device, its plan made while that one runs (after its first replay, copying
    nothing blocking), before the host reads its tokens (from a pinned copy made when that burst
    ends). Same graphs, same tokens as bursts read one at a time; with six requests one stops
    mid-burst, its share of the next burst is dropped, and the rest keep the graph of 8 either
    way."""
    plain = LLM(engines[0].model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                max_num_seqs=16, cuda_graphs=True, prefill_graph_tokens=256, pipeline_bursts=False)
    pipelined = engines[0]  # the default; plain reads every burst before launching the next
    assert pipelined.engine.config.pipeline_bursts is True and plain.engine.config.pipeline_bursts is False
    before, pages = pipelined.stats()["pipelined_bursts"], pipelined.stats()["pages_used"]
    try:
        gen = torch.Generator().manual_seed(requests)
        prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist()
                   for n in torch.randint(5, 90, (requests,), generator=gen)]
        free = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, enable_prefix_caching=False)
        ref = plain.generate(prompts, free)
        out = pipelined.generate(prompts, free)
        assert [o.token_ids for o in out] == [r.token_ids for r in ref]
        assert pipelined.stats()["pipelined_bursts"] - before >= 3
        if requests == 6:
            stops = [SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, enable_prefix_caching=False,
                                    stop_token_ids=[r.token_ids[13]] if i == 2 else None)
                     for i, r in enumerate(ref)]
            results = []
            for llm in (plain, pipelined):
                with llm.engine.together():
                    streams = [llm.engine.add_request(p, s) for p, s in zip(prompts, stops, strict=True)]
                results.append([s.result().token_ids for s in streams])
            assert results[0] == results[1]
            assert len(results[1][2]) < 60
        assert plain.stats()["pages_used"] == 0 and pipelined.stats()["pages_used"] == pages
        assert plain.stats()["pipelined_bursts"] == 0
    finally:
        plain.shutdown()



@pytest.mark.parametrize("requests", [1, 3, 6])
def test_sampled_bursts_draw_the_tokens_of_single_graph_steps(engines, requests):
    """Sampled requests decode in (pipelined) bursts: after each replay the step's tokens are
    drawn on the device (each request's generator, step by step, as single steps draw it) and
    replace the graph's argmax as the next input. Seeded requests beside a greedy one get the
    tokens of the same graphs replayed one step at a time. (No request stops early: single
    steps would then shrink the batch into another graph, which rounds otherwise.)"""
    graphed, _ = engines
    stepwise = LLM(graphed.model_path, device="cuda", dtype="bfloat16", attention_backend="flashinfer",
                   max_num_seqs=16, cuda_graphs=True, prefill_graph_tokens=256, decode_burst=1)
    runner = graphed.engine.runner
    try:
        captures, bursts = runner.draw_captures, graphed.stats()["decode_bursts"]
        gen = torch.Generator().manual_seed(40 + requests)
        prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist()
                   for n in torch.randint(5, 90, (requests,), generator=gen)]
        kinds = [dict(temperature=0.8), dict(temperature=1.1, top_k=20, top_p=0.9), dict(temperature=0),
                 dict(temperature=1.0, min_p=0.02), dict(temperature=0.6, top_p=0.95),
                 dict(temperature=1.3, top_k=50, top_p=0.9)]
        params = [SamplingParams(max_tokens=40, ignore_eos=True, enable_prefix_caching=False, seed=i, **kinds[i])
                  for i in range(requests)]
        # the bursts first: with six requests the keep-rule kernels' largest k (50) is past the
        # warm-up's, and their first launch in this process comes before a draw graph's capture
        results = [[o.token_ids for o in llm.generate(prompts, params)] for llm in (graphed, stepwise)]
        assert results[1] == results[0]
        # the bursts drew in graphs (runner.DRAW_GRAPH_ROWS), each batch's captured once and
        # replayed by the bursts that followed it
        captures, bursts = runner.draw_captures - captures, graphed.stats()["decode_bursts"] - bursts
        assert 1 <= captures < bursts
        greedy = graphed.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                          enable_prefix_caching=False))
        assert results[1][0] != greedy[0].token_ids  # drawn, not the argmax
        assert stepwise.stats()["decode_bursts"] == 0
    finally:
        stepwise.shutdown()


def test_unseeded_sampled_bursts_draw_in_graphs_from_the_default_generator(engines):
    """A burst with a sampled request without a seed draws in a draw graph too, from the default
    CUDA generator, which each replay advances: the same request again draws other tokens."""
    graphed, _ = engines
    runner = graphed.engine.runner
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist() for n in (12, 40)]
    params = [SamplingParams(max_tokens=30, ignore_eos=True, enable_prefix_caching=False, **kw)
              for kw in (dict(temperature=0.9, seed=1), dict(temperature=0.6, top_k=20, top_p=0.95))]
    captures, bursts = runner.draw_captures, graphed.stats()["decode_bursts"]
    drawn = [[o.token_ids for o in graphed.generate(prompts, params)] for _ in range(2)]
    captures, bursts = runner.draw_captures - captures, graphed.stats()["decode_bursts"] - bursts
    assert 1 <= captures < bursts
    assert drawn[0][0] == drawn[1][0]  # seeded: its own generator, seeded again
    assert drawn[0][1] != drawn[1][1]  # unseeded: the default generator went on
    greedy = graphed.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                      enable_prefix_caching=False))
    assert drawn[0][1] != greedy[1].token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_draw_graph_draws_the_tokens_of_the_draw_op_by_op(dtype):
    """``capture_draw``: replayed step after step, a draw graph draws the tokens the sampler draws
    op by op, for rows with their own generator and rows drawing from the default CUDA
    generator, and leaves both generators where the ops leave them; a draw after it, op by op,
    goes on from there. Captured while other work is queued, it waits for none of it."""
    from braid_engine.engine.model_runner import capture_draw
    from braid_engine.sampling import RowSampler

    vocab, dev = 151_936, torch.device("cuda")
    logits = (torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 4).to(dtype).to(dev)
    own = torch.Generator(device=dev)
    params = [SamplingParams(temperature=0.9), SamplingParams(temperature=0.6, top_k=20, top_p=0.95),
              SamplingParams(temperature=1.0, top_p=0.8, seed=5), SamplingParams(temperature=0)]
    sampler = RowSampler(params, [None, None, own, None], vocab, dev)

    def run(draw) -> tuple[list[list[int]], int, int]:
        torch.cuda.manual_seed(11)
        own.manual_seed(5)
        tokens = [draw() for _ in range(5)] + [sampler(logits).tolist()]  # the last one op by op
        return tokens, torch.cuda.default_generators[0].get_offset(), own.get_offset()

    eager = run(lambda: sampler(logits).tolist())
    out = torch.empty(4, dtype=torch.long, device=dev)
    torch.cuda._sleep(100_000_000)  # queued work a capture must not wait for
    start = torch.cuda.Event()
    start.record()
    graph = capture_draw(sampler, [own], logits, out, torch.cuda.graph_pool_handle(), torch.cuda.Stream(dev))
    assert not start.query()  # the host captured while the GPU still slept

    def replay() -> list[int]:
        graph.replay()
        return out.tolist()

    assert run(replay) == eager
    tokens = eager[0]
    assert len({tuple(t[:3]) for t in tokens}) > 1  # drawn anew each step
    assert all(t[3] == logits[3].float().argmax().item() for t in tokens)


def test_drawing_a_steps_tokens_does_not_wait_for_the_gpu(engines):
    """A burst draws each step's tokens between replays it has queued: making the sampler (its
    settings copied to the device) and drawing must queue behind the GPU's work, not wait for it.
    A spin kernel stands for the replays. The draw's kernels (kernels/argmax.py) wait the first
    time they launch (Triton compiles and loads them): the engine launched them when it captured
    its graphs, for its vocabulary, in each form (a graph's logits and float32 ones; temperature
    alone, and filtered rows), so every draw here waits for nothing."""
    from braid_engine.sampling import RowSampler

    graphed = engines[0]
    vocab = graphed.engine.runner.model.config.vocab_size
    params = [SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.0)]
    graph_logits = graphed.engine.runner.graphs[1][1]
    for logits, ps in [(torch.randn(3, vocab, device="cuda"), params),  # filtered rows
                       (torch.randn(3, vocab, device="cuda"), params[1:]),  # temperature alone
                       (torch.randn(3, vocab, device="cuda").to(graph_logits.dtype), params[1:]),
                       (torch.randn(3, vocab, device="cuda").to(graph_logits.dtype), params)]:
        logits = logits[:len(ps)]
        torch.cuda.synchronize()
        torch.cuda._sleep(1 << 31)  # about a second of spinning on the GPU
        spun = torch.cuda.Event()
        spun.record(torch.cuda.current_stream())
        gens = [torch.Generator(device="cuda").manual_seed(1), None, None][-len(ps):]
        tokens = RowSampler(ps, gens, vocab, logits.device, fused=graphed.engine.runner.fused)(logits)
        drawn_while_busy = not spun.query()
        torch.cuda.synchronize()
        assert drawn_while_busy, (logits.dtype, len(ps))
        greedy = [i for i, p in enumerate(ps) if p.greedy]
        assert tokens[greedy[0]].item() == logits[greedy[0]].argmax().item()

@pytest.mark.parametrize("batch", [1, 8])
def test_planning_a_decode_graph_does_not_wait_for_the_gpu(engines, batch):
    """Pipelined bursts plan the next burst while the last one runs: a graph's decode plan (the
    small-batch kernel's table at batch 1, FlashInfer's page indices at 8) must queue its copies
    behind the GPU's work, not wait for it. The GPU is kept busy with a spin kernel; the plan
    returns while it still spins."""
    from braid_engine.attention.base import BatchLayout

    runner = engines[0].engine.runner
    backend, ps = runner.backend, runner.page_size
    layout = BatchLayout([1] * batch, [40 + i for i in range(batch)], [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(batch)],
                         ps, torch.empty(0))
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 31)  # about a second of spinning on the GPU
    spun = torch.cuda.Event()
    spun.record(stream)
    with torch.inference_mode():  # as the engine plans (its buffers are inference tensors)
        assert backend.plan_graph(layout, batch, runner.pad_page) == "plain"
    planned_while_busy = not spun.query()
    torch.cuda.synchronize()
    assert planned_while_busy


def test_a_bursts_tokens_are_read_without_waiting_for_work_queued_after_it(engines):
    """A pipelined follow-up is queued behind a burst before the host reads that burst's tokens:
    the read must wait for the burst alone. Here a spin kernel stands for the follow-up."""
    from braid_engine.engine.model_runner import Burst

    runner = engines[0].engine.runner
    out = torch.arange(24, device="cuda").view(3, 8) * 7  # 3 steps of a graph of 8 rows
    burst = Burst(out, [object()] * 5, 3, None, *runner._to_host(out))
    torch.cuda._sleep(1 << 31)  # about a second of spinning, queued after the burst
    spun = torch.cuda.Event()
    spun.record(torch.cuda.current_stream())
    tokens = burst.tokens()
    read_while_busy = not spun.query()
    torch.cuda.synchronize()
    assert tokens == [[7 * (8 * k + i) for i in range(5)] for k in range(3)]
    assert read_while_busy


def test_a_steps_rows_are_staged_in_pinned_memory_and_rewritten_only_after_their_copy(engines):
    """A step's rows go to the device from a pinned buffer, so their copy is queued without the
    host waiting for the GPU; the buffer is written again only once that copy has run (a chunk
    that samples nothing is never waited for). A spin kernel stands for the GPU's earlier work."""
    runner = engines[0].engine.runner
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 31)  # about a second of spinning on the GPU
    spun = torch.cuda.Event()
    spun.record(stream)
    with torch.inference_mode():  # as the runner's steps run (the buffer is an inference tensor)
        rows = runner._host_rows(5)
        assert rows.is_pinned() and rows.shape == (3, 5)
        rows.copy_(torch.arange(15).view(3, 5))
        on_device = runner._rows_to_device(rows)
        queued_while_busy = not spun.query()
        again = runner._host_rows(5)  # waits for the copy above
        waited = spun.query()
        again.fill_(-1)
    torch.cuda.synchronize()
    assert queued_while_busy and waited
    assert torch.equal(on_device.cpu(), torch.arange(15).view(3, 5))


def test_the_greedy_kernel_gives_the_tokens_and_logits_of_torch_argmax(tmp_path, monkeypatch):
    """kernels.FUSED_GREEDY: the decode graphs pick their greedy tokens with kernels/argmax.py from
    the LM head's bf16 logits. The same tokens as the graphs that take torch's argmax of the float
    logits, in bursts and single steps, at batches that replay our decode attention (3) and
    FlashInfer's (6); sampled steps (single steps through the graph) get the same float32 logits:
    the same seeded samples."""
    from braid_engine import kernels

    # a vocabulary of three of the kernel's chunks (the tokenizer's ids are the first few hundred;
    # the logits of the rest are the model's all the same)
    path = make_tiny_checkpoint(tmp_path / "vocab", arch="qwen3", num_hidden_layers=2, hidden_size=256,
                                intermediate_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                vocab_size=9000)
    kw = dict(device="cuda", dtype="bfloat16", attention_backend="flashinfer", max_num_seqs=16, cuda_graphs=True,
              prefill_graph_tokens=256)
    monkeypatch.setattr(kernels, "FUSED_GREEDY", False)
    graphed = LLM(path, **kw)
    monkeypatch.setattr(kernels, "FUSED_GREEDY", True)
    fused = LLM(path, **kw)
    try:
        assert fused.engine.runner._greedy is not None and graphed.engine.runner._greedy is None
        gen = torch.Generator().manual_seed(11)
        for requests in (1, 3, 6):
            prompts = [torch.randint(3, 400, (int(n),), generator=gen).tolist()
                       for n in torch.randint(5, 90, (requests,), generator=gen)]
            greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, enable_prefix_caching=False)
            with fused.engine.together():
                a = [fused.engine.add_request(p, greedy) for p in prompts]
            with graphed.engine.together():
                b = [graphed.engine.add_request(p, greedy) for p in prompts]
            assert [s.result().token_ids for s in a] == [s.result().token_ids for s in b]
            sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True,
                                     enable_prefix_caching=False)
            with fused.engine.together():
                a = [fused.engine.add_request(p, sampled) for p in prompts]
            with graphed.engine.together():
                b = [graphed.engine.add_request(p, sampled) for p in prompts]
            assert [s.result().token_ids for s in a] == [s.result().token_ids for s in b]
        assert fused.stats()["decode_bursts"] > 0
    finally:
        fused.shutdown()
        graphed.shutdown()
