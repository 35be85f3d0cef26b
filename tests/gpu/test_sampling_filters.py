"""The sampler's filters on the GPU at Qwen3-0.6B's vocabulary against transformers' warpers
there (GPU only): ties at the top-p cut fall lowest index first, as torch's sort of a long row
orders them on the GPU, so the tokens kept are transformers' own, ties included."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from braid_engine.kernels.topp import TopKTopPCut  # noqa: E402
from braid_engine.sampling import _Filters  # noqa: E402

VOCAB = 151_936
SETTINGS = [(0.6, 20, 0.95), (1.0, 50, 0.9), (0.7, -1, 0.9), (1.0, 64, 0.5), (0.6, 20, 1.0)]


def _warped(row: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    warpers = [TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k > 0 else []) + \
        ([TopPLogitsWarper(p)] if p < 1 else [])
    return LogitsProcessorList(warpers)(torch.zeros(1, 1, dtype=torch.long, device=row.device), row[None].clone())[0]


@pytest.mark.parametrize("seed", range(8))
def test_the_filters_keep_transformers_tokens_on_the_gpu(seed):
    """bf16 logits as the model gives them (ties at the k-th value and at the cut are common), a
    batch of Qwen3's settings beside others: each row keeps exactly the tokens transformers'
    warpers keep on the same card, and the same as alone."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(len(SETTINGS), VOCAB, generator=gen) * 4).to(torch.bfloat16).float().cuda()
    t, k, p = map(list, zip(*SETTINGS))
    got = _Filters(t, k, p, [0.0] * len(SETTINGS), VOCAB, logits.device)(logits)
    for i, (ti, ki, pi) in enumerate(SETTINGS):
        want = _warped(logits[i], ti, ki, pi)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), (seed, SETTINGS[i])
        alone = _Filters([ti], [ki], [pi], [0.0], VOCAB, logits.device)(logits[i:i + 1])[0]
        assert torch.equal(alone, got[i])


@pytest.mark.parametrize("seed", range(8))
def test_the_keep_rule_kernels_keep_transformers_tokens_on_the_gpu(seed):
    """The keep rule from kernels/topp.py (the engine's way for top-k ≤ 64 with top-p) keeps
    exactly the tokens transformers' warpers keep, on bf16 logits with their ties, the kernels
    dividing by the temperature themselves."""
    gen = torch.Generator().manual_seed(100 + seed)
    settings = [(t, k, p) for t, k, p in SETTINGS if 0 < k <= 64 and p < 1]
    logits = (torch.randn(len(settings), VOCAB, generator=gen) * 4).to(torch.bfloat16).cuda()
    t, k, p = (torch.tensor(v, dtype=torch.float64) for v in zip(*settings))
    rule = TopKTopPCut(len(settings), VOCAB, int(k.max()), logits.device)
    value, index = rule(logits, (k - 1).to(torch.int32).cuda(), (1 - p).float().cuda(), t.float().cuda())
    z = logits.float() / t.float().cuda()[:, None]
    j = torch.arange(VOCAB, device=logits.device)
    kept = (z > value[:, None]) | ((z == value[:, None]) & (j >= index[:, None]))
    for i, (ti, ki, pi) in enumerate(settings):
        want = _warped(logits[i].float(), ti, ki, pi)
        assert torch.equal(kept[i], torch.isfinite(want)), (seed, settings[i])
