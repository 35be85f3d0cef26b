import math

import pytest
import torch

from braid_engine import InvalidSamplingParamsError, SamplingParams
from braid_engine.sampling import filter_logits, sample


def kept(logits, **kw):
    args = dict(temperature=1.0, top_k=-1, top_p=1.0, min_p=0.0) | kw
    return set(torch.nonzero(filter_logits(torch.tensor(logits), **args) > float("-inf")).flatten().tolist())


def test_top_k_keeps_exactly_the_k_largest():
    assert kept([0.1, 3.0, 2.0, -1.0, 2.5], top_k=2) == {1, 4}
    assert kept([0.1, 3.0, 2.0, -1.0, 2.5], top_k=5) == {0, 1, 2, 3, 4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().tolist()
    assert kept(logits, top_p=0.5) == {0}
    assert kept(logits, top_p=0.6) == {0, 1}
    assert kept(logits, top_p=0.8) == {0, 1}
    assert kept(logits, top_p=0.81) == {0, 1, 2}
    assert kept(logits, top_p=1.0) == {0, 1, 2, 3}


def test_min_p_is_relative_to_the_top_probability():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().tolist()
    assert kept(logits, min_p=0.5) == {0, 1}  # threshold 0.25
    assert kept(logits, min_p=0.2) == {0, 1, 2}  # threshold 0.10


def test_filtered_distribution_is_renormalised():
    logp = filter_logits(torch.tensor([1.0, 2.0, 3.0]), temperature=0.5, top_k=2, top_p=1.0, min_p=0.0)
    assert math.isclose(float(logp.exp().sum()), 1.0, rel_tol=1e-6)
    expected = torch.softmax(torch.tensor([4.0, 6.0]), -1)
    torch.testing.assert_close(logp.exp()[1:], expected)


def test_sampling_follows_the_distribution_and_respects_filters():
    logits = torch.tensor([[0.0, math.log(3.0), -100.0, math.log(6.0)]])
    gen = torch.Generator().manual_seed(1)
    p = SamplingParams(temperature=1.0, top_k=3)
    counts = [0] * 4
    for _ in range(3000):
        counts[sample(logits, [p], [gen])[0]] += 1
    assert counts[2] == 0
    freqs = [c / 3000 for c in counts]
    for f, want in zip(freqs, [0.1, 0.3, 0.0, 0.6]):
        assert abs(f - want) < 0.03


def test_a_tiny_temperature_picks_the_greedy_token():
    """logits / 1e-38 overflow to inf and the softmax to NaN, which sampled token 0 every time."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 5
    for t in (1e-6, 1e-38, 1e-45):
        p = SamplingParams(temperature=t)
        assert p.greedy
        gens = [torch.Generator().manual_seed(s) for s in range(2)]
        assert sample(logits, [p, p], gens) == logits.argmax(-1).tolist()


def test_seeded_sampling_is_reproducible(qwen3_llm):
    prompts = ["Tell me a story", "The quick brown fox"]
    a = qwen3_llm.generate(prompts, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=7))
    b = qwen3_llm.generate(prompts[::-1], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=7))
    assert [o.token_ids for o in a] == [o.token_ids for o in b[::-1]]
    c = qwen3_llm.generate(prompts[0], SamplingParams(temperature=0.9, top_p=0.95, max_tokens=20, seed=8))
    assert c[0].token_ids != a[0].token_ids


@pytest.mark.parametrize("kwargs, word", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(seed="x"), "seed"),
    (dict(temperature=float("inf")), "temperature"),  # logits / inf: NaN where a grammar masks
    (dict(top_p="0.9"), "top_p"),
    (dict(min_p="0.1"), "min_p"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(seed=2**64), "seed"),  # past what torch.Generator takes
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=7), "stop_token_ids"),
    (dict(stop_token_ids=0), "stop_token_ids"),  # was read as no stop ids at all
    (dict(seed=True), "seed"),  # torch's manual_seed refused it later, untyped
    (dict(skip_special_tokens="no"), "skip_special_tokens"),  # failed inside the loop as an engine bug
    (dict(ignore_eos=1), "ignore_eos"),
    (dict(enable_prefix_caching="no"), "enable_prefix_caching"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
])
def test_invalid_sampling_values_are_named(kwargs, word):
    with pytest.raises(InvalidSamplingParamsError, match=word):
        SamplingParams(**kwargs)


def test_fields_changed_after_construction_are_checked_and_used(qwen3_llm):
    """SamplingParams is a mutable dataclass: a field set after construction is validated when
    a request uses it, and a changed ``stop`` takes effect (it was silently ignored)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = qwen3_llm.generate("Hello there", params)[0]
    stop = full.text[10:13]
    assert stop and stop not in full.text[:10]
    params.stop = [stop]
    cut = qwen3_llm.generate("Hello there", params)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    params.temperature = -1
    with pytest.raises(InvalidSamplingParamsError, match="temperature must be"):
        qwen3_llm.generate("Hello there", params)
    params.temperature = 0
    assert qwen3_llm.generate("Hello there", params)[0].text == cut.text


def test_stop_lists_given_as_iterators_or_arrays_are_read_once_and_kept(qwen3_llm):
    """An iterator of stops was read by the first check and left empty for the engine (the request
    ran to its length); a numpy array of stop ids raised numpy's ambiguous-truth ValueError."""
    import numpy as np

    full = qwen3_llm.generate("Hello there", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    tok = full.token_ids[5]
    for ids in (iter([tok]), np.array([tok]), (tok,)):
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=ids)
        assert params.stop_token_ids == [tok]
        out = qwen3_llm.generate("Hello there", params)[0]
        assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:full.token_ids.index(tok) + 1]
    stop = full.text[10:13]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=iter([stop]))
    assert params.stop == [stop]
    assert qwen3_llm.generate("Hello there", params)[0].text == full.text[: full.text.index(stop)]
