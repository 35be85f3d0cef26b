"""The model with every Triton kernel switched on computes what the torch path computes."""

import pytest
import torch

from braid_engine.attention.base import BatchLayout
from braid_engine.attention.torch_backend import TorchBackend
from braid_engine.engine.kv_cache import allocate_kv_cache
from braid_engine.loader import load_config, load_model
from braid_engine.testing import make_tiny_checkpoint


def _logits(path, fused: bool, ids: list[int], device: torch.device) -> torch.Tensor:
    cfg = load_config(path)
    model = load_model(path, cfg, device, torch.float32, cfg.max_position_embeddings)
    model.set_fused(None if fused else set(), fused)
    ps, n = 4, len(ids)
    cache = allocate_kv_cache(cfg, 8, ps, torch.float32, device)
    backend = TorchBackend(cache, cfg.num_attention_heads, cfg.head_dim)
    table = [5, 2, 7, 0, 3, 1]
    backend.plan(BatchLayout([n], [n], [table], ps,
                             torch.tensor([table[p // ps] * ps + p % ps for p in range(n)], device=device)))
    with torch.inference_mode():
        hidden = model(torch.tensor(ids, device=device), torch.arange(n, device=device), backend)
        return model.compute_logits(hidden).cpu()


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_fused_model_matches_torch_path(tmp_path, arch, device):
    path = make_tiny_checkpoint(tmp_path / arch, arch=arch, k_norm_max=96.5 if arch == "qwen3" else None)
    ids = [3, 17, 42, 8, 99, 5, 61, 23, 7, 11]
    torch.testing.assert_close(_logits(path, True, ids, device), _logits(path, False, ids, device), rtol=1e-4, atol=1e-4)


def test_torch_path_matches_transformers(tmp_path, device):
    from transformers import AutoModelForCausalLM

    path = make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5)
    ids = [3, 17, 42, 8, 99, 5, 61, 23, 7, 11]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_logits(path, False, ids, device), ref, rtol=1e-4, atol=1e-4)


def _stepwise_logits(path, ids: list[int], device: torch.device) -> torch.Tensor:
    """Logits of every position computed one token a step against the growing cache: with
    fused layers each step takes the one-row matmul path."""
    cfg = load_config(path)
    model = load_model(path, cfg, device, torch.float32, cfg.max_position_embeddings)
    model.set_fused(None, True)
    ps = 4
    cache = allocate_kv_cache(cfg, 8, ps, torch.float32, device)
    backend = TorchBackend(cache, cfg.num_attention_heads, cfg.head_dim)
    table = [5, 2, 7, 0, 3, 1]
    rows = []
    for p, token in enumerate(ids):
        slot = torch.tensor([table[p // ps] * ps + p % ps], device=device)
        backend.plan(BatchLayout([1], [p + 1], [table], ps, slot))
        with torch.inference_mode():
            hidden = model(torch.tensor([token], device=device), torch.tensor([p], device=device), backend)
            rows.append(model.compute_logits(hidden).cpu())
    return torch.cat(rows)


@pytest.mark.parametrize("silu_out", [True, False])
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_one_token_steps_through_row_kernels_match_torch_path(tmp_path, arch, silu_out, device, monkeypatch):
    from braid_engine import kernels
    from braid_engine.kernels import gemv

    path = make_tiny_checkpoint(tmp_path / arch, arch=arch, k_norm_max=96.5 if arch == "qwen3" else None)
    ids = [3, 17, 42, 8, 99, 5, 61, 23, 7, 11]
    launches = []
    launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda prologue, *a, silu_out=False, **k:
                        launches.append((prologue, silu_out)) or launch(prologue, *a, silu_out=silu_out, **k))
    monkeypatch.setattr(kernels, "ROW_SILU_OUT", silu_out)
    rows = _stepwise_logits(path, ids, device)
    layers = load_config(path).num_hidden_layers
    # four one-row matmuls a layer a step: norm → qkv, o_proj, norm → gate_up, then down_proj over
    # SiLU·mul — written by gate_up (kernels.ROW_SILU_OUT) or computed in down_proj's prologue
    mlp = [(gemv.NORM, True), (gemv.PLAIN, False)] if silu_out else [(gemv.NORM, False), (gemv.SILU, False)]
    assert launches == ([(gemv.NORM, False), (gemv.PLAIN, False)] + mlp) * layers * len(ids)
    ref = _logits(path, False, ids, device)
    # float32 sums in another order; k_norm weights of 96.5 amplify that (2.7e-4 seen on an
    # H100), a wrong rounding or a lost residual would move logits by whole units
    torch.testing.assert_close(rows, ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(rows.argmax(-1), ref.argmax(-1))


def _batch_step_logits(path, fused: bool, histories: list[list[int]], device: torch.device) -> torch.Tensor:
    """Each history's prompt prefilled on its own, then one decode step of all of them together
    (a row each): the step's logits."""
    cfg = load_config(path)
    model = load_model(path, cfg, device, torch.float32, cfg.max_position_embeddings)
    model.set_fused(None if fused else set(), fused)
    ps = 4
    cache = allocate_kv_cache(cfg, 64, ps, torch.float32, device)
    backend = TorchBackend(cache, cfg.num_attention_heads, cfg.head_dim)
    pages = iter(torch.randperm(64, generator=torch.Generator().manual_seed(1)).tolist())  # shuffled
    tables = [[next(pages) for _ in range(-(-len(h) // ps))] for h in histories]

    def slot(table: list[int], p: int) -> int:
        return table[p // ps] * ps + p % ps

    with torch.inference_mode():
        for h, table in zip(histories, tables, strict=True):  # prompts longer than the row bound
            n = len(h) - 1
            backend.plan(BatchLayout([n], [n], [table], ps, torch.tensor([slot(table, p) for p in range(n)],
                                                                         device=device)))
            model(torch.tensor(h[:-1], device=device), torch.arange(n, device=device), backend)
        lens = [len(h) for h in histories]
        backend.plan(BatchLayout([1] * len(histories), lens, tables, ps,
                                 torch.tensor([slot(t, n - 1) for t, n in zip(tables, lens, strict=True)], device=device)))
        hidden = model(torch.tensor([h[-1] for h in histories], device=device),
                       torch.tensor([n - 1 for n in lens], device=device), backend)
        return model.compute_logits(hidden).cpu()


def _histories(batch: int, seed: int) -> list[list[int]]:
    """``batch`` prompts of 18-24 tokens: their prefills run past any row-kernel bound."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(18, 25, (batch,), generator=g)]


def _row_launches(monkeypatch) -> list[int]:
    """The rows of each row-kernel launch from now on (the list fills as they run); a launch
    that gathers its rows from the embedding table (kernels.FOLD_EMBEDDING) counts its ids."""
    from braid_engine.kernels import gemv

    rows = []
    launch = gemv._launch

    def counted(prologue, x, *a, ids=None, **k):
        rows.append(x.shape[0] if ids is None else ids.shape[0])
        return launch(prologue, x, *a, ids=ids, **k)

    monkeypatch.setattr(gemv, "_launch", counted)
    return rows


@pytest.mark.parametrize("batch", [2, 5])
def test_a_small_decode_batch_through_the_row_kernels_matches_the_torch_path(tmp_path, batch, device, monkeypatch):
    """A decode step of several sequences (up to ROW_KERNEL_ROWS: 2 by default, 5 here too)
    takes the row kernels with every row at once (each row normalised on its own, its own
    residual), and gives the torch path's logits; past ROW_KERNEL_ROWS rows it takes cuBLAS and
    the standalone kernels."""
    from braid_engine import kernels

    monkeypatch.setattr(kernels, "ROW_KERNEL_ROWS", batch)
    path = make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5)
    histories = _histories(batch, seed=batch)
    rows = _row_launches(monkeypatch)
    fused = _batch_step_logits(path, True, histories, device)
    layers = load_config(path).num_hidden_layers
    assert rows == [batch] * 4 * layers  # the prefills (17-23 rows) took the other path
    ref = _batch_step_logits(path, False, histories, device)
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-3)
    assert torch.equal(fused.argmax(-1), ref.argmax(-1))
    rows.clear()
    monkeypatch.setattr(kernels, "ROW_KERNEL_ROWS", batch - 1)
    torch.testing.assert_close(_batch_step_logits(path, True, histories, device), ref, rtol=1e-3, atol=1e-3)
    assert rows == []


def test_steps_past_the_row_kernels_launch_limit_take_cublas(tmp_path, device, monkeypatch):
    """A bound set past what one row-kernel launch takes (ROW_KERNEL_MAX_ROWS) sends the larger
    steps to cuBLAS and the standalone kernels instead of failing inside the forward."""
    from braid_engine import kernels

    path = make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5)
    histories = _histories(kernels.ROW_KERNEL_MAX_ROWS + 1, seed=9)
    rows = _row_launches(monkeypatch)
    monkeypatch.setattr(kernels, "ROW_KERNEL_ROWS", 64)
    fused = _batch_step_logits(path, True, histories, device)
    assert rows == []
    torch.testing.assert_close(fused, _batch_step_logits(path, False, histories, device), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2])
def test_the_first_layer_gathering_its_embeddings_changes_no_bit(tmp_path, batch, device, monkeypatch):
    """kernels.FOLD_EMBEDDING: steps the first layer takes through the row kernels gather their
    embeddings inside its qkv kernel, with the logits of the embedding kernel before it bit for bit;
    longer steps (the prefills here) keep the embedding kernel."""
    from braid_engine import kernels
    from braid_engine.kernels import gemv

    path = make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5)
    histories = _histories(batch, seed=3)
    monkeypatch.setattr(kernels, "ROW_KERNEL_ROWS", 2)
    off = _batch_step_logits(path, True, histories, device)
    gathered = []
    launch = gemv._launch
    monkeypatch.setattr(gemv, "_launch", lambda *a, ids=None, **k: gathered.append(ids is not None) or launch(*a, ids=ids, **k))
    monkeypatch.setattr(kernels, "FOLD_EMBEDDING", True)
    on = _batch_step_logits(path, True, histories, device)
    assert torch.equal(on, off)
    assert gathered.count(True) == 1 and gathered[0]  # the step's first layer's qkv, once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch needs a GPU")
def test_dependent_launch_changes_no_bit(tmp_path, device, monkeypatch):
    """PDL only lets a kernel start early; every kernel waits for its input, so the logits are
    bit-identical with it on and off (a missing wait would read a half-written row). On: the
    standalone RMSNorm (the final norm here) launched so too (kernels.PDL_RMS_NORM)."""
    from braid_engine import kernels

    path = make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5)
    ids = [3, 17, 42, 8, 99, 5, 61, 23, 7, 11]
    monkeypatch.setattr(kernels, "PDL_RMS_NORM", True)
    on = _stepwise_logits(path, ids, device)
    monkeypatch.setattr(kernels, "PDL", False)
    assert torch.equal(_stepwise_logits(path, ids, device), on)


@pytest.mark.parametrize("fused", [False, True])
def test_a_fresh_prompt_on_its_own_keys_gives_the_paged_logits(tmp_path, fused, device, monkeypatch):
    """A fresh prompt's step attends the k/v its layers hand over (the fused prologue's rotated
    k written back into qkv, or the unfused path's tensors) instead of reading them back from
    the pages: the same logits, bit for bit, and no page gathered."""
    from braid_engine.attention import torch_backend

    path = make_tiny_checkpoint(tmp_path / "q", k_norm_max=96.5)
    ids = [3, 17, 42, 8, 99, 5, 61, 23, 7, 11, 4, 250, 31]
    gathers = []
    gather = torch_backend._gather
    monkeypatch.setattr(torch_backend, "_gather", lambda *a: gathers.append(1) or gather(*a))
    own = _logits(path, fused, ids, device)
    assert not gathers
    monkeypatch.setattr(TorchBackend, "own_kv_fresh", False)
    paged = _logits(path, fused, ids, device)
    assert gathers  # one per layer
    assert torch.equal(own, paged)
