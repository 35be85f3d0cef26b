"""Reference attention in plain torch: paged prefill/decode with GQA, and cascade levels.

Computes in float32 whatever the cache dtype, so it is the oracle the fast backends match.
"""

from __future__ import annotations

import torch

from braid_engine.attention.base import AttentionBackend, BatchLayout, shared_prefix_groups


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           q_pos: torch.Tensor | None = None, k_start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [n, Hq, D] over k, v [m, Hkv, D] → (out [n, Hq, D] fp32, lse [n, Hq] fp32).

    With ``q_pos``, query i sees key j only when ``k_start + j <= q_pos[i]`` (causal).
    """
    n, hq, d = q.shape
    m, hkv, _ = k.shape
    g = hq // hkv
    qf = q.float().reshape(n, hkv, g, d)
    s = torch.einsum("nhgd,mhd->hgnm", qf, k.float()) * scale
    if q_pos is not None:
        k_pos = torch.arange(k_start, k_start + m, device=q.device)
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("hgnm,mhd->nhgd", p, v.float()).reshape(n, hq, d)
    return out, lse.permute(2, 0, 1).reshape(n, hq)


def merge_states(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
    return out, m + torch.log(w1 + w2)


class TorchBackend(AttentionBackend):
    name = "torch"
    #  a shared prefix shorter than this is attended per sequence (cascade costs a merge)
    min_cascade_tokens = 256

    def plan(self, layout: BatchLayout) -> None:
        self.layout = layout
        device = self.kv_cache.device
        min_shared = 1 if self.cascade == "always" else self.min_cascade_tokens
        self.groups = [] if self.cascade == "never" else shared_prefix_groups(layout, min_shared)
        shared_of = {}
        for g in self.groups:
            for s in range(g.first, g.last):
                shared_of[s] = len(g.shared_pages) * layout.page_size
        self.seqs = []
        start = 0
        ps = layout.page_size
        for i, (ql, kl, table) in enumerate(zip(layout.query_lens, layout.kv_lens, layout.page_tables)):
            shared = shared_of.get(i, 0)
            pages = torch.tensor(table[: -(-kl // ps)], dtype=torch.long, device=device)
            slots = (pages[:, None] * ps + torch.arange(ps, device=device)[None, :]).reshape(-1)[:kl]
            q_pos = torch.arange(kl - ql, kl, device=device)
            self.seqs.append((start, ql, slots[shared:], shared, q_pos))
            start += ql
        self.group_slots = []
        for g in self.groups:
            pages = torch.tensor(g.shared_pages, dtype=torch.long, device=device)
            slots = (pages[:, None] * ps + torch.arange(ps, device=device)[None, :]).reshape(-1)
            q_start = self.seqs[g.first][0]
            q_end = self.seqs[g.last - 1][0] + self.seqs[g.last - 1][1]
            self.group_slots.append((q_start, q_end, slots))

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        cache = self.kv_cache[layer]
        _, _, hkv, ps, d = cache.shape
        # [pages, 2, H, P, D] → [2, pages*P, H, D]
        flat = cache.permute(1, 0, 3, 2, 4).reshape(2, -1, hkv, d)
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        for start, ql, slots, shared, q_pos in self.seqs:
            o, s = attend(q[start:start + ql], flat[0, slots], flat[1, slots], self.scale, q_pos, shared)
            out[start:start + ql], lse[start:start + ql] = o, s
        for q_start, q_end, slots in self.group_slots:
            o, s = attend(q[q_start:q_end], flat[0, slots], flat[1, slots], self.scale)
            out[q_start:q_end], lse[q_start:q_end] = merge_states(
                o, s, out[q_start:q_end], lse[q_start:q_end])
        return out.to(q.dtype)
