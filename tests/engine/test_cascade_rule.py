"""The cascade cost rule follows the H100 measurements in docs/gpu.md."""

import pytest
import torch

from braid_engine.attention.base import BatchLayout
from braid_engine.attention.flashinfer_backend import cascade_pays, choose_groups


@pytest.mark.parametrize("size,shared,unique,pays", [
    (8, 32768, 128, False),   # measured 0.50: groups of 8 never win
    (32, 1024, 128, False),   # 0.75
    (32, 2048, 64, False),    # 69.6 µs plain vs 70.8 µs cascade
    (32, 4096, 128, True),    # 1.21
    (32, 4096, 1024, False),  # 0.94: the unique part is too long
    (128, 1024, 128, True),   # 1.12
    (256, 32768, 128, True),  # 10.7
])
def test_cascade_pays(size, shared, unique, pays):
    assert cascade_pays(size, shared, unique) is pays


def _layout(n: int, shared_pages: int, ps: int = 16) -> BatchLayout:
    tables = [list(range(shared_pages)) + [1000 + i] for i in range(n)]
    kv = [shared_pages * ps + 5] * n
    return BatchLayout([1] * n, kv, tables, ps, torch.zeros(n, dtype=torch.long))


def test_choose_groups_overrides():
    small = _layout(4, 8)
    assert choose_groups(small, "auto") == []
    assert len(choose_groups(small, "always")) == 1
    big = _layout(32, 256)
    assert len(choose_groups(big, "auto")) == 1
    assert choose_groups(big, "never") == []
