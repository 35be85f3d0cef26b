"""The page pool's bulk allocation and release hand out and take back the same pages, in the
same order, with the same counts, as doing it page by page."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braid_engine.engine.kv_cache import PagePool


class PageByPage:
    """The pool as it was written first: one pop, one count, one append per page."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self.refs = [0] * num_pages
        self.free = list(range(num_pages - 1, -1, -1))
        self.peak_used = 0

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        pages = [self.free.pop() for _ in range(n)]
        for p in pages:
            self.refs[p] = 1
        self.peak_used = max(self.peak_used, self.num_pages - len(self.free))
        return pages

    def incref(self, pages: list[int]) -> None:
        for p in pages:
            self.refs[p] += 1

    def decref(self, pages: list[int]) -> None:
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["allocate", "share", "release"]), st.integers(0, 40),
                          st.integers(0, 1 << 30)), max_size=60))
def test_bulk_pool_matches_page_by_page(ops):
    pool, ref = PagePool(64, 4), PageByPage(64)
    held: list[list[int]] = []  # each holder's pages, as a sequence or a cache node names them
    for op, n, pick in ops:
        if op == "allocate":
            got = pool.allocate(n)
            assert got == ref.allocate(n)
            if got:
                held.append(got)
        elif held and op == "share":  # another holder of some of a holder's pages (a cached prefix)
            pages = held[pick % len(held)]
            part = pages[:1 + pick % len(pages)]
            pool.incref(part)
            ref.incref(part)
            held.append(list(part))
        elif held:
            pages = held.pop(pick % len(held))
            pool.decref(pages)
            ref.decref(pages)
        assert pool.refs == ref.refs and pool._free == ref.free and pool.peak_used == ref.peak_used
    for pages in held:
        pool.decref(pages)
    assert pool.num_free == 64 and not any(pool.refs)


def test_release_of_shared_pages_frees_only_the_last_references():
    pool = PagePool(8, 4)
    a = pool.allocate(3)
    assert a == [0, 1, 2] and pool.allocate(6) is None
    pool.incref(a[:2])  # a cache node names the first two
    pool.decref(a)
    assert pool.refs[:3] == [1, 1, 0] and pool._free[-1] == 2
    pool.decref(a[:2])
    assert pool.num_free == 8 and pool._free[-2:] == [0, 1]
    assert pool.allocate(2) == [1, 0]  # the last freed come out first


def test_a_free_page_gains_no_reference_and_none_is_released_twice():
    pool = PagePool(8, 4)
    a = pool.allocate(3)
    with pytest.raises(AssertionError, match="page 3 is free"):
        pool.incref([3])
    pool.decref(a)
    with pytest.raises(AssertionError, match="page 0 released more often"):
        pool.decref(a)
