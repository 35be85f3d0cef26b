"""The decode graphs' greedy-token kernel against torch.argmax (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from braid_engine.kernels.argmax import CHUNK, GreedyIds

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
VOCAB = 2 * CHUNK + 1000  # three chunks, the last one partial


def _greedy(logits: torch.Tensor, max_rows: int = 8) -> torch.Tensor:
    out = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    return GreedyIds(max_rows, logits.shape[1], logits.device)(logits, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_greedy_ids_are_torch_argmax(device, dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, VOCAB, generator=gen) * 4).to(dtype).to(device)
    assert torch.equal(_greedy(logits), logits.float().argmax(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_first_index_as_in_torch(device, dtype):
    """The largest value twice in one chunk, in two chunks, in the partial last chunk; -0.0 against
    0.0; a row of -inf; +inf twice; a NaN (torch ranks it first) before and after the largest
    value, and two NaNs in different chunks."""
    logits = torch.full((9, VOCAB), -3.0)
    logits[0, [17, 900]] = 5.0  # one chunk
    logits[1, [CHUNK + 3, 5]] = 5.0  # two chunks: index 5 first
    logits[2, [VOCAB - 1, 2 * CHUNK + 1]] = 5.0  # the partial chunk
    logits[3] = -1.0
    logits[3, 40] = 0.0
    logits[3, 30] = -0.0  # equal to 0.0: the first of them
    logits[4] = float("-inf")
    logits[5, [CHUNK + 9, 2 * CHUNK + 2]] = float("inf")
    logits[6, 100] = 7.0
    logits[6, CHUNK + 50] = float("nan")
    logits[7, 60] = float("nan")
    logits[7, 200] = 9.0
    logits[8, [2 * CHUNK + 5, CHUNK + 7]] = float("nan")
    logits = logits.to(dtype).to(device)
    want = logits.float().argmax(-1)
    assert want.tolist() == [17, 5, 2 * CHUNK + 1, 30, 0, CHUNK + 9, CHUNK + 50, 60, CHUNK + 7]
    assert torch.equal(_greedy(logits, 9), want)


def test_greedy_ids_write_into_a_strided_view_and_only_their_rows(device):
    """The graphs write the tokens into a row of the static inputs: a strided view whose other
    entries must stay as they are."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen).to(device)
    buf = torch.full((6, 2), -7, dtype=torch.long, device=device)
    GreedyIds(8, VOCAB, device)(logits, buf[:4, 1])
    assert torch.equal(buf[:4, 1], logits.argmax(-1))
    assert (buf[:, 0] == -7).all() and (buf[4:] == -7).all()


def test_greedy_ids_refuse_what_they_cannot_take(device):
    greedy = GreedyIds(2, VOCAB, device)
    out = torch.empty(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="logits must be"):
        greedy(torch.zeros(3, VOCAB, device=device), torch.empty(3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="logits must be"):
        greedy(torch.zeros(2, VOCAB + 1, device=device), out)
    with pytest.raises(ValueError, match="logits must be"):
        greedy(torch.zeros(VOCAB, 2, device=device).t(), out)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        greedy(torch.zeros(2, VOCAB, dtype=torch.float64, device=device), out)
    with pytest.raises(ValueError, match="out must be"):
        greedy(torch.zeros(2, VOCAB, device=device), torch.empty(2, dtype=torch.int32, device=device))


def _race_torch(logits, race, temperature=None):
    """RowSampler's race without the kernel: the argmax of logits / T − log E, in float32."""
    z = logits.float() if temperature is None else logits / temperature[:, None]
    return (z - race.log()).argmax(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_the_race_draws_what_torch_draws(device, dtype, scaled):
    """A sampled step's draw in the greedy-token kernels, the argmax of ``x / T − log E`` (each
    row its own temperature, or logits already scaled, with filtered-out tokens at -inf), is
    torch's, from the same race; and it is a draw, not the argmax: the rows' tokens differ from
    their greedy ones, and a second race draws other tokens."""
    gen = torch.Generator().manual_seed(7)
    rows = 6
    logits = (torch.randn(rows, VOCAB, generator=gen) * 2).to(dtype)
    logits[2, 3000:] = float("-inf")  # a filtered row: the token comes from the first 3,000
    logits, temperature = logits.to(device), torch.tensor([0.7, 1.0, 1.3, 0.2, 2.0, 0.05], device=device)
    drawn = []
    for _ in range(2):
        race = torch.empty(rows, VOCAB).exponential_(generator=gen).to(device)
        out = torch.full((rows,), -1, dtype=torch.long, device=device)
        got = GreedyIds(rows, VOCAB, device)(logits, out, race, temperature if scaled else None)
        assert got is out
        assert torch.equal(got, _race_torch(logits, race, temperature if scaled else None))
        drawn.append(got)
    assert int(drawn[0][2]) < 3000
    assert (drawn[0] != logits.float().argmax(-1)).sum() >= 3
    assert not torch.equal(drawn[0], drawn[1])


def test_the_race_refuses_what_it_cannot_take(device):
    greedy = GreedyIds(2, VOCAB, device)
    logits = torch.zeros(2, VOCAB, device=device)
    out = torch.empty(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="race must be float32"):
        greedy(logits, out, torch.ones(2, VOCAB, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="race must be float32"):
        greedy(logits, out, torch.ones(2, VOCAB - 1, device=device))
    with pytest.raises(ValueError, match="temperature goes with a race"):
        greedy(logits, out, None, torch.ones(2, device=device))
    with pytest.raises(ValueError, match="temperature goes with a race"):
        greedy(logits, out, torch.ones(2, VOCAB, device=device), torch.ones(3, device=device))


def test_the_sampler_draws_what_torch_draws_with_the_kernels_or_without(device, monkeypatch):
    """RowSampler with its kernels (forced on under the CPU interpreter) draws each seeded row's
    token as without them, temperature alone or filtered, beside a greedy row; logits the kernels
    do not take (float64, or not unit-strided along the vocabulary) are drawn by torch instead of
    refused."""
    import braid_engine.sampling as sampling
    from braid_engine.sampling import RowSampler, SamplingParams

    monkeypatch.setattr(sampling, "fused_kernels_available", lambda dev: True)
    gen = torch.Generator().manual_seed(5)
    base = (torch.randn(3, VOCAB, generator=gen) * 3).to(device)
    cases = [[SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, seed=2)],
             [SamplingParams(temperature=0.8, top_k=40, seed=1), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, top_p=0.9, min_p=0.01, seed=2)]]
    for params in cases:
        for logits in (base, base.double(), base.t().contiguous().t()):
            def draw(fused, logits=logits, params=params):
                gens = [torch.Generator(device=device).manual_seed(p.seed) if p.seed is not None else None
                        for p in params]
                sampler = RowSampler(params, gens, VOCAB, logits.device, fused=fused)
                assert (sampler.kernel is not None) == fused
                return sampler(logits)

            assert torch.equal(draw(True), draw(False)), (logits.dtype, logits.stride())
