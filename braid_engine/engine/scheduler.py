"""Continuous batching: which sequences compute how many tokens this step.

Every step each running sequence computes the tokens whose KV is not yet cached — one for a
decoding sequence, a chunk of the prompt for a prefilling one — within a token budget. New
requests join when pages allow; when decode runs out of pages the newest request is
preempted (its pages freed, recomputed later, usually from the prefix cache). A request alone
that can never grow beside the pinned prefixes is handed to the engine to end (``stuck``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from braid_engine.config import EngineConfig
from braid_engine.engine.kv_cache import PagePool
from braid_engine.engine.prefix_cache import RadixCache
from braid_engine.engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: PagePool, cache: RadixCache | None,
                 copy_page: Callable[[int, int], None]) -> None:
        self.cfg = cfg
        self.pool = pool
        self.cache = cache
        self.copy_page = copy_page
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefilled_tokens = 0  # prompt (and recomputed) tokens run through the model
        self.decoded_tokens = 0  # one per decode step per sequence
        self.reused_tokens = 0  # tokens whose KV came from the prefix cache
        self.preempted = False  # whether the last schedule() preempted (and so admitted nobody)
        self.blocked: Sequence | None = None  # a request the last schedule() found stuck (``stuck``)
        # requests the last schedule() took off the queue but could not admit, their admission
        # having raised (a failed copy of a cached page), each with its error: the engine fails them
        self.failed: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget = self.cfg.max_num_batched_tokens
        # while sequences decode, prompts advance by at most this many tokens a step
        chunk = self.cfg.prefill_chunk_while_decoding
        if chunk is not None and not any(s.is_decoding for s in self.running if s.status is Status.RUNNING):
            chunk = None
        batch: list[tuple[Sequence, int]] = []
        in_batch: set[int] = set()  # ids of the sequences already in it: a victim is never one
        preemptions_before = self.num_preemptions
        self.blocked = None
        self.failed = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget == 0:
                continue
            n = self._chunk(seq, budget, chunk)
            while not self._reserve(seq, seq.num_computed + n):
                victims = [s for s in self.running if s is not seq and id(s) not in in_batch]
                victim = max(victims or [seq], key=lambda s: s.arrival)
                if victim is seq and len(self.running) == 1 and self._stalled(seq):
                    self.blocked = seq
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                in_batch.add(id(seq))
                budget -= n
        self.preempted = preempted = self.num_preemptions > preemptions_before
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and not preempted:
            seq = self.waiting.popleft()
            try:
                self._match_prefix(seq)
            except Exception as e:  # that request fails alone; the batch goes on without it
                self.failed.append((seq, e))
                continue
            if self._prefix_in_flight(seq):
                self.release(seq)  # wait for the sharer's prompt to land in the cache, then reuse it
                seq.num_computed = 0
                deferred.append(seq)
                continue
            n = self._chunk(seq, budget, chunk)
            if not self._reserve(seq, seq.num_computed + n):
                self.release(seq)  # a waiting request holds no pages, so waiters never deadlock
                seq.num_computed = 0
                self.waiting.appendleft(seq)
                break
            if self._caches(seq) and not seq.admitted:  # (readmitted: it may match its own chunks)
                self.cache.stats.lookups += 1
                self.cache.stats.prefix_hits += seq.num_computed > 0
                self.cache.stats.hit_tokens += seq.num_computed
            seq.admitted = True
            self.reused_tokens += seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        for seq, n in batch:
            if n == 1 and seq.is_decoding:
                self.decoded_tokens += 1
            else:
                self.prefilled_tokens += n
        return batch

    @staticmethod
    def _chunk(seq: Sequence, budget: int, cap: int | None) -> int:
        """The tokens ``seq`` computes this step: what it has left, within the budget and, for a
        prompt while others decode, ``cap``."""
        n = min(len(seq) - seq.num_computed, budget)
        return n if cap is None or n == 1 else min(n, cap)

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether a running request is still prefilling a prompt that shares at least a page
        more with ``seq`` than the cache holds: admitting ``seq`` now would compute it twice."""
        if not self._caches(seq):
            return False
        want = seq.num_computed + self.pool.page_size
        tokens = seq.token_range(0, want)
        for other in self.running:
            prompt = other.prompt_token_ids
            if (self._caches(other) and other.num_computed < len(prompt)
                    and len(prompt) >= want and tokens == prompt[:want]):
                return True
        return False

    def stuck(self) -> Sequence | None:
        """The request to end because it can never run on: the first waiting one when nothing
        runs and it still cannot be admitted, or one that, alone, preempted itself for a page and
        cannot grow (``_stalled``). The engine ends it at the length it has ("length") if it has
        generated tokens, else fails it (``KVCacheFullError``). Not right after another
        preemption: that schedule tried no admission (a request alone that preempted itself for a
        page often fits again from the cache). Nor, while it could fit there, one that uses the
        prefix cache: it is tried again without it (``_without_cache``)."""
        if self.running or not self.waiting:
            return None
        seq = self.waiting[0]
        if self.preempted:
            return seq if seq is self.blocked else None
        return None if self._without_cache(seq) else seq

    def room(self) -> int:
        """Tokens of KV a request alone on the engine can hold without the prefix cache: the
        pool beside the pinned prefixes (nothing else locks a page while nothing else runs)."""
        pinned = len(self.cache.pinned_pages()) if self.cache is not None else 0
        return (self.pool.num_pages - pinned) * self.pool.page_size

    def _without_cache(self, seq: Sequence) -> bool:
        """``seq``, alone, found no pages: whether to run it again without reading the prefix
        cache, where it reads the cache and would fit. The nodes its prefix matches keep pages
        locked besides its own (the page it copies, other branches' copies of a page along the
        path), so a request within max_model_len may not fit beside them; without them it holds
        only pages of its own (its KV still enters the tree when it ends: ``cache_sequence``).
        Else it is stuck: beside the pins it can never hold more than ``room()``."""
        if not self._caches(seq) or len(seq) > self.room():
            return False
        seq.uncached = True
        if not seq.output_token_ids:
            seq.num_cached_tokens = 0
        return True

    def _stalled(self, seq: Sequence) -> bool:
        """``seq``, running alone, found no page with nothing left to evict: whether it is stuck.
        The first time, one that reads the prefix cache is readmitted from it (its lock moves to
        its own KV, which may free pages its match kept locked). Preempted alone again with no
        token more computed (readmitted, it ran into the same wall: a prompt, or a preempted
        request's recomputation, prefilled in chunks), or where it does not read the cache, it is
        run without the cache where it would fit (``_without_cache``), else stuck."""
        mark = (len(seq), seq.num_computed)
        again = seq.stall is not None and seq.stall[0] == mark[0] and seq.stall[1] >= mark[1]
        seq.stall = mark
        if self._caches(seq) and not again:
            return False
        return not self._without_cache(seq)

    def _caches(self, seq: Sequence) -> bool:
        """Whether ``seq`` reads the prefix cache, and writes it while it runs."""
        return self._stores(seq) and not seq.uncached

    def _stores(self, seq: Sequence) -> bool:
        """Whether ``seq``'s KV enters the prefix cache when it ends (an uncached request's too)."""
        return self.cache is not None and seq.params.enable_prefix_caching

    def _match_prefix(self, seq: Sequence) -> None:
        if not self._caches(seq):
            return
        # (token_range: one copy of a long prompt where all_token_ids[:-1] made two)
        node, m, table = self.cache.match(seq.token_range(0, len(seq) - 1))
        if m == 0:
            self._count_cached(seq, 0)
            return
        ps = self.pool.page_size
        self.cache.lock(node, 1)  # before any eviction below
        if m % ps:
            fresh = self.pool.allocate(1)
            if fresh is None:
                self.cache.evict(1)
                fresh = self.pool.allocate(1)
            if fresh is None:  # no page to copy the partial one into: reuse only full pages
                self.cache.lock(node, -1)
                node, m, table = self.cache.match(seq.token_range(0, m - m % ps))
                if m == 0:
                    self._count_cached(seq, 0)
                    return
                self.cache.lock(node, 1)
            else:
                try:
                    self.copy_page(table[-1], fresh[0])
                except BaseException:  # (a device fault) nothing else names the page or the lock
                    self.pool.decref(fresh)
                    self.cache.lock(node, -1)
                    raise
                self.pool.incref(table[:-1])
                table[-1] = fresh[0]
        if m % ps == 0:
            self.pool.incref(table)
        seq.cache_node = node
        seq.page_table = table
        seq.num_computed = m
        self._count_cached(seq, m)

    @staticmethod
    def _count_cached(seq: Sequence, m: int) -> None:
        """Cached tokens are what the cache held for the request when it was first admitted:
        readmitted after a preemption it may match the chunks it prefilled itself (never more than
        before; fewer, or none, where some were evicted and are computed again)."""
        seq.num_cached_tokens = min(seq.num_cached_tokens, m) if seq.admitted else m

    def _reserve(self, seq: Sequence, kv_len: int) -> bool:
        need = -(-kv_len // self.pool.page_size) - len(seq.page_table)
        if need <= 0:
            return True
        if self.pool.num_free < need and self.cache is not None:
            self.cache.evict(need)
        pages = self.pool.allocate(need)
        if pages is None:
            return False
        seq.page_table.extend(pages)
        return True

    def cache_sequence(self, seq: Sequence, ending: bool = False) -> None:
        """Insert the tokens whose KV ``seq`` has computed; move its lock to the new node.
        ``ending``: ``seq`` gives its pages back right after (finish, preemption). Only then does
        an ``uncached`` request insert: the lock it took while running would keep the tree's
        pages of its prefix beside its own copies of them, which is what it could not fit. The
        tree keeps the pages it already holds for that prefix; the copies go back with ``seq``'s."""
        if not (self._caches(seq) or ending and self._stores(seq)) or seq.num_computed == 0:
            return
        node = self.cache.insert(seq.token_range(0, seq.num_computed), seq.page_table, seq.cache_node)
        self.cache.lock(node, 1)
        if seq.cache_node is not None:
            self.cache.lock(seq.cache_node, -1)
        seq.cache_node = node

    def release(self, seq: Sequence) -> None:
        """Give back ``seq``'s pages and lock (its KV stays in the prefix cache if inserted)."""
        self.pool.decref(seq.page_table)
        seq.page_table = []
        if seq.cache_node is not None:
            self.cache.lock(seq.cache_node, -1)
            seq.cache_node = None

    def preempt(self, seq: Sequence) -> None:
        self.cache_sequence(seq, ending=True)
        self.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.cache_sequence(seq, ending=True)
        self.drop(seq)

    def drop(self, seq: Sequence) -> None:
        """``finish`` without caching ``seq``'s KV (where caching it failed): out of the queues
        first, so a failing release leaves no request behind that a step would run again."""
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
