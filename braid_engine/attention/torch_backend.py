"""Reference attention in plain torch: paged prefill/decode with GQA, and cascade levels.

A sequence attended alone goes through torch's SDPA in the model dtype, as transformers does;
cascade levels compute in float32 with their log-sum-exp and merge. It runs anywhere, and it
is the oracle the fast backends are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def attend_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last n positions over all m keys, through torch's SDPA (no LSE)."""
    n, m = q.shape[0], k.shape[0]
    mask = None if n == m else (torch.arange(m, device=q.device)[None, :]
                                <= torch.arange(m - n, m, device=q.device)[:, None])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.to(q.dtype).transpose(0, 1)[None], v.to(q.dtype).transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None and n > 1, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


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
    # a step of fresh sequences only (no key before their queries) attends the k/v it is handed,
    # as the FlashInfer backend's ragged prefill does, instead of gathering them back from the
    # pages: the same values, one gather fewer, and the CPU suite runs the models' own-k/v path
    own_kv_fresh = True

    def plan(self, layout: BatchLayout) -> None:
        self.layout = layout
        device = self.kv_cache.device
        min_shared = 1 if self.cascade == "always" else self.min_cascade_tokens
        self.groups = [] if self.cascade == "never" else shared_prefix_groups(layout, min_shared)
        self.cascade_steps += bool(self.groups)
        self.own_kv = self.own_kv_fresh and not self.groups and layout.query_lens == layout.kv_lens
        shared_of = {}
        for g in self.groups:
            for s in range(g.first, g.last):
                shared_of[s] = len(g.shared_pages) * layout.page_size
        self.seqs = []
        start = 0
        ps = layout.page_size
        for i, (ql, kl, table) in enumerate(zip(layout.query_lens, layout.kv_lens, layout.page_tables)):
            shared = shared_of.get(i, 0)
            # the sequence's own pages after the shared ones, and where its keys start and end in them
            pages = torch.tensor(table[shared // ps: -(-kl // ps)], dtype=torch.long, device=device)
            q_pos = torch.arange(kl - ql, kl, device=device)
            self.seqs.append((start, ql, pages, kl - shared, shared, q_pos))
            start += ql
        self.group_pages = []
        for g in self.groups:
            pages = torch.tensor(g.shared_pages, dtype=torch.long, device=device)
            q_start = self.seqs[g.first][0]
            q_end = self.seqs[g.last - 1][0] + self.seqs[g.last - 1][1]
            self.group_pages.append((q_start, q_end, pages))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None) -> torch.Tensor:
        cache = self.kv_cache[layer]
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        if self.own_kv:
            for start, ql, *_ in self.seqs:
                rows = slice(start, start + ql)
                # rounded through the cache's dtype, as the keys read back from it would be
                out[rows] = attend_fast(q[rows], k[rows].to(cache.dtype), v[rows].to(cache.dtype), self.scale)
            return out.to(q.dtype)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        for start, ql, pages, n_keys, shared, q_pos in self.seqs:
            k_seq, v_seq = _gather(cache, pages, n_keys)
            if not shared:  # no cascade level to merge with: no LSE needed
                out[start:start + ql] = attend_fast(q[start:start + ql], k_seq, v_seq, self.scale)
                continue
            o, s = attend(q[start:start + ql], k_seq, v_seq, self.scale, q_pos, shared)
            out[start:start + ql], lse[start:start + ql] = o, s
        for q_start, q_end, pages in self.group_pages:
            k_shared, v_shared = _gather(cache, pages, len(pages) * cache.shape[3])
            o, s = attend(q[q_start:q_end], k_shared, v_shared, self.scale)
            out[q_start:q_end], lse[q_start:q_end] = merge_states(
                o, s, out[q_start:q_end], lse[q_start:q_end])
        return out.to(q.dtype)


def _gather(cache: torch.Tensor, pages: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n keys and values stored in ``pages`` of one layer: two [n, kv_heads, dim]."""
    kv = cache[pages]  # [pages, 2, H, P, D]
    kv = kv.permute(1, 0, 3, 2, 4).reshape(2, -1, kv.shape[2], kv.shape[4])[:, :n]
    return kv[0], kv[1]
