"""Requests sharing a long prefix, attended through cascade levels, give the same tokens."""

import pytest
import torch

from braid_engine import LLM, SamplingParams
from braid_engine.attention.base import BatchLayout
from braid_engine.attention.torch_backend import TorchBackend


def _suffixes(llm):
    return [llm.encode(f" Question {i}: what is {i} plus {i * 3}?") for i in range(5)]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_cascade_gives_the_same_tokens(tiny_qwen3, page_size):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for mode in ("always", "never"):
        llm = LLM(tiny_qwen3, device="cpu", page_size=page_size, cascade=mode)
        shared = llm.encode("You are a helpful assistant. " * 12)
        llm.generate([shared], SamplingParams(temperature=0, max_tokens=1))  # caches the prefix
        outs[mode] = [o.token_ids for o in llm.generate([shared + s for s in _suffixes(llm)], params)]
        steps = llm.stats()["cascade_steps"]
        assert (steps > 20) if mode == "always" else (steps == 0)
        llm.shutdown()
    plain = LLM(tiny_qwen3, device="cpu", page_size=page_size, enable_prefix_caching=False)
    shared = plain.encode("You are a helpful assistant. " * 12)
    reference = [plain.generate(shared + s, params)[0].token_ids for s in _suffixes(plain)]
    plain.shutdown()
    assert outs["always"] == reference
    assert outs["never"] == reference


def test_cascade_attention_equals_plain_attention():
    """The backend alone: a random paged layout with shared leading pages, prefill + decode mixed."""
    gen = torch.Generator().manual_seed(0)
    layers, pages, hkv, ps, d, hq = 1, 64, 2, 4, 16, 6
    kv = torch.randn(layers, pages, 2, hkv, ps, d, generator=gen)
    shared = [5, 9, 2, 7]  # 16 shared tokens
    tables = [shared + [11, 12], shared + [20, 21, 22], shared + [30]]
    kv_lens = [22, 27, 17]
    q_lens = [1, 5, 1]
    slots = []
    for table, kl, ql in zip(tables, kv_lens, q_lens):
        slots += [table[p // ps] * ps + p % ps for p in range(kl - ql, kl)]
    n = sum(q_lens)
    q = torch.randn(n, hq, d, generator=gen)
    k = torch.randn(n, hkv, d, generator=gen)
    v = torch.randn(n, hkv, d, generator=gen)
    results = {}
    for mode in ("always", "never"):
        backend = TorchBackend(kv.clone(), hq, d, mode)
        backend.plan(BatchLayout(q_lens, kv_lens, tables, ps, torch.tensor(slots)))
        assert len(backend.groups) == (1 if mode == "always" else 0)
        results[mode] = backend.attention(0, q, k, v)
    assert backend.groups == [] and results["always"].shape == q.shape
    torch.testing.assert_close(results["always"], results["never"], rtol=1e-5, atol=1e-5)
