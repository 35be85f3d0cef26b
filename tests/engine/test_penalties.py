"""Repetition, frequency and presence penalties (SamplingParams): the repetition penalty against
transformers' own processor and ``generate``, the other two against a greedy loop over
transformers' logits that subtracts them as vLLM defines them; batching, the prefix cache and
bursts change no penalized token (fp32, CPU)."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from braid_engine import LLM, SamplingParams
from braid_engine.errors import InvalidSamplingParamsError
from braid_engine.sampling import log_probabilities, penalize, token_logprobs
from braid_engine.testing import make_tiny_checkpoint

PROMPT = "Hello! How are you today? The cache keeps every answer, the cache keeps it."


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("penalties"), arch="qwen3")
    llm = LLM(path, device="cpu", page_size=4, decode_burst=4)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield llm, hf
    llm.shutdown()


def _penalized_reference(row, prompt, output, rep=1.0, freq=0.0, pres=0.0):
    """A row's logits penalized token by token in double, the rules written out plainly."""
    want = row.double().clone()
    for tok in set(prompt) | set(output):
        if rep != 1:
            v = float(row[tok])
            want[tok] = v * rep if v < 0 else v / rep
    for tok in set(output):
        want[tok] -= freq * output.count(tok) + pres
    return want


@pytest.mark.parametrize("seed", range(4))
def test_penalize_is_transformers_repetition_penalty_and_vllms_others(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = 300
    logits = torch.randn(4, vocab, generator=g) * 3
    prompts = [torch.randint(0, vocab, (int(n),), generator=g).tolist() for n in (5, 40, 1, 12)]
    outputs = [torch.randint(0, 40, (int(n),), generator=g).tolist() for n in (0, 30, 9, 12)]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.7, frequency_penalty=0.4),
              SamplingParams(), SamplingParams(presence_penalty=-1.5, frequency_penalty=2.0)]
    got = logits.clone()
    penalize(got, params, prompts, outputs)
    # repetition alone: bit for bit transformers' processor over the prompt and output
    for i in (0,):
        ids = torch.tensor([prompts[i] + outputs[i]])
        assert torch.equal(got[i], RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[i:i + 1].clone())[0])
    assert torch.equal(got[2], logits[2])  # no penalty: untouched
    for i, p in ((1, params[1]), (3, params[3])):
        want = _penalized_reference(logits[i], prompts[i], outputs[i], p.repetition_penalty,
                                    p.frequency_penalty, p.presence_penalty)
        assert torch.allclose(got[i].double(), want, rtol=0, atol=1e-5)
        assert not torch.equal(got[i], logits[i])


def test_the_penalties_are_checked():
    for kwargs, word in ((dict(repetition_penalty=0), "repetition_penalty"),
                         (dict(repetition_penalty=float("inf")), "repetition_penalty"),
                         (dict(repetition_penalty=True), "repetition_penalty"),
                         (dict(presence_penalty=2.5), "presence_penalty"),
                         (dict(presence_penalty=float("nan")), "presence_penalty"),
                         (dict(frequency_penalty="1"), "frequency_penalty"),
                         (dict(frequency_penalty=-3), "frequency_penalty")):
        with pytest.raises(InvalidSamplingParamsError, match=f"{word}.*use"):
            SamplingParams(**kwargs)
    assert not SamplingParams().penalized
    assert SamplingParams(presence_penalty=0.5).penalized and SamplingParams(repetition_penalty=1.1).penalized


def test_greedy_with_a_repetition_penalty_is_transformers_generate(pair):
    llm, hf = pair
    ids = llm.encode(PROMPT)
    plain = llm.generate(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].token_ids
    for rep in (1.3, 0.8):
        got = llm.generate(ids, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                               repetition_penalty=rep))[0].token_ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=40, min_new_tokens=40, repetition_penalty=rep,
                              eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        assert got == ref
        assert got != plain  # the penalty changed the answer: the test can tell
    assert len(set(plain)) < 40  # the unpenalized answer repeats tokens


def _hf_greedy_penalized(hf, ids, n, freq, pres):
    """Argmax over transformers' logits with frequency and presence subtracted as vLLM does."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            row = hf(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=row.shape[0])
            row = row - freq * counts - pres * (counts > 0)
            out.append(int(row.argmax()))
    return out


def test_greedy_with_frequency_and_presence_penalties_is_the_reference_loop(pair):
    llm, hf = pair
    ids = llm.encode(PROMPT)
    plain = llm.generate(ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].token_ids
    for freq, pres in ((0.5, 0.0), (0.0, 1.0), (0.3, 0.7)):
        got = llm.generate(ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                               frequency_penalty=freq, presence_penalty=pres))[0].token_ids
        assert got == _hf_greedy_penalized(hf, ids, 30, freq, pres)
        assert got != plain


def test_batching_caching_and_bursts_change_no_penalized_token(pair):
    """A penalized request beside others: each gets its tokens alone, and the tokens of an engine
    that reads every step (decode_burst=1); the batch decodes in bursts (the penalties counted
    on the device step by step), pipelined or not; a prefix cache hit gives the same."""
    llm, _ = pair
    prompts = [llm.encode(p) for p in (PROMPT, "Paged attention stores keys.", "東京 café 😀")]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.2,
                             presence_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, seed=3, frequency_penalty=0.6)]
    alone = [llm.generate(p, dataclasses.replace(q, enable_prefix_caching=False))[0].token_ids
             for p, q in zip(prompts, params)]
    bursts = llm.stats()["decode_bursts"]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    assert together == alone
    assert llm.stats()["decode_bursts"] > bursts
    again = llm.generate(prompts, params)  # the prompts now come from the cache
    assert [o.token_ids for o in again] == alone and again[0].num_cached_tokens > 0
    for kw in (dict(decode_burst=1), dict(decode_burst=3, pipeline_bursts=True)):
        other = LLM(llm.model_path, device="cpu", page_size=4, **kw)
        try:
            assert [o.token_ids for o in other.generate(prompts, params)] == alone
            assert (other.stats()["decode_bursts"] > 0) == (kw["decode_burst"] > 1)
            assert (other.stats()["pipelined_bursts"] > 0) == kw.get("pipeline_bursts", False)
            # the unpenalized request stops inside a burst; the penalized ones go on as alone
            stops = [params[0], dataclasses.replace(params[1], stop_token_ids=[alone[1][4]]), params[2]]
            out = [o.token_ids for o in other.generate(prompts, stops)]
            assert out[0] == alone[0] and out[2] == alone[2] and out[1] == alone[1][:alone[1].index(alone[1][4]) + 1]
        finally:
            other.shutdown()


def _hf_logprobs(hf, ids, out):
    """transformers' log-softmax (fp32) at each step that chose a token of ``out``."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids + out])).logits[0, len(ids) - 1:-1].float(), -1)


def _expected(ref_row, tok, k):
    """The tokens of an entry: the drawn one, then the k most likely (ties by lower id)."""
    order = torch.sort(ref_row, descending=True, stable=True).indices[:k].tolist()
    return [tok] + [t for t in order if t != tok]


def test_logprobs_are_transformers_log_softmax_of_each_step(pair):
    """logprobs=k: for each token, its log-probability and the k most likely tokens' from the
    model's own logits (transformers' log-softmax, fp32), the drawn token first; streamed
    deltas carry their tokens' entries; penalties and filters do not change them."""
    llm, hf = pair
    ids = llm.encode(PROMPT)
    # each prompt computed afresh: the stream's entries are compared bit for bit with the first
    # answer's, and a prompt read from the cache (as it is after the tests above, not when this
    # test runs alone) gives logits that differ in float32's last places
    params = SamplingParams(temperature=0.9, top_k=5, max_tokens=12, ignore_eos=True, seed=2, logprobs=3,
                            presence_penalty=1.0, enable_prefix_caching=False)
    out = llm.generate(ids, params)[0]
    assert len(out.logprobs) == len(out.token_ids) == 12
    ref = _hf_logprobs(hf, ids, out.token_ids)
    drawn_not_top = 0
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert list(entry) == _expected(ref[i], tok, 3)
        assert all(abs(v - float(ref[i, t])) <= 1e-4 for t, v in entry.items())
        drawn_not_top += tok != int(ref[i].argmax())
    assert drawn_not_top > 0  # sampled (and penalized) tokens the model did not rank first
    deltas = list(llm.stream(ids, params))
    assert len(deltas) > 2 and [e for d in deltas for e in d.logprobs] == out.logprobs
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    greedy = llm.generate(ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))[0]
    ref = _hf_logprobs(hf, ids, greedy.token_ids)
    assert [list(e) for e in greedy.logprobs] == [[t] for t in greedy.token_ids] == \
        [[int(r.argmax())] for r in ref]
    assert all(abs(e[t] - float(r.max())) <= 1e-4 for e, t, r in zip(greedy.logprobs, greedy.token_ids, ref))
    assert llm.generate(ids, SamplingParams(max_tokens=2))[0].logprobs is None
    assert llm.generate(ids, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].token_ids == \
        greedy.token_ids


def test_logprobs_in_bursts_are_those_of_single_steps(pair):
    """Requests with logprobs decode in bursts (their rows drawn op by op, each step's
    log-probabilities ranked on the device and read with the tokens), pipelined or not: the
    entries of an engine that reads every step, beside requests without them, a stop inside a
    burst cutting them with the tokens."""
    llm, _ = pair
    prompts = [llm.encode(p) for p in (PROMPT, "Paged attention stores keys.", "東京 café 😀")]
    base = dict(max_tokens=20, ignore_eos=True, enable_prefix_caching=False)
    params = [SamplingParams(temperature=0, logprobs=2, **base), SamplingParams(temperature=0, **base),
              SamplingParams(temperature=0.8, seed=5, logprobs=4, frequency_penalty=0.5, **base)]
    stepwise = LLM(llm.model_path, device="cpu", page_size=4, decode_burst=1)
    try:
        want = stepwise.generate(prompts, params)
        stop = want[0].token_ids[6]
        stopping = [dataclasses.replace(params[0], stop_token_ids=[stop])] + params[1:]
        want_stop = stepwise.generate(prompts, stopping)
        # alone (the rows of a batch of another size may differ in float32's last places)
        alone = {id(ps): stepwise.generate(prompts[0], ps[0])[0].logprobs for ps in (params, stopping)}
    finally:
        stepwise.shutdown()
    assert len(want_stop[0].token_ids) < 20 and len(want_stop[0].logprobs) == len(want_stop[0].token_ids)
    for kw in (dict(decode_burst=4), dict(decode_burst=3, pipeline_bursts=True)):
        bursting = LLM(llm.model_path, device="cpu", page_size=4, **kw)
        try:
            for ps, ref in ((params, want), (stopping, want_stop)):
                got = bursting.generate(prompts, ps)
                assert [o.token_ids for o in got] == [o.token_ids for o in ref]
                if ps is params:  # the same batch every step: the same values
                    assert [o.logprobs for o in got] == [o.logprobs for o in ref]
                else:  # a burst runs on with the stopped row: the others' rows in a batch of 3, not 2
                    for o, r in zip(got, ref):
                        assert (o.logprobs is None) == (r.logprobs is None)
                        for e, f in zip(o.logprobs or [], r.logprobs or [], strict=True):
                            assert list(e) == list(f) and max(abs(e[t] - f[t]) for t in e) <= 1e-5
                streamed = list(bursting.stream(prompts[0], ps[0]))
                assert [e for d in streamed for e in d.logprobs] == alone[id(ps)]
                assert len(streamed) > 2
            assert bursting.stats()["decode_bursts"] > 0
            assert (bursting.stats()["pipelined_bursts"] > 0) == kw.get("pipeline_bursts", False)
        finally:
            bursting.shutdown()
    with pytest.raises(InvalidSamplingParamsError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_token_logprobs_rank_ties_by_lower_id_and_put_the_drawn_token_first():
    """Exact ties (common in bf16 logits) rank by lower id; the drawn token comes first, once,
    whether or not it is among the k; each row takes its own k; k past the vocabulary lists it
    all; the log-softmax is taken on a copy (the caller's logits are masked in place after)."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, -1.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 5.0, 1.0, 1.0, 4.0, 1.0]])
    lp = log_probabilities(logits, [0, 1, 2])
    logits[:] = -float("inf")  # as a grammar mask or a penalty changes them after
    assert torch.isfinite(lp).all()
    got = token_logprobs(lp, [4, 5, 3], [2, 3, 20])
    assert [list(e) for e in got] == [[4, 1, 2], [5, 0, 1, 2], [3, 1, 4, 2, 5, 0]]
    assert got[0][4] == got[0][1] == got[0][2] == float(lp[0, 1])
    assert [list(e) for e in token_logprobs(lp, [0, 5, 2], [0, 1, 0])] == [[0], [5, 0], [2]]
    wide = torch.zeros(1, 5000)
    wide[0, ::7] = 1.0  # a sort that is not stable orders these ties by anything
    assert list(token_logprobs(log_probabilities(wide, [0]), [3], [5])[0]) == [3, 0, 7, 14, 21, 28]


@pytest.mark.parametrize("seed", range(3))
def test_ranked_logprobs_are_a_stable_sorts_first_k(seed):
    """ranked_logprobs' top-k over (value, inverted id) keys: the ids and values of a stable
    descending sort's first k, for rows with bf16 ties and -inf, k up to past the vocabulary."""
    from braid_engine.sampling import ranked_logprobs

    g = torch.Generator().manual_seed(seed)
    for trial in range(40):
        vocab = int(torch.randint(1, 2000, (1,), generator=g))
        x = torch.randn(4, vocab, generator=g) * 3
        if trial % 2:
            x = x.to(torch.bfloat16).float()  # many exact ties
        if trial % 5 == 0:
            x[:, ::3] = -float("inf")
        lp = torch.log_softmax(x, -1)
        tokens = torch.randint(0, vocab, (4,), generator=g)
        values, ids = torch.sort(lp, dim=-1, descending=True, stable=True)
        for k in (0, 1, 7, 20):
            got_values, got_ids = ranked_logprobs(lp, tokens, k)
            assert torch.equal(got_ids, ids[:, :k])
            assert torch.equal(got_values[:, 1:], values[:, :k])
            assert torch.equal(got_values[:, 0], lp.gather(1, tokens[:, None])[:, 0])
