"""The sampler's k-th-largest kernels against torch.topk (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from braid_engine.kernels.topk import MAX_K, KthLargest

# chunks of 128 (the engine's are 4,096: the interpreter sorts slowly): three, the last one partial
CHUNK = 128
VOCAB = 2 * CHUNK + 100


def _kth(x, k_index, k_max):
    return KthLargest(x.shape[0], x.shape[1], k_max, x.device, CHUNK)(x, k_index.int().to(x.device))


@pytest.mark.parametrize("k_max", [1, 5, 20, MAX_K])
def test_the_kth_largest_is_torch_topks(device, k_max):
    """Each row's value at place k − 1 of torch.topk(x, k_max), k from 1 to k_max per row (-inf
    where a row keeps every token), with bf16-rounded values so the k-th largest is often tied,
    and a row whose largest values all sit in one chunk."""
    gen = torch.Generator().manual_seed(k_max)
    x = (torch.randn(5, VOCAB, generator=gen) * 3).to(torch.bfloat16).float()
    x[3, CHUNK + 7: CHUNK + 7 + MAX_K] = 50.0 + torch.arange(MAX_K) % 3  # the top values in one chunk, tied
    k_index = torch.tensor([k_max - 1, 0, -1, k_max - 1, (k_max - 1) // 2])
    x = x.to(device)
    got = _kth(x, k_index, k_max)
    want = torch.topk(x, k_max, dim=-1).values.gather(1, k_index.clamp(min=0)[:, None].to(device))
    want[2] = float("-inf")
    assert torch.equal(got, want)


def test_ties_at_the_kth_value_count_as_often_as_they_occur(device):
    """A row of a few distinct values, many times each: the k-th largest counts each tie."""
    x = torch.full((2, VOCAB), -1.0)
    x[0, [10, CHUNK + 1, 2 * CHUNK + 2]] = 3.0  # three tied largest, in three chunks
    x[0, [20, 30]] = 2.0
    x[1, :] = 0.5  # all tied
    # places k − 1: the third largest is the last 3.0, the fourth and fifth 2.0, the sixth -1.0
    assert _kth(x.to(device), torch.tensor([2, 7]), 8).flatten().tolist() == [3.0, 0.5]
    assert _kth(x.to(device), torch.tensor([3, 0]), 8).flatten().tolist() == [2.0, 0.5]
    assert _kth(x.to(device), torch.tensor([5, 1]), 8).flatten().tolist() == [-1.0, 0.5]


def test_the_filters_keep_the_same_tokens_with_the_kernels(device, monkeypatch):
    """The sampler's filters with top-k's threshold from the kernels give the scaled, filtered
    logits of torch.topk's, bit for bit, beside top-p and min-p, with k past MAX_K taking torch,
    and torch's top values where a row cuts top-p among them."""
    from braid_engine.sampling import _Filters

    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(4, VOCAB, generator=gen) * 4).to(torch.bfloat16).float().to(device)
    settings = dict(temperature=[0.7, 1.0, 1.3, 0.9], top_k=[20, -1, 3, 50], top_p=[1.0, 0.9, 1.0, 1.0],
                    min_p=[0.0, 0.05, 0.0, 0.0])
    args = (*settings.values(), VOCAB, logits.device)
    with_kernels = _Filters(*args, kth_kernel=True)
    assert with_kernels.kth is not None
    with_kernels.kth = KthLargest(4, VOCAB, 50, logits.device, CHUNK)
    assert torch.equal(with_kernels(logits), _Filters(*args)(logits))
    big = _Filters([1.0], [MAX_K + 1], [1.0], [0.0], VOCAB, logits.device, kth_kernel=True)
    assert big.kth is None  # torch.topk past the kernels' largest k
    nucleus = _Filters([0.6], [20], [0.95], [0.0], VOCAB, logits.device, kth_kernel=True)
    assert nucleus.kth is None and nucleus.nucleus_in_top_k


def test_the_kernels_refuse_what_they_cannot_take(device):
    with pytest.raises(ValueError, match="largest k of 1 to"):
        KthLargest(2, VOCAB, MAX_K + 1, device)
    kth = KthLargest(2, VOCAB, 4, device, CHUNK)
    with pytest.raises(ValueError, match="x must be float32"):
        kth(torch.zeros(2, VOCAB, dtype=torch.float16, device=device), torch.zeros(2, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="x must be float32"):
        kth(torch.zeros(3, VOCAB, device=device), torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="k_index must be"):
        kth(torch.zeros(2, VOCAB, device=device), torch.zeros(2, dtype=torch.int64, device=device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter sorts 4,096 values a program slowly")
def test_the_engines_chunks_at_qwen3s_vocabulary_give_torch_topks():
    from braid_engine.kernels.topk import CHUNK as ENGINE_CHUNK

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 151_936, generator=gen) * 4).to(torch.bfloat16).float().cuda()
    k_index = torch.tensor([19, 0, -1, 63, 5, 19, 40, 2])
    got = KthLargest(8, x.shape[1], MAX_K, x.device, ENGINE_CHUNK)(x, k_index.int().cuda())
    want = torch.topk(x, MAX_K, dim=-1).values.gather(1, k_index.clamp(min=0)[:, None].cuda())
    want[2] = float("-inf")
    assert torch.equal(got, want)


def test_the_kernels_refuse_a_bad_chunk_or_place(device):
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        KthLargest(2, VOCAB, 4, device, chunk=96)
    if device.type == "cpu":  # checked where it costs no wait for the device
        kth = KthLargest(2, VOCAB, 4, device, CHUNK)
        with pytest.raises(ValueError, match=r"k_index must lie in \[-1, 3\]"):
            kth(torch.zeros(2, VOCAB), torch.tensor([0, 4], dtype=torch.int32))
