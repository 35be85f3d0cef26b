"""Penalized requests on every path that samples a token (preemption and recompute, chunked
prefill, split steps, a batch whose forward order is not its submission order): each gets the
tokens of a greedy loop over transformers' logits with the penalties applied by hand."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from braid_engine import LLM, SamplingParams

PEN = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3)


@pytest.fixture(scope="module")
def hf(tiny_qwen3):
    return AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()


def _ref(hf, ids, n, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    rep, freq, pres = repetition_penalty, frequency_penalty, presence_penalty
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            row = hf(torch.tensor([ids + out])).logits[:, -1].float()
            if rep != 1:
                row = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([ids + out]), row)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=row.shape[1])
            row = row[0] - freq * counts - pres * (counts > 0)
            out.append(int(row.argmax()))
    return out


def _params(n, **kw):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **{**PEN, **kw})


def test_preemption_and_recompute_keep_the_penalties(tiny_qwen3, hf):
    llm = LLM(tiny_qwen3, device="cpu", page_size=4, num_pages=17, max_model_len=64)
    prompts = [[(5 * k + j) % 300 + 3 for j in range(20)] for k in range(4)]
    outs = [s.result() for s in [llm.engine.add_request(p, _params(24)) for p in prompts]]
    assert llm.stats()["preemptions"] > 0
    for p, o in zip(prompts, outs):
        assert o.token_ids == _ref(hf, p, 24, **PEN)
    llm.shutdown()


def test_split_steps_and_chunked_prompts_keep_the_penalties(tiny_qwen3, hf):
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32", max_num_batched_tokens=64,
              enable_prefix_caching=False, prefill_chunk_while_decoding=16)
    prompts = [[(7 * i + 3 * k) % 300 + 3 for i in range(10 + k)] for k in range(3)]
    prompts.append([(11 * i) % 300 + 3 for i in range(300)])
    params = [_params(24), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), _params(24), _params(24)]
    outs = llm.generate(prompts, params)
    assert llm.stats()["split_steps"] > 0
    for p, q, o in zip(prompts, params, outs):
        want = _ref(hf, p, 24, q.repetition_penalty, q.frequency_penalty, q.presence_penalty)
        assert o.token_ids == want
    llm.shutdown()


def test_rows_follow_the_forwards_order_not_the_submissions(tiny_qwen3, hf):
    """The second prompt's pages come from the cache (low ids), the first's are new: the forward
    sorts the second first. Each request still gets its own penalties."""
    llm = LLM(tiny_qwen3, device="cpu", page_size=4)
    a = [(13 * i) % 300 + 3 for i in range(30)]
    b = [(17 * i) % 300 + 3 for i in range(30)]
    llm.generate(b, SamplingParams(temperature=0, max_tokens=1))  # b's prompt cached, low pages
    order = []
    execute = llm.engine.runner.execute

    def spy(batch):
        logits, samplers = execute(batch)
        order.append([s.prompt_token_ids == b for s in samplers])
        return logits, samplers

    llm.engine.runner.execute = spy
    params = [_params(16, repetition_penalty=2.0, frequency_penalty=0.0, presence_penalty=0.0),
              _params(16, repetition_penalty=1.0, frequency_penalty=1.5, presence_penalty=1.0)]
    streams = [llm.engine.add_request(p, q) for p, q in zip((a, b), params)]
    outs = [s.result() for s in streams]
    assert outs[0].token_ids == _ref(hf, a, 16, 2.0)
    assert outs[1].token_ids == _ref(hf, b, 16, 1.0, 1.5, 1.0)
    assert [True, False] in order  # the forward put b's row first
    llm.shutdown()
