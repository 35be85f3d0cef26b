"""Turns a scheduled batch into one forward pass: flat inputs, positions, the attention plan."""

from __future__ import annotations

import torch

from braid_engine.attention.base import AttentionBackend, BatchLayout
from braid_engine.engine.sequence import Sequence
from braid_engine.models.layers import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device

    @torch.inference_mode()
    def execute(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the batch's new tokens; logits [n, vocab] (fp32) for the sequences whose
        every token is now computed, i.e. that sample their next token, in batch order."""
        # sequences sharing leading pages sit next to each other so a plan can cascade them
        batch = sorted(batch, key=lambda b: b[0].page_table)
        ps = self.page_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_rows: list[int] = []
        samplers: list[Sequence] = []
        for seq, n in batch:
            start = seq.num_computed
            tokens = seq.all_token_ids
            ids.extend(tokens[start:start + n])
            pos = range(start, start + n)
            positions.extend(pos)
            slots.extend(seq.page_table[p // ps] * ps + p % ps for p in pos)
            if start + n == len(tokens):
                last_rows.append(len(ids) - 1)
                samplers.append(seq)
        dev = self.device
        layout = BatchLayout(
            query_lens=[n for _, n in batch],
            kv_lens=[seq.num_computed + n for seq, n in batch],
            page_tables=[seq.page_table for seq, _ in batch],
            page_size=ps,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
        )
        self.backend.plan(layout)
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev), self.backend)
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=dev)])
        return logits, samplers
