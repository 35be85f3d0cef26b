"""A radix tree over KV pages: every finished request's prompt *and* output stay cached.

Each node holds a run of tokens (its edge) at absolute positions ``[start, end)`` and the
pages that hold their KV: page index ``j`` of the sequence for ``j`` in
``start // page_size … (end - 1) // page_size``. A page may straddle a node boundary; the
deepest node that names a page vouches for every position of that page up to its own end.
A match that ends inside a page hands the caller that page to copy (copy-on-write), so no
request ever writes into a page the tree still vouches for.

The tree holds one page-pool reference per page per node. ``lock`` counts running requests
(and pins) at or below a node; only unlocked, unpinned leaves are evicted, least recently
used first.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from braid_engine.engine.kv_cache import PagePool

_clock = itertools.count(1)


@dataclass(eq=False)
class RadixNode:
    tokens: list[int]
    start: int
    pages: list[int]
    parent: RadixNode | None = None
    children: dict[int, RadixNode] = field(default_factory=dict)
    lock: int = 0
    pins: int = 0
    last_access: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class CacheStats:
    prefix_hits: int = 0
    hit_tokens: int = 0
    lookups: int = 0
    evictions: int = 0
    evicted_pages: int = 0


class RadixCache:
    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = RadixNode(tokens=[], start=0, pages=[])
        self.root.lock = 1  # the root is never evicted
        self.stats = CacheStats()

    # -- lookup ------------------------------------------------------------------------
    def match(self, tokens: list[int]) -> tuple[RadixNode, int, list[int]]:
        """Longest cached prefix of ``tokens``: (its node, its length, page table covering it).

        Splits a node where the match ends inside it, so the returned node ends exactly there.
        """
        node, pos = self.root, 0
        path: list[RadixNode] = []
        now = next(_clock)
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            k = _common_prefix(child.tokens, tokens, pos)
            if k < len(child.tokens):
                child = self._split(child, k)
            child.last_access = now
            path.append(child)
            node, pos = child, pos + k
            if k < len(child.tokens):
                break
        return node, pos, self._page_table(path, pos)

    def _page_table(self, path: list[RadixNode], length: int) -> list[int]:
        ps = self.page_size
        table = [-1] * (-(-length // ps))
        for node in path:
            first = node.start // ps
            table[first:first + len(node.pages)] = node.pages
        return table

    # -- insert ------------------------------------------------------------------------
    def insert(self, tokens: list[int], page_table: list[int], start: RadixNode | None = None) -> RadixNode:
        """Cache ``tokens`` whose KV lies in ``page_table``; returns the node ending at len(tokens).
        ``start``, a node on the path of ``tokens`` (one this sequence matched or inserted and still
        locks), skips walking the prefix it ends: a node keeps its end when split above it."""
        node, pos = self.root, 0
        now = next(_clock)
        if start is not None and start.end <= len(tokens):
            node, pos = start, start.end
            above = start
            while above is not self.root:  # as a walk from the root would have touched them
                above.last_access = now
                above = above.parent
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                ps = self.page_size
                pages = page_table[pos // ps: (len(tokens) - 1) // ps + 1]
                self.pool.incref(pages)
                self._hand_over(node, pos, pages[0])
                child = RadixNode(tokens=tokens[pos:], start=pos, pages=pages, parent=node)  # a new list
                node.children[tokens[pos]] = child
                child.last_access = now
                return child
            k = _common_prefix(child.tokens, tokens, pos)
            if k < len(child.tokens):
                child = self._split(child, k)
            child.last_access = now
            node, pos = child, pos + k
        return node

    def _hand_over(self, node: RadixNode, end: int, copy: int) -> None:
        """A child starting at ``end`` inside a page of ``node`` brought its own copy of that
        page (copy-on-write when its sequence was admitted): the copy holds ``node``'s tokens of
        that page too, byte for byte, so ``node`` names the copy instead and the original is
        freed once nothing else names it — otherwise every mid-page branch (each turn of a
        conversation) would keep one page twice. So do the nodes above ``node`` that end in the
        same page (a split leaves both halves naming the page it cuts).

        Not where a node below them that goes on naming the original (the lower half of a
        split) is pinned, or holds a pin below it: the original stays resident for that pin,
        and the copy would join the pinned pages too, one page past those the pin was checked
        against (``max_pinned_fraction``) for every such branch point."""
        if end % self.page_size == 0 or node is self.root or not node.pages or node.pages[-1] == copy:
            return
        original = node.pages[-1]
        chain = []
        while node is not self.root and node.pages and node.pages[-1] == original:
            chain.append(node)
            node = node.parent
        for upper in chain:
            for child in upper.children.values():
                if child.pages[0] == original and child not in chain and _holds_pin(child):
                    return
        for upper in chain:
            self.pool.incref([copy])
            self.pool.decref([original])
            upper.pages[-1] = copy

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        """Cut ``node`` after its first k tokens; returns the new upper node."""
        ps = self.page_size
        split_at = node.start + k
        n_upper = (split_at - 1) // ps - node.start // ps + 1
        first_lower = split_at // ps - node.start // ps
        upper = RadixNode(tokens=node.tokens[:k], start=node.start, pages=node.pages[:n_upper],
                          parent=node.parent, lock=node.lock, last_access=node.last_access)
        lower_pages = node.pages[first_lower:]
        # a page straddling the cut is named by both halves
        self.pool.incref(node.pages[first_lower:n_upper])
        node.parent.children[node.tokens[0]] = upper
        node.tokens, node.start, node.pages, node.parent = node.tokens[k:], split_at, lower_pages, upper
        upper.children[node.tokens[0]] = node
        return upper

    # -- locks, pins -------------------------------------------------------------------
    def lock(self, node: RadixNode, delta: int) -> None:
        while node is not None and node is not self.root:
            node.lock += delta
            assert node.lock >= 0
            node = node.parent

    def pin(self, node: RadixNode) -> None:
        node.pins += 1
        self.lock(node, 1)

    def unpin(self, node: RadixNode) -> None:
        node.pins -= 1
        self.lock(node, -1)

    # -- eviction ----------------------------------------------------------------------
    def evict(self, num_pages: int) -> int:
        """Evict least-recently-used unlocked leaves until ``num_pages`` pages are free (or
        nothing evictable remains). Returns the number of free pages."""
        if self.pool.num_free >= num_pages:
            return self.pool.num_free
        heap = [(n.last_access, id(n), n) for n in self._leaves() if n.lock == 0]
        heapq.heapify(heap)
        while heap and self.pool.num_free < num_pages:
            _, _, node = heapq.heappop(heap)
            self._remove(node)
            parent = node.parent
            if parent is not self.root and not parent.children and parent.lock == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return self.pool.num_free

    def _remove(self, node: RadixNode) -> None:
        del node.parent.children[node.tokens[0]]
        self.pool.decref(node.pages)
        self.stats.evictions += 1
        self.stats.evicted_pages += len(node.pages)

    def clear(self) -> None:
        """Evict every unlocked node."""
        self.evict(self.pool.num_pages)

    # -- introspection -----------------------------------------------------------------
    def nodes(self) -> list[RadixNode]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def _leaves(self) -> list[RadixNode]:
        return [n for n in self.nodes() if not n.children]

    def cached_pages(self) -> set[int]:
        return {p for n in self.nodes() for p in n.pages}

    def path_pages(self, node: RadixNode) -> set[int]:
        """The pages of ``node`` and of every node above it."""
        pages: set[int] = set()
        while node is not self.root:
            pages.update(node.pages)
            node = node.parent
        return pages

    def pinned_pages(self) -> set[int]:
        return set().union(*(self.path_pages(n) for n in self.nodes() if n.pins))

    def page_refs(self) -> dict[int, int]:
        """References the tree holds on each page (for consistency checks)."""
        refs: dict[int, int] = {}
        for n in self.nodes():
            for p in n.pages:
                refs[p] = refs.get(p, 0) + 1
        return refs


def _holds_pin(node: RadixNode) -> bool:
    """Whether ``node`` or a node below it is pinned. A pin locks every node above it, so only
    locked nodes are walked (those of pins and running requests)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.pins:
            return True
        stack.extend(c for c in n.children.values() if c.lock)
    return False


def _common_prefix(edge: list[int], tokens: list[int], pos: int) -> int:
    """Length of the common prefix of ``edge`` and ``tokens[pos:]``. Histories run to many
    thousand tokens, so slices are compared (in C) and halved, not walked token by token."""
    n = min(len(edge), len(tokens) - pos)
    if edge[:n] == tokens[pos:pos + n]:
        return n
    lo, hi = 0, n  # edge[:lo] matches; edge[:hi] does not
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if edge[lo:mid] == tokens[pos + lo:pos + mid]:
            lo = mid
        else:
            hi = mid
    while edge[lo] == tokens[pos + lo]:
        lo += 1
    return lo
