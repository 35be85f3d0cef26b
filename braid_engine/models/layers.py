"""The shared decoder layers. Numerics follow transformers' order so fp32 outputs match it."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from braid_engine import kernels
from braid_engine.attention.base import BatchLayout
from braid_engine.config import ModelConfig
from braid_engine.errors import CheckpointError


class AttentionContext(Protocol):
    """What a model needs from the attention backend during one forward (set per step)."""

    kv_cache: torch.Tensor
    layout: BatchLayout | None
    own_kv: bool  # attend wants the step's own k, v (all its keys are new)

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None) -> torch.Tensor:
        ...


class RMSNorm(nn.Module):
    """RMSNorm; given ``residual`` it first adds it and returns (normed, x + residual)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.fused = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            from braid_engine.kernels.rmsnorm import add_rms_norm, rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """Default RoPE. ``interleaved`` pairs (0,1),(2,3)… as ERNIE-4.5 does; otherwise halves."""

    def __init__(self, head_dim: int, base: float, max_positions: int, interleaved: bool) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
        self.register_buffer("cos", torch.cat((freqs, freqs), -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat((freqs, freqs), -1).sin(), persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q, k: [tokens, heads, head_dim]
        cos = self.cos[positions].to(q.dtype)[:, None, :]
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        if not self.interleaved:
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        half = cos.shape[-1] // 2
        cos = cos[..., :half].repeat_interleave(2, dim=-1).float()
        sin = sin[..., :half].repeat_interleave(2, dim=-1).float()
        qe = q.float() * cos + _rotate_pairs(q).float() * sin
        ke = k.float() * cos + _rotate_pairs(k).float() * sin
        return qe.to(q.dtype), ke.to(k.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


class MergedLinear(nn.Linear):
    """One matmul for several projections that read the same input (q/k/v, gate/up).

    ``shards`` maps each checkpoint projection name to its rows in the merged weight.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shards: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shards[name] = (start, size)
            start += size


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, qk_norm: bool, interleaved_rope: bool,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q_proj": q_size, "k_proj": kv_size,
                                                       "v_proj": kv_size}, cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.rotary = [rotary]  # shared, kept out of this module's parameters
        self.interleaved_rope = interleaved_rope
        self.fused = False

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x), ctx))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The attention between the projections: q/k norms, RoPE, the KV write and attention
        over the cache; returns [tokens, heads * head_dim], o_proj's input."""
        t = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.fused and not self.interleaved_rope:
            from braid_engine.kernels.qk_norm_rope import qk_norm_rope_write_kv

            has_norm = self.q_norm is not None
            rope = self.rotary[0]
            own = ctx.own_kv  # the rotated k comes back in qkv's k columns, beside v
            q = qk_norm_rope_write_kv(
                qkv, positions, self.q_norm.weight if has_norm else None,
                self.k_norm.weight if has_norm else None, self.q_norm.eps if has_norm else 0.0,
                rope.cos, rope.sin, ctx.kv_cache[self.layer], ctx.layout.slot_mapping,
                self.num_heads, self.num_kv_heads, k_in_place=own)
            if not own:
                return ctx.attend(self.layer, q).reshape(t, q_size)
            k, v = qkv[:, q_size:].unflatten(1, (2 * self.num_kv_heads, self.head_dim)).chunk(2, dim=1)
            return ctx.attend(self.layer, q, k, v).reshape(t, q_size)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary[0](positions, q, k)
        return ctx.attention(self.layer, q, k, v).reshape(t, q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {cfg.hidden_act!r} is not supported; only 'silu' is.")
        n = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate_proj": n, "up_proj": n}, cfg.mlp_bias)
        self.down_proj = nn.Linear(n, cfg.hidden_size, bias=cfg.mlp_bias)
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused:
            from braid_engine.kernels.activation import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, qk_norm: bool, interleaved_rope: bool,
                 rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, qk_norm, interleaved_rope, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.fused = False

    # fused layers run steps of a few rows (kernels.ROW_KERNEL_ROWS) through the row matmul
    # kernels (kernels/gemv.py); benchmarks switch it off to measure what it saves
    row_kernels = True
    MAX_ROW_WIDTH = 8192  # the norm prologue holds a whole hidden row in registers; wider: cuBLAS

    def set_fused(self, enabled: bool) -> None:
        """Switch this layer's norms, attention prologue and activation to the Triton kernels."""
        self.fused = enabled
        for mod in (self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm):
            mod.fused = enabled

    def takes_rows(self, rows: int, width: int) -> bool:
        """Whether a step of ``rows`` rows of ``width`` runs through the row kernels here."""
        return (self.fused and self.row_kernels and 1 <= rows <= kernels.ROW_KERNEL_ROWS
                and rows <= kernels.ROW_KERNEL_MAX_ROWS and width <= self.MAX_ROW_WIDTH)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                ctx: AttentionContext, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x is the previous layer's MLP output (or the embeddings with ``residual`` None);
        returns this layer's MLP output and the residual stream before it is added. ``ids``
        (a first layer that ``takes_rows``): x is the embedding table, the input its rows ``ids``."""
        if ids is not None or self.takes_rows(x.shape[0], x.shape[1]):
            return self._forward_row(positions, x, residual, ctx, ids)
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(positions, h, ctx), residual)
        return self.mlp(h), residual

    def _forward_row(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                     ctx: AttentionContext, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A few tokens: each norm and the SiLU·mul run inside the matmul after them."""
        from braid_engine.kernels.gemv import norm_matmul, row_matmul, silu_matmul, silu_out_fits

        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv, residual = norm_matmul(x, residual, norm1.weight, norm1.eps, attn.qkv_proj.weight,
                                    attn.qkv_proj.bias, ids=ids)
        h = row_matmul(attn.attend(positions, qkv, ctx), attn.o_proj.weight, attn.o_proj.bias)
        # SiLU·mul written by the gate_up matmul (then down_proj is a plain one), or computed in
        # down_proj's prologue
        silu_out = kernels.ROW_SILU_OUT and silu_out_fits(mlp.gate_up_proj.weight)
        mid, residual = norm_matmul(h, residual, norm2.weight, norm2.eps, mlp.gate_up_proj.weight,
                                    mlp.gate_up_proj.bias, silu_out=silu_out)
        down = row_matmul if silu_out else silu_matmul
        return down(mid, mlp.down_proj.weight, mlp.down_proj.bias), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, qk_norm: bool, interleaved_rope: bool,
                 max_positions: int) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, max_positions, interleaved_rope)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, qk_norm, interleaved_rope, self.rotary)
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        layers = iter(self.layers)
        table = self.embed_tokens.weight
        if kernels.FOLD_EMBEDDING and self.layers[0].takes_rows(input_ids.shape[0], table.shape[1]):
            # the first layer's qkv kernel gathers the embeddings itself
            x, residual = next(layers)(positions, table, None, ctx, ids=input_ids)
        else:
            x, residual = self.embed_tokens(input_ids), None
        for layer in layers:
            x, residual = layer(positions, x, residual, ctx)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """A decoder-only LM. Subclasses set the architecture's switches."""

    qk_norm = False
    interleaved_rope = False

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.qk_norm, self.interleaved_rope,
                                  max_positions or cfg.max_position_embeddings)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def set_fused(self, layers: set[int] | None, final_norm: bool) -> None:
        """Use the Triton kernels in ``layers`` (None: all) and the final norm; torch elsewhere."""
        for i, layer in enumerate(self.model.layers):
            layer.set_fused(layers is None or i in layers)
        self.model.norm.fused = final_norm

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """The LM head's logits, in float32 or (``float32=False``) in the model dtype they are
        computed in."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits

    def checkpoint_names(self) -> dict[str, tuple[nn.Parameter, tuple[int, int] | None]]:
        """Map every checkpoint tensor name this model expects to (parameter, rows or None)."""
        names: dict[str, tuple[nn.Parameter, tuple[int, int] | None]] = {}
        for mod_name, mod in self.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, MergedLinear):
                    prefix = mod_name.rsplit(".", 1)[0]
                    for shard, rows in mod.shards.items():
                        names[f"{prefix}.{shard}.{p_name}"] = (p, rows)
                else:
                    names[f"{mod_name}.{p_name}"] = (p, None)
        if self.config.tie_word_embeddings:
            names.pop("lm_head.weight", None)
        return names
