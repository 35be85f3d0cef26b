"""Top-k then top-p's keep rule by kernels/topp.py against sampling._top_k_top_p (the sort-free cut
in torch), and the race applying it (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from braid_engine import kernels, sampling
from braid_engine.kernels.argmax import GreedyIds
from braid_engine.kernels.topp import MAX_K, TopKTopPCut
from braid_engine.sampling import RowSampler, SamplingParams, _Filters

# the interpreter computes in numpy, which warns where IEEE arithmetic meets -inf and NaN on purpose
# (a mass of 0 dividing the drop, -inf minus -inf, a tiny temperature overflowing the logits): the
# rows that test those cases
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# chunks of 64 (the engine's are 4,096; the interpreter is slow): five, the last one partial
CHUNK = 64
VOCAB = 4 * CHUNK + 44
NEG = float("-inf")


def _cut(x, temperature, top_k, top_p, chunk=CHUNK):
    """The kernels' rules for rows x [n, V] (raw logits, divided by their temperatures in the kernel)."""
    on = [0 < k < x.shape[1] and p < 1 for k, p in zip(top_k, top_p)]
    k_index = torch.tensor([k - 1 if o else -1 for k, o in zip(top_k, on)], dtype=torch.int32)
    drops = torch.tensor([1 - p if o else 0.0 for p, o in zip(top_p, on)], dtype=torch.float64).float()
    t = torch.tensor(temperature, dtype=torch.float64).float()
    dev = x.device
    cut = TopKTopPCut(x.shape[0], x.shape[1], max(k for k, o in zip(top_k, on) if o), dev, chunk)
    value, index = cut(x, k_index.to(dev), drops.to(dev), t.to(dev))
    return value.clone(), index.clone()


def _applied(x, temperature, value, index):
    """The scaled logits with what the rule drops at -inf (as the race sees them)."""
    z = x / torch.tensor(temperature, dtype=torch.float64).float().to(x.device)[:, None]
    j = torch.arange(x.shape[1], device=x.device)
    drop = (z < value[:, None]) | ((z == value[:, None]) & (j < index[:, None]))
    return z.masked_fill(drop, NEG)


def _reference(x, temperature, top_k, top_p, monkeypatch):
    """sampling._Filters with top-p cut among the top-k values (_top_k_top_p), as on the CPU."""
    monkeypatch.setattr(sampling, "SORT_FREE_TOP_P", True)
    return _Filters(temperature, top_k, top_p, [0.0] * len(top_k), x.shape[1], x.device)(x)


def _same(got, want):
    """The same -inf tokens and the same other values (NaN equal to NaN)."""
    return torch.equal(torch.isneginf(got), torch.isneginf(want)) and torch.equal(got.nan_to_num(), want.nan_to_num())


def _rows(seed):
    """Rows of every kind, with settings whose drops no mass j/t of a tie group can equal (see
    tests/engine/test_sampling.py): random, tie-heavy, -inf-masked, fewer finite tokens than k, k
    of 1, a top-p so small it keeps one token, NaN, +inf, ties at the k-th value past the kernels'
    candidates (the row counts its ties and finds the (m+1)-th by scans over it), all tied."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(14, VOCAB, generator=g) * 3
    settings = [(0.6, 20, 0.9513), (1.0, 20, 0.9377), (0.9, 5, 1e-6), (1.0, 1, 0.5371), (1.3, 64, 0.8123)]
    x[5:8] = torch.randint(-6, 7, (3, VOCAB), generator=g).float() * 0.5  # few distinct values
    x[6, ::5] = NEG
    settings += [(1.0, 20, 0.9377), (0.7, 20, 0.9011), (1.0, 64, 0.6079)]
    x[8, 3:] = NEG  # 3 finite tokens, k of 20: the k-th value is -inf
    x[8, [0, 1, 2, 40]] = torch.tensor([0.5, 1.0, 1.2, 1.5])
    x[9, 7 + seed] = float("nan")  # top-k's mask alone
    x[10, 30 + seed] = float("inf")
    settings += [(1.0, 20, 0.8), (1.0, 3, 0.9), (1.0, 20, 0.9)]
    # 5 larger tokens (in the first and last chunks), the rest tied: the k-th value has 295 ties,
    # far past the candidates; drops of ~165 ties, of all of them (then the larger ones), of none
    for r in (11, 12):
        x[r] = 0.25
        x[r, [2, 70, VOCAB - 1, 150, 9]] = 2.0 + torch.arange(5) * 0.01 * (r - 10)
    settings += [(1.0, 20, 0.5371), (1.0, 7, 0.0913)]
    x[13] = -1.0  # all tied, a drop of 1 in float32: the last of them is kept (never all dropped)
    settings += [(0.8, 20, 1e-9)]
    return x, [list(c) for c in zip(*settings)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_keep_rule_keeps_what_top_k_top_p_keeps(device, dtype, monkeypatch):
    x, (t, k, p) = _rows(DTYPES.index(dtype))
    x = x.to(dtype).to(device)
    value, index = _cut(x, t, k, p)
    got = _applied(x, t, value, index)
    want = _reference(x, t, k, p, monkeypatch)
    for r in range(x.shape[0]):
        assert _same(got[r], want[r]), (r, value[r], index[r])
    kept = (~torch.isneginf(want)).sum(-1).tolist()
    # the rows are what they claim: a draw among many, one token, the NaN row's top 3, a cut deep
    # among the ties past the candidates (its index found by the scan), every tie dropped, one of
    # the all-tied row
    assert kept[2] == 1 and kept[3] >= 1 and kept[9] == 3
    assert 100 < kept[11] < 200 and index[11] > 100 and value[11] == 0.25
    assert kept[12] <= 5 and value[12] > 0.25
    assert kept[13] == 1 and index[13] == VOCAB - 1
    assert kept[5] > 2 and kept[8] == 3


def test_a_batch_gives_each_row_its_rule_alone(device):
    x, (t, k, p) = _rows(3)
    x = x.to(device)
    value, index = _cut(x, t, k, p)
    for r in (0, 8, 9, 11):  # (the kernels' KEEP is the batch's: 64 here, 32 alone)
        v1, i1 = _cut(x[r:r + 1], t[r:r + 1], k[r:r + 1], p[r:r + 1])
        assert torch.equal(v1.nan_to_num(), value[r:r + 1].nan_to_num()) and torch.equal(i1, index[r:r + 1]), r


def test_rows_without_the_filter_keep_everything_and_chunk_size_does_not_matter(device, monkeypatch):
    """A row whose k index is -1 (top-k or top-p off) gets (-inf, 0): nothing dropped, NaN kept; the
    rules are the same with a chunk of 512 (one, mostly past the vocabulary) and of 16 (nineteen:
    the ties past the candidates span them)."""
    x, (t, k, p) = _rows(1)
    x = x.to(device)
    k[4], p[6] = -1, 1.0
    value, index = _cut(x, t, k, p)
    assert value[4] == NEG and index[4] == 0 and value[6] == NEG and index[6] == 0
    for chunk, rows in ((512, [0, 4, 6, 9, 12]), (16, [11, 13])):
        v, i = _cut(x[rows], [t[r] for r in rows], [k[r] for r in rows], [p[r] for r in rows], chunk)
        assert torch.equal(v.nan_to_num(), value[rows].nan_to_num()) and torch.equal(i, index[rows]), chunk


def test_random_rows_and_settings_keep_what_top_k_top_p_keeps(device, monkeypatch):
    """Rows of bf16-rounded logits (ties among the larger values too), few distinct values and
    -inf-masked ones, each with a random temperature, k (1 to MAX_K) and top-p."""
    g = torch.Generator().manual_seed(5)
    rows = 16
    x = (torch.randn(rows, VOCAB, generator=g) * 4).to(torch.bfloat16).float()
    x[::4] = torch.randint(-8, 9, (rows // 4, VOCAB), generator=g).float() * 0.25
    x[1::3, ::3] = NEG
    t = (torch.rand(rows, generator=g) * 1.5 + 0.3).tolist()
    k = torch.randint(1, MAX_K + 1, (rows,), generator=g).tolist()
    p = (torch.rand(rows, generator=g) * 0.98 + 0.01).tolist()
    x = x.to(device)
    value, index = _cut(x, t, k, p)
    got, want = _applied(x, t, value, index), _reference(x, t, k, p, monkeypatch)
    for r in range(rows):
        assert _same(got[r], want[r]), (r, t[r], k[r], p[r])
    kept = (~torch.isneginf(want)).sum(-1)
    assert (kept > 1).sum() >= rows // 2 and (kept < torch.tensor(k, device=device)).sum() >= rows // 2


def test_signed_zeros_denormals_and_overflowed_or_underflowed_masses_keep_what_top_k_top_p_keeps(device, monkeypatch):
    """Rows the random ones miss: -0.0 and +0.0 tied at the k-th value (the cut deep among them, past
    the candidates; all of them tied), denormal logits a large temperature rounds to signed zeros,
    logits a tiny temperature overflows to ±inf, and a k-th value whose mass beside the larger ones
    underflows double (exp(-800): its ties never counted) or is denormal (exp(-740): counted)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(6, VOCAB)
    x[0, 1::2] = -0.0
    x[0, [3, 90, 200, 299, 150]] = torch.tensor([1.0, 1.1, 1.2, 1.3, 1.4])
    x[1, ::3] = -0.0
    x[2] = torch.randn(VOCAB, generator=g) * 1e-40
    x[3] = torch.randn(VOCAB, generator=g) * 2e35
    x[4, [5, 70, 140, 210, 280]] = 800.0 + torch.arange(5.0) * 0.25
    x[5, [5, 70, 140, 210, 280]] = 740.0 + torch.arange(5.0) * 0.25
    t, k, p = [1.0, 1.0, 1e5, 1e-3, 1.0, 1.0], [20, 7, 64, 20, 20, 20], [0.4629, 1e-9, 0.9011, 0.9377, 0.5371, 0.6079]
    x = x.to(device)
    value, index = _cut(x, t, k, p)
    got, want = _applied(x, t, value, index), _reference(x, t, k, p, monkeypatch)
    for r in range(x.shape[0]):
        assert _same(got[r], want[r]), (r, value[r], index[r])
    z = x / torch.tensor(t, device=device)[:, None]
    assert ((z[2] == 0) & z[2].signbit()).any() and ((z[2] == 0) & ~z[2].signbit()).any()
    assert torch.isposinf(z[3]).sum() > 3 and torch.isneginf(z[3]).any()
    kept = (~torch.isneginf(want)).sum(-1).tolist()
    assert 100 < kept[0] < 200 and value[0] == 0 and index[0] > 2 * CHUNK
    assert kept[1] == 1 and index[1] == VOCAB - 1
    assert 1 < kept[4] < 5 and 1 < kept[5] < 5


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_the_race_with_the_rule_draws_torchs_token(device, dtype, monkeypatch):
    """GreedyIds(cut=...) draws the token torch's race draws from the filtered row, from the same
    E: over raw logits (the temperature divided in the kernel) and over already-scaled ones."""
    x, (t, k, p) = _rows(0)
    x = x.to(dtype).to(device)
    value, index = _cut(x, t, k, p)
    want_z = _reference(x, t, k, p, monkeypatch)
    gen = torch.Generator().manual_seed(1)
    temperature = torch.tensor(t, dtype=torch.float64).float().to(device)
    greedy = GreedyIds(x.shape[0], VOCAB, device)
    drawn = []
    for _ in range(2):
        race = torch.empty(x.shape, dtype=torch.float32).exponential_(generator=gen).to(device)
        want = (want_z - race.log()).argmax(-1)
        out = torch.empty(x.shape[0], dtype=torch.long, device=device)
        assert torch.equal(greedy(x, out, race, temperature, (value, index)), want)
        scaled = x / temperature[:, None]
        assert torch.equal(greedy(scaled, out, race, None, (value, index)), want)
        drawn.append(want)
    assert not torch.equal(drawn[0], drawn[1])  # drawn, not the top token
    # without the rule the race draws elsewhere: the rule is applied
    race = torch.empty(x.shape, dtype=torch.float32).exponential_(generator=gen).to(device)
    out = torch.empty(x.shape[0], dtype=torch.long, device=device)
    assert not torch.equal(greedy(x, out, race, temperature), (want_z - race.log()).argmax(-1))


def _params():
    """Qwen3's settings beside top-k alone, top-p alone, min-p with both (torch's way), k past
    MAX_K with top-p (torch's), greedy, temperature alone, a tiny top-p."""
    return [SamplingParams(temperature=0.6, top_k=20, top_p=0.95, seed=1), SamplingParams(temperature=0.7, top_k=5),
            SamplingParams(temperature=0.9, top_p=0.9011, seed=3),
            SamplingParams(temperature=0.6, top_k=20, top_p=0.95, min_p=0.05, seed=4),
            SamplingParams(temperature=1.0, top_k=MAX_K + 1, top_p=0.9377), SamplingParams(temperature=0),
            SamplingParams(temperature=1.2, seed=7), SamplingParams(temperature=1.0, top_k=3, top_p=1e-6, seed=8),
            SamplingParams(temperature=1.1, top_k=40, top_p=0.8123)]


def _draw(logits, params, device, fused=True, top_p_kernel=True):
    gens = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in params]
    sampler = RowSampler(params, gens, logits.shape[1], device, fused=fused, top_p_kernel=top_p_kernel)
    if sampler.cut is not None:  # the interpreter's chunks
        sampler.cut = TopKTopPCut(len(sampler.rows), logits.shape[1], sampler.cut.k_max, device, CHUNK)
    torch.manual_seed(11)  # the unseeded rows' draw
    return sampler, sampler(logits)


def test_the_sampler_draws_the_same_tokens_with_the_top_p_kernels(device, monkeypatch):
    """RowSampler with the keep-rule kernels (forced on under the interpreter) draws each row's
    token as without them and as torch alone, rows of every setting mixed, tie-heavy rows too;
    only the rows with top-k ≤ MAX_K, top-p and no min-p take the rule (their own settings decide:
    a row alone takes the same way); logits the race does not take (float64) fall back to torch."""
    monkeypatch.setattr(sampling, "fused_kernels_available", lambda dev: True)
    params = _params()
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(len(params), VOCAB, generator=g) * 3
    logits[1::2] = torch.randint(-6, 7, (len(params) // 2, VOCAB), generator=g).float() * 0.5
    logits = logits.to(device)
    sampler, got = _draw(logits, params, device)
    assert sampler.cut_k_index.tolist() == [{0: 19, 7: 2, 8: 39}.get(i, -1) for i in sampler.rows]
    assert torch.equal(got, _draw(logits, params, device, top_p_kernel=False)[1])
    assert torch.equal(got, _draw(logits, params, device, fused=False)[1])
    assert (got != logits.argmax(-1)).sum() >= 2
    for i in (0, 7):  # seeded: the same token alone
        alone, token = _draw(logits[i:i + 1], params[i:i + 1], device)
        assert alone.cut is not None and token.tolist() == [int(got[i])]
    assert _draw(logits[3:5], params[3:5], device)[0].cut is None  # min-p; k past MAX_K
    assert torch.equal(_draw(logits.double(), params, device)[1], got)


def test_the_switch_is_on_by_default_and_off_leaves_the_sampler_as_it_was(device, monkeypatch):
    monkeypatch.setattr(sampling, "fused_kernels_available", lambda dev: True)
    assert kernels.FUSED_TOP_P is True
    params = _params()
    assert RowSampler(params, [None] * len(params), VOCAB, device).cut is not None
    assert RowSampler(params, [None] * len(params), VOCAB, device, fused=False).cut is None
    monkeypatch.setattr(kernels, "FUSED_TOP_P", False)
    sampler = RowSampler(params, [None] * len(params), VOCAB, device)
    assert sampler.cut is None and sampler.rest is None and sampler.filters is not None


def test_preparing_a_draw_computes_the_rule_and_draws_nothing(device, monkeypatch):
    """RowSampler.prepare (before a draw graph's capture) runs the keep-rule kernels, as a draw
    would, and advances no generator: the draw after it is the draw without it."""
    monkeypatch.setattr(sampling, "fused_kernels_available", lambda dev: True)
    params = _params()
    logits = (torch.randn(len(params), VOCAB, generator=torch.Generator().manual_seed(4)) * 3).to(device)
    want = _draw(logits, params, device)[1]
    gens = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None for p in params]
    sampler = RowSampler(params, gens, VOCAB, device)
    sampler.cut = TopKTopPCut(len(sampler.rows), VOCAB, sampler.cut.k_max, device, CHUNK)
    sampler.cut.cut_value.fill_(float("nan"))
    torch.manual_seed(11)
    sampler.prepare(logits)
    assert not sampler.cut.cut_value.isnan().any()  # the rule was computed
    assert torch.equal(sampler(logits), want)


def test_the_kernels_refuse_what_they_cannot_take(device):
    with pytest.raises(ValueError, match="largest k of 1 to"):
        TopKTopPCut(2, VOCAB, MAX_K + 1, device)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        TopKTopPCut(2, VOCAB, 4, device, chunk=96)
    cut = TopKTopPCut(2, VOCAB, 4, device, CHUNK)
    k, d = torch.zeros(2, dtype=torch.int32, device=device), torch.full((2,), 0.1, device=device)
    with pytest.raises(ValueError, match="x must be"):
        cut(torch.zeros(3, VOCAB, device=device), k, d)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        cut(torch.zeros(2, VOCAB, dtype=torch.float64, device=device), k, d)
    with pytest.raises(ValueError, match="k_index must be"):
        cut(torch.zeros(2, VOCAB, device=device), k.long(), d)
    if device.type == "cpu":  # checked where it costs no wait for the device
        with pytest.raises(ValueError, match=r"k_index must lie in \[-1, 3\]"):
            cut(torch.zeros(2, VOCAB), torch.tensor([0, 4], dtype=torch.int32), d)
    greedy = GreedyIds(2, VOCAB, device)
    x, out = torch.zeros(2, VOCAB, device=device), torch.empty(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="cut goes with a race"):
        greedy(x, out, None, None, (d, k))
    with pytest.raises(ValueError, match="cut goes with a race"):
        greedy(x, out, torch.ones(2, VOCAB, device=device), None, (d, k.long()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's chunks of 4,096: slow in the interpreter")
def test_the_engines_chunks_at_qwen3s_vocabulary_keep_what_top_k_top_p_keeps(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 151_936, generator=g) * 4).to(torch.bfloat16).cuda()
    x[3, 1000:] = 0.0  # ties at the k-th value past the candidates
    x[3, :5] = 3.0
    t, k, p = [0.6] * 8, [20, 20, 64, 20, 2, 33, 20, 7], [0.95, 0.9377, 0.8123, 0.9011, 0.9, 0.6079, 0.9513, 0.99]
    from braid_engine.kernels.topp import CHUNK as ENGINE_CHUNK

    value, index = _cut(x, t, k, p, ENGINE_CHUNK)
    assert _same(_applied(x, t, value, index), _reference(x, t, k, p, monkeypatch))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine's chunks of 4,096: slow in the interpreter")
def test_the_sampler_at_qwen3s_vocabulary_draws_the_same_tokens_with_the_top_p_kernels():
    """On a GPU, compiled: RowSampler at Qwen3-like settings over bf16 logits draws with the keep-rule
    kernels the tokens it draws without them (the row sorted), seeded rows, every step of a few."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(8, 151_936, generator=g) * 4).to(torch.bfloat16).cuda()
    # (0.9513, not 0.95: the sorted row's float32 cumulative sum and the rule's double masses may cut
    # differently where a tie group's mass j/t lands on the drop)
    params = [SamplingParams(temperature=0.6, top_k=20, top_p=0.9513, seed=i) for i in range(6)]
    params += [SamplingParams(temperature=0.7, top_k=5, seed=6), SamplingParams(temperature=1.0, top_p=0.9, seed=7)]

    def draws(top_p_kernel):
        gens = [torch.Generator(device="cuda").manual_seed(p.seed) for p in params]
        sampler = RowSampler(params, gens, x.shape[1], x.device, fused=True, top_p_kernel=top_p_kernel)
        assert (sampler.cut is not None) == top_p_kernel
        return torch.stack([sampler(x) for _ in range(4)])

    assert torch.equal(draws(True), draws(False))
