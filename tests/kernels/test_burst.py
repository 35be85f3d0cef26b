"""A decode burst's bookkeeping inside the graph (kernels/burst.py) against the host's copies
between replays (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from braid_engine.kernels.argmax import GreedyIds
from braid_engine.kernels.burst import BurstSteps

VOCAB = 300


def _replay(burst, pos, slots, fill, base, ids, logits):
    """What a decode graph does around its forward: advance first, greedy tokens last."""
    burst.advance(pos, slots, fill, base)
    greedy = GreedyIds(burst.max_rows, VOCAB, logits.device)
    greedy(logits, ids, burst)


@pytest.mark.parametrize("rows, with_base", [(1, True), (3, True), (6, False)])
def test_a_burst_moves_each_step_inputs_and_keeps_its_tokens(device, rows, with_base):
    """Steps 0..4 of a burst: every replay finds that step's positions, slots and fills (plus the
    base where the attention counts keys) in the graph's buffers, and the tokens of replay k land in
    row k of the burst's output, as the host's copies before and after each replay put them."""
    gen = torch.Generator().manual_seed(rows)
    steps = 5
    burst = BurstSteps(8, 8, device)
    pos = torch.full((rows,), -1, dtype=torch.long, device=device)
    slots = torch.full((rows,), -1, dtype=torch.long, device=device)
    fill = torch.full((rows,), -1, dtype=torch.int32, device=device)
    base = torch.randint(0, 64, (rows,), generator=gen, dtype=torch.int32).to(device) if with_base else None
    ids = torch.zeros(rows, dtype=torch.long, device=device)
    want_pos = torch.randint(0, 1000, (steps, rows), generator=gen)
    want_slots = torch.randint(0, 10_000, (steps, rows), generator=gen)
    want_fill = torch.randint(1, 17, (steps, rows), generator=gen)
    burst.load(burst.host_table(want_pos.tolist(), want_slots.tolist(), want_fill.tolist()))
    tokens = []
    for k in range(steps):
        logits = torch.randn(rows, VOCAB, generator=gen).to(device)
        _replay(burst, pos, slots, fill, base, ids, logits)
        assert pos.tolist() == want_pos[k].tolist() and slots.tolist() == want_slots[k].tolist()
        assert fill.tolist() == (want_fill[k] + (base.cpu() if with_base else 0)).tolist()
        assert ids.tolist() == logits.argmax(-1).tolist()
        tokens.append(ids.tolist())
    assert burst.tokens(steps, rows).tolist() == tokens
    assert burst.table[:3].tolist() == [steps, steps, steps - 1]


def test_replays_outside_a_burst_keep_the_host_inputs_and_the_burst_tokens(device):
    """After a burst's last step (and before any), a replay leaves the inputs the host loaded and
    writes no burst row: a sampled step between bursts must not move its rows."""
    rows, steps = 2, 3
    burst = BurstSteps(4, 4, device)
    pos = torch.tensor([7, 9], device=device)
    slots = torch.tensor([70, 90], device=device)
    fill = torch.tensor([3, 4], dtype=torch.int32, device=device)
    ids = torch.zeros(rows, dtype=torch.long, device=device)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)).to(device)
    _replay(burst, pos, slots, fill, None, ids, logits)  # no burst yet
    assert pos.tolist() == [7, 9] and slots.tolist() == [70, 90] and fill.tolist() == [3, 4]
    assert burst.table[2].item() == -1 and (burst.out == 0).all()
    burst.load(burst.host_table([[1, 2]] * steps, [[10, 20]] * steps, [[1, 1]] * steps))
    for _ in range(steps):
        _replay(burst, pos, slots, fill, None, ids, logits)
    kept = burst.tokens(steps, rows).clone()
    pos.copy_(torch.tensor([50, 60]))
    _replay(burst, pos, slots, fill, None, ids, -logits)  # a step after the burst: other tokens
    assert pos.tolist() == [50, 60] and burst.table[2].item() == -1
    assert torch.equal(burst.tokens(steps, rows), kept)
    assert ids.tolist() == (-logits).argmax(-1).tolist()


def test_burst_steps_refuse_what_they_cannot_hold(device):
    burst = BurstSteps(2, 4, device)
    with pytest.raises(ValueError, match="1 to 2 steps"):
        burst.host_table([[1]] * 3, [[1]] * 3, [[1]] * 3)
    with pytest.raises(ValueError, match="up to 4 rows"):
        burst.host_table([[1] * 5], [[1] * 5], [[1] * 5])
    with pytest.raises(ValueError, match="one position, slot and fill"):
        burst.host_table([[1, 2]], [[1]], [[1, 2]])
    long = torch.zeros(5, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        burst.advance(long, long, torch.zeros(5, dtype=torch.int32, device=device))
    two = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="int32"):
        burst.advance(two, two, two)
    with pytest.raises(ValueError, match="hold 4 rows, not 5"):
        GreedyIds(8, VOCAB, device)(torch.zeros(5, VOCAB, device=device), long, burst)
