import math

import pytest
import torch

from braid_engine import InvalidSamplingParamsError, SamplingParams, sampling
from braid_engine.sampling import _Filters, filter_logits, sample


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


def _row_by_row(logits, params, generators):
    """The sampler one row at a time (each row filtered alone, its token read by the host before
    the next row): what the batched sampler must give token for token. The rows without a
    generator take their races from one draw of the default generator over the sampled rows."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    shared = None
    if any(generators[i] is None for i in sampled):
        shared = torch.empty(len(sampled), logits.shape[-1]).exponential_()
    out = []
    for i, (row, p, gen) in enumerate(zip(logits, params, generators)):
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        logp = torch.log_softmax(_stable_reference(row, p.temperature, p.top_k, p.top_p, p.min_p), -1)
        race = shared[sampled.index(i)] if gen is None else torch.empty_like(logp).exponential_(generator=gen)
        out.append(int((logp.exp() / race).argmax()))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_a_batch_is_sampled_at_once_as_row_by_row(seed):
    """The sampler filters and draws every row of a step together (one wait for the host, not one
    a row): each row's token is the one it gets sampled alone, with its own settings and its own
    generator (greedy rows, seeded rows, unseeded rows off the default generator, mixed)."""
    rng = torch.Generator().manual_seed(seed)
    b, v = 9, 300
    logits = torch.randn(b, v, generator=rng) * 3
    logits[0, :7] = logits[0, 7]  # ties at the top of one row
    settings = [dict(temperature=0.0), dict(temperature=0.7), dict(temperature=1.3, top_k=5),
                dict(temperature=0.9, top_p=0.8), dict(temperature=1.0, min_p=0.05),
                dict(temperature=0.6, top_k=20, top_p=0.95, min_p=0.01), dict(top_k=1),
                dict(temperature=2.0, top_k=v), dict(temperature=0.8, top_p=1.0)]
    params = [SamplingParams(**settings[(i + seed) % len(settings)]) for i in range(b)]
    seeds = [None if (i + seed) % 3 == 0 else 100 * seed + i for i in range(b)]

    def gens():
        return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]

    for _ in range(3):
        torch.manual_seed(seed)
        want = _row_by_row(logits, params, gens())
        torch.manual_seed(seed)
        assert sample(logits, params, gens()) == want
    assert sum(w != int(logits[i].argmax()) for i, w in enumerate(want)) >= 2  # rows were drawn, not all top
    # a seeded row's token does not depend on the rows beside it
    alone = [sample(logits[i:i + 1], [params[i]], [torch.Generator().manual_seed(s)])[0]
             for i, s in enumerate(seeds) if s is not None]
    assert alone == [t for t, s in zip(want, seeds) if s is not None]


def _warped(logits, t, k, p, m):
    """Row 0 of ``logits`` [1, V] through transformers' warpers for these settings (each only
    where it is on), in the order generate() applies them."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = [TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k > 0 else []) + \
        ([TopPLogitsWarper(p)] if p < 1 else []) + ([MinPLogitsWarper(m)] if m > 0 else [])
    return LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long), logits.clone())[0]


@pytest.mark.parametrize("seed", range(4))
def test_the_filters_keep_the_tokens_transformers_keeps(seed):
    """The oracle is transformers: its warpers (temperature, top-k, top-p, min-p, in the order
    generate() applies them) keep the same tokens, and the distribution over them is the same,
    ties included.
    min-p after top-p matters: the other way round top-p cut the distribution min-p had
    already renormalised, and kept fewer tokens."""
    rng = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 2000, generator=rng) * 2.5
    if seed % 2:  # bf16 logits, as the GPU's: ties at the k-th value are common, and kept
        logits = logits.to(torch.bfloat16).float()
    for t, k, p, m in [(0.7, -1, 0.9, 0.0), (1.0, 40, 1.0, 0.0), (1.3, -1, 0.8, 0.05), (0.6, 20, 0.95, 0.02),
                       (1.0, -1, 0.5, 0.3), (2.0, 100, 0.7, 0.01), (0.9, -1, 1.0, 0.1)]:
        want = torch.log_softmax(_warped(logits, t, k, p, m), -1)
        got = filter_logits(logits[0], t, k, p, m)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (t, k, p, m)
        torch.testing.assert_close(got, want)
        assert 1 < int(torch.isfinite(got).sum()) < 2000


def test_generate_takes_one_sampling_params_per_prompt(qwen3_llm):
    """As in vLLM, ``generate`` takes a list of SamplingParams paired with the prompts (it took
    only one for all): each request runs with its own, in one batch, as each would alone."""
    from braid_engine import InvalidRequestError

    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, stop_token_ids=[])]
    outs = qwen3_llm.generate(prompts, params)
    alone = [qwen3_llm.generate([p], q)[0] for p, q in zip(prompts, params)]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert [len(o.token_ids) for o in outs] == [5, 9, 3]
    before = qwen3_llm.stats()["pages_used"]
    with pytest.raises(InvalidRequestError, match="3 prompts but 2 SamplingParams"):
        qwen3_llm.generate(prompts, params[:2])
    bad = SamplingParams(max_tokens=4)
    bad.temperature = -1
    with pytest.raises(InvalidSamplingParamsError, match="temperature"):  # each is checked, none queued
        qwen3_llm.generate(prompts[:2], [params[0], bad])
    assert qwen3_llm.stats()["pages_used"] == before


def test_a_top_k_past_int64_keeps_every_token_and_fails_no_request_beside_it(qwen3_llm):
    """top_k is any int (≤ 0 or ≥ the vocabulary: off). The batched sampler packed every row's
    top_k into an int64 tensor, so one request with a top_k past int64 (2**64, "no limit")
    raised ("Overflow when unpacking long long") in the step and failed every request of its
    batch, greedy ones too."""
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = qwen3_llm.generate(prompts, [greedy, SamplingParams(temperature=0.9, top_k=2**64, seed=5, max_tokens=12,
                                                               ignore_eos=True)])
    want = qwen3_llm.generate(prompts, [greedy, SamplingParams(temperature=0.9, top_k=-1, seed=5, max_tokens=12,
                                                               ignore_eos=True)])
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert [len(o.token_ids) for o in outs] == [12, 12]
    assert kept([0.1, 3.0, 2.0, -1.0, 2.5], top_k=2**64) == {0, 1, 2, 3, 4}
    assert kept([0.1, 3.0, 2.0, -1.0, 2.5], top_k=-(2**64)) == {0, 1, 2, 3, 4}


def test_a_top_p_just_below_one_drops_what_transformers_drops():
    """Whether a row's top-p is on was decided in float32, where 1 - 1e-8 rounds to 1: the row
    kept every token, while transformers' TopPLogitsWarper (the oracle) drops the least likely
    ones whose mass stays within 1e-8. Decided in double, as transformers decides it, beside a
    row whose top-p is off."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(2, 2000, generator=torch.Generator().manual_seed(0)) * 5
    top_p = 1 - 1e-8
    want = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits[:1].clone())[0]
    assert 0 < int(torch.isinf(want).sum()) < 2000
    assert torch.equal(torch.isinf(filter_logits(logits[0], 1.0, -1, top_p, 0.0)), torch.isinf(want))
    both = _Filters([1.0, 1.0], [-1, -1], [top_p, 1.0], [0.0, 0.0], 2000, logits.device)(logits)
    assert torch.equal(torch.isinf(both[0]), torch.isinf(want)) and not torch.isinf(both[1]).any()


def _stable_reference(row, t, k, p, m=0.0):
    """One row [V] through the filters as transformers' warpers compute them, with top-p's sort
    stable: tied logits in index order."""
    z = row / t
    if 0 < k < z.shape[-1]:
        z = z.masked_fill(z < torch.topk(z, k).values[-1], float("-inf"))
    if p < 1:
        sorted_z, order = torch.sort(z, stable=True)
        drop = torch.softmax(sorted_z, -1).cumsum(-1) <= 1 - p
        drop[-1] = False
        z = z.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if m > 0:
        probs = torch.softmax(z, -1)
        z = z.masked_fill(probs < m * probs.max(), float("-inf"))
    return z


@pytest.mark.parametrize("seed", range(16))
def test_ties_at_the_top_p_cut_fall_lowest_index_first(seed):
    """Top-p drops tied logits at its cut lowest index first, as a stable sort orders them: with
    top-k without sorting the vocabulary, with top-p alone by a stable sort, alone or beside other
    rows. transformers' TopPLogitsWarper sorts with torch's default sort, whose order of ties on
    the CPU is std::sort's (neither by index nor fixed): there the same number of tokens is kept,
    not always the same ones (bf16 logits tie at the cut in most of these rows)."""
    rng = torch.Generator().manual_seed(seed)
    logits = (torch.randn(1, 2000, generator=rng) * 2.5).to(torch.bfloat16).float()
    settings = [(0.7, -1, 0.9), (2.0, 100, 0.7), (1.0, -1, 0.95), (0.6, -1, 0.5), (1.0, 300, 0.9), (0.6, 20, 0.95)]
    for t, k, p in settings:
        got = filter_logits(logits[0], t, k, p, 0.0)
        assert torch.equal(torch.isinf(got), torch.isinf(_stable_reference(logits[0], t, k, p))), (t, k, p)
        assert int(torch.isfinite(got).sum()) == int(torch.isfinite(_warped(logits, t, k, p, 0.0)).sum())
    batch = logits.expand(len(settings), -1)
    both = _Filters(*map(list, zip(*settings)), [0.0] * len(settings), 2000, logits.device)(batch)
    for row, (t, k, p) in zip(both, settings):  # the filters give scaled logits, filter_logits their log-softmax
        assert torch.equal(torch.log_softmax(row, -1), filter_logits(logits[0], t, k, p, 0.0))


def _tie_heavy(rng, rows, vocab):
    """Logits of few distinct values (many ties everywhere), some rows with -inf tokens."""
    logits = torch.randint(-6, 7, (rows, vocab), generator=rng).float() * 0.5
    logits[::3, ::5] = float("-inf")
    return logits


@pytest.mark.parametrize("seed", range(12))
def test_top_p_after_top_k_without_a_sort_keeps_what_the_sorted_row_keeps(seed, monkeypatch):
    """Top-p over what top-k keeps is cut among the top values (``_top_k_top_p``), never sorting
    the vocabulary: the same tokens as the whole row sorted, on rows of few distinct values (ties
    at the k-th value, at the cut, at the top), -inf tokens, fewer finite tokens than k, k of 1,
    top-p so small it keeps one token, and beside rows with top-k alone, top-p alone or neither."""
    rng = torch.Generator().manual_seed(seed)
    vocab = 257
    logits = _tie_heavy(rng, 10, vocab) if seed % 2 else torch.randn(10, vocab, generator=rng) * 3
    if seed % 4 == 3:
        logits[1, 3:] = float("-inf")  # 3 finite tokens, k of 20
    # top-p values whose drop no tie group's mass j/t can equal (a group of 20 equal logits reaches
    # 0.05 = 1 - 0.95 exactly, where float32's rounding decides the sorted row's cut)
    settings = [(0.6, 20, 0.9513, 0.0), (1.0, 20, 0.9377, 0.0), (1.0, 1, 0.5371, 0.0), (0.9, 5, 1e-6, 0.0),
                (1.3, 64, 0.8123, 0.05), (1.0, 256, 0.6079, 0.0), (0.7, 20, 1.0, 0.0), (1.0, -1, 0.9011, 0.0),
                (0.8, -1, 1.0, 0.0), (2.0, 7, 0.9917, 0.1)]
    filters = _Filters(*map(list, zip(*settings)), vocab, logits.device)
    assert filters.nucleus_in_top_k
    got = filters(logits)
    for i, (row, (t, k, p, m)) in enumerate(zip(logits, settings)):
        want = _stable_reference(row, t, k, p, m)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), (seed, i)
        assert torch.equal(got[i][torch.isfinite(want)], want[torch.isfinite(want)])
        alone = _Filters([t], [k], [p], [m], vocab, logits.device)(logits[i:i + 1])[0]
        assert torch.equal(alone, got[i])
    kept = torch.isfinite(got).sum(-1)
    assert kept[3] == 1 and 1 <= kept[2] <= int((logits[2] == logits[2].max()).sum())
    monkeypatch.setattr(sampling, "SORT_FREE_TOP_P", False)  # every top-p row sorted, as before
    sorted_rows = _Filters(*map(list, zip(*settings)), vocab, logits.device)
    assert not sorted_rows.nucleus_in_top_k
    assert torch.equal(sorted_rows(logits), got)


def test_top_p_after_top_k_is_cut_without_a_sort_on_the_cpu_alone(monkeypatch):
    """``SORT_FREE_TOP_P`` None (the default): the sort-free cut on the CPU, where it is the faster
    one; elsewhere every top-p row is sorted, the faster there (docs/benchmarks.md). Either way
    when set."""
    settings = ([0.6, 1.0], [20, -1], [0.95, 0.9], [0.0, 0.0])
    assert sampling.SORT_FREE_TOP_P is None
    for device, sort_free in ((torch.device("cpu"), True), (torch.device("meta"), False)):
        filters = _Filters(*settings, 1000, device)
        assert filters.nucleus_in_top_k == sort_free
        assert (filters.sorted_rows == torch.tensor([1], device=device)).all() if sort_free else \
            filters.sorted_rows == slice(None)
        for forced in (True, False):
            monkeypatch.setattr(sampling, "SORT_FREE_TOP_P", forced)
            assert _Filters(*settings, 1000, device).nucleus_in_top_k == forced
        monkeypatch.setattr(sampling, "SORT_FREE_TOP_P", None)


def test_nan_logits_beside_a_row_cutting_top_p_among_its_top_values_are_kept_as_alone():
    """A NaN logit (a model gone wrong) is kept by top-k, as the reference keeps it (NaN < k-th is
    false), and the row's NaN softmax drops nothing by top-p. ``_top_k_top_p`` runs over every row
    once one row cuts top-p among its top values, and it turned each NaN into -inf: in that row and
    in rows without top-k beside it, which alone keep the NaN (and top-p then drops nothing)."""
    nan = float("nan")
    row = torch.tensor([0.5, nan, 2.0, 1.0, -1.0])
    settings = [(1.0, 2, 0.9, 0.0), (1.0, -1, 0.5, 0.0), (1.0, -1, 1.0, 0.0), (0.7, -1, 1.0, 0.1),
                (1.0, 1, 0.9, 0.0), (1.0, 3, 0.3, 0.0)]
    logits = row.expand(len(settings), -1)
    filters = _Filters(*map(list, zip(*settings)), 5, logits.device)
    assert filters.nucleus_in_top_k
    got = filters(logits)
    for i, (t, k, p, m) in enumerate(settings):
        want = _stable_reference(row, t, k, p, m)
        assert torch.equal(torch.isneginf(got[i]), torch.isneginf(want)), (i, got[i], want)
        alone = _Filters([t], [k], [p], [m], 5, logits.device)(logits[i:i + 1])[0]
        assert torch.equal(torch.isneginf(alone), torch.isneginf(got[i])) and torch.isnan(alone[1]), i
        assert torch.equal(alone.nan_to_num(), got[i].nan_to_num()), i
    assert torch.isneginf(got[0]).tolist() == [True, False, False, True, True]  # the k-th (2.0) and NaN


QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def test_calls_without_params_take_the_checkpoints_sampling_settings(tmp_path):
    """As vLLM and transformers do, a call without SamplingParams samples with the settings of the
    checkpoint's generation_config.json (Qwen3's 0.6 / 0.95 / 20), SamplingParams' defaults for the
    rest; a checkpoint without any gets SamplingParams(). A greedy setting there makes the call
    without params give the greedy tokens."""
    from braid_engine import LLM
    from braid_engine.testing import make_tiny_checkpoint

    llm = LLM(make_tiny_checkpoint(tmp_path / "qwen3", generation_config=QWEN3_SAMPLING), device="cpu")
    got = llm.get_default_sampling_params()
    assert (got.temperature, got.top_p, got.top_k, got.min_p, got.max_tokens) == (0.6, 0.95, 20, 0.0, 16)
    got.temperature = 0  # a new object each call
    assert llm.get_default_sampling_params().temperature == 0.6
    llm.shutdown()
    plain = LLM(make_tiny_checkpoint(tmp_path / "plain"), device="cpu")
    assert plain.get_default_sampling_params() == SamplingParams()
    plain.shutdown()

    llm = LLM(make_tiny_checkpoint(tmp_path / "greedy", generation_config={"temperature": 0.0}), device="cpu")
    prompt = [5, 6, 7, 8]
    want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].token_ids
    sampled = [llm.generate([prompt], SamplingParams(temperature=1.0, max_tokens=16, seed=s))[0].token_ids
               for s in range(3)]
    assert any(t != want for t in sampled)  # the default SamplingParams() would not give want
    assert llm.generate([prompt])[0].token_ids == want
    deltas = list(llm.stream(prompt))
    assert sum((d.token_ids for d in deltas), []) == want and deltas[-1].finish_reason == "length"
    llm.shutdown()


def test_unusable_sampling_settings_in_the_checkpoint_are_refused_at_load(tmp_path, caplog):
    from braid_engine import LLM, CheckpointError
    from braid_engine.testing import make_tiny_checkpoint

    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": "20"}, {"temperature": True}, {"min_p": True},
                {"repetition_penalty": 0}):
        path = make_tiny_checkpoint(tmp_path / str(len(list(tmp_path.iterdir()))), generation_config=bad)
        with pytest.raises(CheckpointError, match="generation_config.json gives sampling settings .* fix or remove"):
            LLM(path, device="cpu")
    # the penalties it gives are the requests' defaults, as transformers' generate takes them
    # (transformers takes no presence or frequency penalty from there: nor does braid, and says so)
    path = make_tiny_checkpoint(tmp_path / "penalty", generation_config={"repetition_penalty": 1.1, "temperature": 0.7,
                                                                          "presence_penalty": 0.5})
    with caplog.at_level("INFO", logger="braid_engine"):
        llm = LLM(path, device="cpu")
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.repetition_penalty, defaults.presence_penalty) == (0.7, 1.1, 0.0)
    assert "presence_penalty=0.5, which braid does not take from there" in caplog.text
    assert "repetition_penalty=1.1 (their draws are not captured" in caplog.text
    llm.shutdown()
