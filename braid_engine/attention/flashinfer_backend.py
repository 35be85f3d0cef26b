"""FlashInfer attention on the HND paged cache: prefill, decode and a two-level cascade.

One plan per step serves every layer. The model applies RoPE itself before attention, so every
wrapper runs with ``pos_encoding_mode="NONE"`` and the reference's ``sm_scale`` (1/sqrt(D)).

Cascade: a group's shared prefix is attended once by a non-causal prefill over the group's
queries, each sequence's own suffix by the ordinary causal prefill (or decode), and the two are
merged by log-sum-exp. This is what ``MultiLevelCascadeAttentionWrapper`` does inside (its upper
levels are non-causal, its last level causal), but that wrapper needs every query in every
level, while here only the sequences of a group that pays its way share a level.
"""

from __future__ import annotations

from array import array
from itertools import accumulate

import torch

from braid_engine.attention.base import (
    AttentionBackend,
    BatchLayout,
    CascadeGroup,
    shared_prefix_groups,
)

# From the H100 table in docs/gpu.md (plain decode time / cascade time, 16/8 heads, D 128):
# groups of 8 lose at every prefix length (0.28-0.50); 32 × 2k breaks even (69.6 vs 70.8 µs);
# 32 × 4k (1.21) and 128 × 1k (1.12) win; a suffix a quarter of the prefix loses at 32 (0.94).
CASCADE_MIN_GROUP = 32
CASCADE_MIN_SHARED_WORK = 128 * 1024  # group size × shared tokens
CASCADE_MIN_SHARED_PER_UNIQUE = 8  # shared tokens per mean unique token of the group

_WORKSPACE_BYTES = 128 << 20


def cascade_pays(group_size: int, shared_tokens: int, mean_unique_tokens: float) -> bool:
    """Whether attending a shared prefix once for the group beats plain paged attention."""
    return (group_size >= CASCADE_MIN_GROUP
            and group_size * shared_tokens >= CASCADE_MIN_SHARED_WORK
            and shared_tokens >= CASCADE_MIN_SHARED_PER_UNIQUE * mean_unique_tokens)


def choose_groups(layout: BatchLayout, cascade: str, graphed: bool = False) -> list[CascadeGroup]:
    """The cascade groups of a step: none, every shared prefix, or those the cost rule picks.
    ``graphed``: the step would otherwise replay a decode graph. A cascade runs eagerly, and on an
    H100 64 requests on one 4k-token prompt decoded 2.7× faster from the graphs without it
    (6,256 vs 2,334 tokens/s, benchmarks/shared_prefix.py) though the rule's kernel timings
    favour it there: ``auto`` leaves such steps to the graphs."""
    if cascade == "never" or (graphed and cascade == "auto"):
        return []
    groups = shared_prefix_groups(layout, 1)
    if cascade == "always":
        return groups
    chosen = []
    for g in groups:
        shared = len(g.shared_pages) * layout.page_size
        unique = sum(layout.kv_lens[g.first:g.last]) / (g.last - g.first) - shared
        if cascade_pays(g.last - g.first, shared, unique):
            chosen.append(g)
    return chosen


def _starts(lens: list[int]) -> list[int]:
    """Where each request's rows start, and the end: the indptr of ``lens``."""
    return list(accumulate(lens, initial=0))


def _paged_kv(tables: list[list[int]], kv_lens: list[int], page_size: int,
              skip: list[int] | None = None) -> tuple[list[int], torch.Tensor, list[int]]:
    """FlashInfer's paged-KV description of sequences: indptr, page indices (an int32 host
    tensor), last-page lengths. ``skip[i]`` leading pages of sequence i are left out (a cascade
    level attends them). The indices go through a C array: 64 requests on a 4k-token prompt list
    16k of them each step: ``torch.tensor`` of a list that long takes ~1.6 ms, the array ~0.5."""
    indptr, indices, last = [0], [], []
    for i, (table, kv_len) in enumerate(zip(tables, kv_lens, strict=True)):
        pages = -(-kv_len // page_size)
        indices.extend(table[(skip[i] if skip else 0):pages])
        indptr.append(len(indices))
        last.append(kv_len - (pages - 1) * page_size if pages else 0)  # an empty request: no keys
    if not indices:
        return indptr, torch.empty(0, dtype=torch.int32), last
    return indptr, torch.frombuffer(array("i", indices), dtype=torch.int32), last


# one sequence's prefill of up to this many tokens replays a prefill graph (model_runner's largest
# PREFILL_GRAPH_TOKENS); eagerly it runs on the same fa2 kernels, so a graph never changes a result
SHORT_PREFILL_TOKENS = 256
# head dims whose fresh prompts may attend their own k/v (FlashInferBackend.ragged_fresh_prefill):
# 128 checked on an H200 and an H100, 64 (TinyLlama) on an H100, 2026-11-27
RAGGED_HEAD_DIMS = (64, 128)
# FlashInfer's fa2 prefill keeps a float32 partial output per (128-row query tile, key chunk)
# for every query head in its workspace; a split must leave room for it
_CTA_ROWS = 128


def _partial_bytes(num_qo_heads: int, head_dim: int) -> int:
    """Workspace bytes of one (query tile, key chunk) partial output: float32 for every query head."""
    return num_qo_heads * _CTA_ROWS * head_dim * 4


def _query_tiles(query_len: int, group: int) -> int:
    """fa2 packs a KV head's query heads with its rows: CTA tiles of 128 packed rows."""
    return -(-query_len * group // _CTA_ROWS)


def _split_pages(layout: BatchLayout, num_qo_heads: int, num_kv_heads: int, head_dim: int) -> int | None:
    """Split long KV for a prefill of few queries (a new turn after a long cached history):
    unsplit, one CTA per head walks all 8k keys (116 µs a layer on an H100 for 3 queries, in
    the fa3 kernel, which ignores a split size; these plans go to an fa2 wrapper). The chunk
    is widened until the partial outputs fit in half the workspace; None: no split."""
    longest = max(-(-kv // layout.page_size) for kv in layout.kv_lens)
    if sum(layout.query_lens) > 512 or longest < 128:
        return None
    group = num_qo_heads // num_kv_heads
    tiles = sum(_query_tiles(q, group) for q in layout.query_lens)
    chunks = (_WORKSPACE_BYTES // 2) // (_partial_bytes(num_qo_heads, head_dim) * tiles)
    if chunks < 2:
        return None
    return max(16, longest // 16, -(-longest // chunks))


def fa2_workspace_bytes(num_qo_heads: int, num_kv_heads: int, head_dim: int, num_sms: int,
                        graph_rows: int = SHORT_PREFILL_TOKENS) -> int:
    """Float workspace for the fa2 prefill wrappers. Left to choose (and in CUDA-graph mode,
    always) fa2 splits the keys into up to a few CTAs per SM for each KV head and keeps a float32
    partial output per (CTA, 128-row query tile) for every query head: with 16 query heads
    over 2 KV heads (ERNIE-4.5-0.3B) that passes 128 MB on an H100. A prefill graph of
    ``graph_rows`` rows keeps one per query tile of its rows at least (plus the padding
    request's)."""
    units = max(4 * num_sms // num_kv_heads, _query_tiles(graph_rows, num_qo_heads // num_kv_heads) + 2)
    return max(_WORKSPACE_BYTES, units * _partial_bytes(num_qo_heads, head_dim) + (16 << 20))


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    # decode steps of up to this many sequences (no cascade) run our split-KV Triton kernel
    # (braid_engine/kernels/decode_attention.py), which beats FlashInfer's decode plus merge
    # there (measured on an H100 up to 4; on an H200 batch 8 1.07x faster on it, batch 16 0.97x:
    # docs/benchmarks.md); 0 leaves every decode step to FlashInfer
    small_decode_batch = 8
    # prefill graphs of at least this many rows run FlashInfer's default prefill backend (fa3 on
    # Hopper, as an eager long prefill does) instead of fa2, which in graph mode always takes its
    # split-KV path; the short graphs stay on fa2, whose split a new turn's few queries over a
    # long history need. None: every graph on fa2. H100, prefill.py: 1k 8.44 -> 6.29 ms, 4k
    # 21.83 -> 16.47 ms, 16k 96.0 / 99.5 (docs/benchmarks.md)
    fa3_prefill_graph_rows: int | None = 512
    # decode graphs of at least this batch size get a cascade twin: one shared-prefix group's
    # prefix attended once for the group inside the graph (a non-causal fa2 prefill over every
    # row, merged by log-sum-exp into the group's rows only), so a step the cost rule cascades
    # keeps its graph. None: a cascaded step runs eagerly, and under "auto" graph-able decode
    # steps never cascade. H100, shared_prefix.py (64 requests on one 4k prompt): twins 15,495
    # tokens/s, plain graphs 6,465, eager cascade 2,498 (docs/benchmarks.md). Sizes up to
    # small_decode_batch decode through our kernel, which takes no cascade, and get no twin.
    cascade_graph_batch: int | None = 32
    # a fresh prompt (every key of the step its own: no cached prefix, no earlier chunk) past the
    # short bound, eagerly or in a fa3 prefill graph, attends its own k/v as they leave the q/k
    # prologue, contiguous, through FlashInfer's ragged-KV prefill instead of gathering them page
    # by page from the cache. H200, prefill_attention.py, one layer: 4k 174.3 -> 141.9 µs, 1k
    # 28.8 -> 22.0 (docs/benchmarks.md). False: the paged prefill for every step. Only for head
    # dims in RAGGED_HEAD_DIMS: those whose ragged kernels a GPU run has checked against the
    # reference (test_fresh_prompts_attend_their_own_keys_like_the_reference); others stay paged
    ragged_fresh_prefill = True

    def __init__(self, kv_cache: torch.Tensor, num_heads: int, head_dim: int, cascade: str = "auto") -> None:
        super().__init__(kv_cache, num_heads, head_dim, cascade)
        import flashinfer

        if kv_cache.device.type != "cuda":
            raise ValueError("the FlashInfer backend needs the KV cache on a CUDA device; use 'torch' on CPU.")
        if kv_cache.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the FlashInfer backend needs a float16 or bfloat16 KV cache, not {kv_cache.dtype}; "
                             "use dtype='bfloat16' or attention_backend='torch'.")
        self.num_kv_heads = kv_cache.shape[3]
        self.page_size = kv_cache.shape[4]

        def workspace() -> torch.Tensor:
            return torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=kv_cache.device)

        prefill_space = workspace()
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(prefill_space, "HND")
        # a fresh prompt's prefill over its own k/v; a step runs one or the other: one scratch
        self._ragged_wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(prefill_space, "NHD")
        # few queries over long KV: split the keys over CTAs. FlashInfer's Hopper (fa3) prefill
        # cannot split, so this one (and the prefill graphs, which serve the same case) use fa2;
        # so does one sequence's short prefill, as it would in a graph
        # one scratch buffer serves every fa2 wrapper: they run one at a time on one stream
        sms = self._sms = torch.cuda.get_device_properties(kv_cache.device).multi_processor_count
        self._fa2_workspace = torch.zeros(fa2_workspace_bytes(num_heads, self.num_kv_heads, head_dim, sms),
                                          dtype=torch.uint8, device=kv_cache.device)
        self._prefill_split = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._fa2_workspace, "HND",
                                                                            backend="fa2")
        self._eager_prefill = self._prefill
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace(), "HND")
        self._shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace(), "HND")
        self._merge = flashinfer.merge_state_in_place
        self._is_decode = False
        self._rows: slice | torch.Tensor | None = None
        self._graph_decode: dict[int, object] = {}  # captured batch size → fixed-buffer wrapper
        self._graph_workspace: torch.Tensor | None = None
        self._graph_prefill: dict[int, object] = {}  # captured token count → fixed-buffer wrapper
        self._graph_ragged: dict[int, object] = {}  # the same for fresh prompts (ragged_fresh_prefill)
        self._active = None  # the graph wrapper of this step, when it replays a graph
        self._small = None  # the split-KV Triton decode, made on first use
        self._small_args: tuple[torch.Tensor, torch.Tensor] | None = None  # (page table, kv lens) of this step
        self._graph_small: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # table, lens, base
        # captured batch size → its cascade twin's (decode wrapper, shared-prefix wrapper, group-row mask)
        self._graph_cascade: dict[int, tuple[object, object, torch.Tensor]] = {}
        self._cascade_level: tuple[object, torch.Tensor] | None = None  # this step's (shared wrapper, mask)

    def warm_up(self) -> None:
        """Plan and run each eager wrapper once on a made-up step, so FlashInfer builds (or loads
        from its disk cache) every kernel an eager step may call before the first request: built
        on first use, the fa3 prefill took 68-90 s inside a long prompt's first step and the
        cascade's kernels 12 s inside a batch's (H100). Attends only (nothing is written), over
        pages no request holds yet. The graphs' kernels are built when they are captured."""
        ps, pages = self.page_size, self.kv_cache.shape[1]
        no_slots = torch.empty(0)

        def one(tokens: int, queries: int) -> BatchLayout:  # one sequence on pages 0, 1, …
            return BatchLayout([queries], [tokens], [list(range(-(-tokens // ps)))], ps, no_slots)

        short, long = 16, SHORT_PREFILL_TOKENS + 16  # prefills for fa2 and (past the short bound) fa3
        if pages < max(3, -(-short // ps)):  # too small a pool to stage them; its first steps build them
            return
        decode = self.small_decode_batch + 1  # past our small-batch kernel: FlashInfer's decode
        cases = [(one(short, short), None), (one(ps + 1, 1), None),  # the small-batch kernel
                 (BatchLayout([1] * decode, [ps + 1] * decode, [[0, 1]] * decode, ps, no_slots), None)]
        if pages * ps >= long + ps:  # a fresh prompt (ragged when so set) and a chunk after a page of prefix
            cases += [(one(long, long), None), (one(long + ps, long), None)]
        if self.cascade != "never":  # two sequences on one shared page: a cascade level and its merge
            cases.append((BatchLayout([1, 1], [ps + 1] * 2, [[0, 1], [0, 2]], ps, no_slots), "always"))
        saved = self.cascade, self.cascade_steps
        try:
            for layout, cascade in cases:
                self.cascade = cascade or saved[0]
                self.plan(layout)
                q = torch.zeros(sum(layout.query_lens), self.num_heads, self.head_dim,
                                dtype=self.kv_cache.dtype, device=self.kv_cache.device)
                kv = torch.zeros(2, len(q), self.num_kv_heads, self.head_dim, dtype=q.dtype, device=q.device)
                self.attend(0, q, *kv)
            torch.cuda.synchronize(self.kv_cache.device)
        finally:
            self.cascade, self.cascade_steps = saved
            self._set_step(None, False)

    def _set_step(self, layout: BatchLayout | None, is_decode: bool, active: object = None,
                  groups: list[CascadeGroup] | None = None, small_args: tuple | None = None,
                  cascade_level: tuple | None = None, own_kv: bool = False) -> None:
        """Everything ``attend`` reads about the planned step, set in one place, so no plan
        leaves another's state behind. ``_rows`` (an eager cascade's rows) is set after it."""
        self.layout, self.groups, self._rows, self.own_kv = layout, groups or [], None, own_kv
        self._is_decode, self._active, self._small_args, self._cascade_level = (
            is_decode, active, small_args, cascade_level)

    def _common(self) -> dict:
        dt = self.kv_cache.dtype
        return dict(num_qo_heads=self.num_heads, num_kv_heads=self.num_kv_heads, page_size=self.page_size,
                    pos_encoding_mode="NONE", sm_scale=self.scale, q_data_type=dt, kv_data_type=dt)

    # -- CUDA graphs: decode steps with fixed-size buffers, planned outside the graph --------
    def prepare_graph(self, batch_size: int, max_seq_pages: int) -> bool:
        """A decode wrapper for ``batch_size`` sequences of up to ``max_seq_pages`` pages each.
        Sequences that share a prefix list its pages each, so a step's page indices can far
        outnumber the pool's pages (64 requests on one 4k-token prompt: 16k indices). True when
        the size also gets a cascade twin (``cascade_graph_batch``), to capture after it."""
        import flashinfer

        dev = self.kv_cache.device
        if self._small_decode(batch_size):
            self._graph_small[batch_size] = (
                torch.zeros(batch_size, max(max_seq_pages, 1), dtype=torch.int32, device=dev),
                torch.ones(batch_size, dtype=torch.int32, device=dev),
                torch.zeros(batch_size, dtype=torch.int32, device=dev))
            return False
        if self._graph_workspace is None:  # scratch of the split-KV parts: graphs replay one at a time
            self._graph_workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)

        def decode_wrapper() -> object:
            return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self._graph_workspace, "HND", use_cuda_graph=True,
                paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=dev),
                paged_kv_indices_buffer=torch.zeros(batch_size * max(max_seq_pages, 1), dtype=torch.int32,
                                                    device=dev),
                paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=dev))

        self._graph_decode[batch_size] = decode_wrapper()
        twin = self.cascade_graph_batch
        # under "auto" the cost rule cascades groups of CASCADE_MIN_GROUP and more only
        least = max(twin or 0, 2, CASCADE_MIN_GROUP if self.cascade == "auto" else 0)
        if self.cascade == "never" or twin is None or batch_size < least:
            return False
        # the twin: its own decode wrapper (the group's rows leave the prefix out) and a one-request
        # fa2 prefill of every row over the prefix (fa2 splits the keys over CTAs; the fa3 kernel
        # would run one CTA a KV head for a batch of queries this small)
        shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._fa2_workspace, "HND", use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(2, dtype=torch.int32, device=dev),
            paged_kv_indptr_buf=torch.zeros(2, dtype=torch.int32, device=dev),
            paged_kv_indices_buf=torch.zeros(max(max_seq_pages, 1), dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buf=torch.zeros(1, dtype=torch.int32, device=dev), backend="fa2")
        self._graph_cascade[batch_size] = (decode_wrapper(), shared,
                                           torch.zeros(batch_size, dtype=torch.bool, device=dev))
        return True

    def plan_graph(self, layout: BatchLayout, batch_size: int, pad_page: int) -> str | None:
        """Plan a decode step for a graph of ``batch_size``; sequences past the layout's are
        padding (one key on ``pad_page``). Which of the size's graphs to replay: "plain", or
        "cascade" (its twin) when a shared prefix is worth attending once; None when the step
        needs a cascade that no twin can run (it runs eagerly)."""
        twin = batch_size in self._graph_cascade
        groups = choose_groups(layout, self.cascade, graphed=not twin)
        if groups and not twin:
            return None
        if groups:
            # the twin serves one group: the one that saves the most; the others attend plainly
            group = max(groups, key=lambda g: (g.last - g.first) * len(g.shared_pages))
            self._plan_cascade_graph(layout, batch_size, pad_page, group)
            return "cascade"
        pad = batch_size - len(layout.kv_lens)
        if batch_size in self._graph_small:
            table, lens, base = self._graph_small[batch_size]
            host_table, host_lens = self._small_table(layout.page_tables + [[pad_page]] * pad,
                                                      layout.kv_lens + [1] * pad)
            # non-blocking: a blocking copy waits for the whole stream, i.e. for any burst still
            # queued (a pipelined follow-up is planned while its predecessor runs). From pageable
            # memory the driver stages the bytes before returning, so the host tensors may go
            table[:, :host_table.shape[1]].copy_(host_table, non_blocking=True)
            lens.copy_(host_lens, non_blocking=True)
            base.copy_(host_lens - (host_lens - 1) % self.page_size - 1, non_blocking=True)  # keys before the last page
            self._set_step(layout, True, small_args=(table, lens))
            return "plain"
        indptr, indices, last = _paged_kv(layout.page_tables + [[pad_page]] * pad,
                                          layout.kv_lens + [1] * pad, self.page_size)
        wrapper = self._graph_decode[batch_size]
        # FlashInfer copies host page indices into its buffer blocking (see above); on the device
        # already, they are copied in stream order
        wrapper.plan(torch.tensor(indptr, dtype=torch.int32), indices.to(self.kv_cache.device, non_blocking=True),
                     torch.tensor(last, dtype=torch.int32), head_dim=self.head_dim, **self._common())
        self._set_step(layout, True, wrapper)
        return "plain"

    def plan_cascade_capture(self, layout: BatchLayout, batch_size: int, pad_page: int) -> None:
        """Plan the cascade twin of ``batch_size`` for its capture: every row on the pad page,
        the prefix one key on it, no row merged. ``layout`` holds no sequence, only the static
        slot mapping the captured KV writes will read (as for the plain graph)."""
        self._plan_cascade_graph(layout, batch_size, pad_page, CascadeGroup(0, 0, [pad_page]), prefix_len=1)

    def _plan_cascade_graph(self, layout: BatchLayout, batch_size: int, pad_page: int, group: CascadeGroup,
                            prefix_len: int | None = None) -> None:
        decode, shared, mask = self._graph_cascade[batch_size]
        ps, n = self.page_size, len(layout.kv_lens)
        pad = batch_size - n
        skip = [len(group.shared_pages) if group.first <= i < group.last else 0 for i in range(n)] + [0] * pad
        indptr, indices, last = _paged_kv(layout.page_tables + [[pad_page]] * pad, layout.kv_lens + [1] * pad,
                                          ps, skip)
        decode.plan(torch.tensor(indptr, dtype=torch.int32), indices, torch.tensor(last, dtype=torch.int32),
                    head_dim=self.head_dim, **self._common())
        prefix = len(group.shared_pages) * ps if prefix_len is None else prefix_len  # shared pages are full
        indptr, indices, last = _paged_kv([group.shared_pages], [prefix], ps)
        shared.plan(torch.tensor([0, batch_size], dtype=torch.int32), torch.tensor(indptr, dtype=torch.int32),
                    indices, torch.tensor(last, dtype=torch.int32),
                    head_dim_qk=self.head_dim, causal=False, **self._common())
        rows = torch.zeros(batch_size, dtype=torch.bool)
        rows[group.first:group.last] = True
        mask.copy_(rows)
        self.cascade_steps += prefix_len is None
        self._set_step(layout, True, decode, [group] if prefix_len is None else None, cascade_level=(shared, mask))

    def set_graph_fill(self, batch_size: int, last_page_lens: torch.Tensor) -> None:
        """Advance a planned decode graph by one token a sequence without planning again: the
        decode plan depends on page counts only, the last page's fill is read at run time (a
        cascade twin's prefix pages are full and do not move)."""
        if batch_size in self._graph_small:
            _, lens, base = self._graph_small[batch_size]
            torch.add(base, last_page_lens, out=lens)
            return
        self._active._paged_kv_last_page_len_buf.copy_(last_page_lens)

    def _small_decode(self, batch_size: int) -> bool:
        d = self.head_dim
        if batch_size > self.small_decode_batch or d < 16 or d & (d - 1):  # the kernel tiles whole heads
            return False
        if self._small is None:
            from braid_engine.kernels.decode_attention import DecodeAttention

            self._small = DecodeAttention(self.small_decode_batch, self.num_heads, self.num_kv_heads,
                                          self.head_dim, self.kv_cache.device)
        return True

    @staticmethod
    def _small_table(tables: list[list[int]], kv_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Host page table [sequences, most pages] (rows padded with page 0, never read) and kv lengths."""
        width = max(len(t) for t in tables)
        return (torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                torch.tensor(kv_lens, dtype=torch.int32))

    def _fa3_graph(self, tokens: int) -> bool:
        rows = self.fa3_prefill_graph_rows
        return rows is not None and tokens >= rows

    def fresh_prefill_graph(self, tokens: int) -> bool:
        """Whether the prefill graph of ``tokens`` rows has a twin for fresh prompts, which
        attends the step's own k/v (ragged_fresh_prefill, on the graphs that run fa3)."""
        return self._ragged_ok() and self._fa3_graph(tokens)

    def _ragged_ok(self) -> bool:
        return self.ragged_fresh_prefill and self.head_dim in RAGGED_HEAD_DIMS

    @torch.inference_mode(False)
    def reserve_prefill_graph_workspace(self, tokens: int) -> None:
        """Grow the fa2 scratch (and the eager fa2 wrapper on it) to what a prefill graph of
        ``tokens`` rows needs, if it is on fa2. The runner asks for its largest graph before
        capturing anything, so every fa2 wrapper binds the final scratch. Its buffers are made
        as ordinary tensors even when capture runs under inference mode: the eager wrapper
        plans outside it too (an inference tensor refuses in-place writes there)."""
        while tokens > 0 and self._fa3_graph(tokens):
            tokens //= 2  # the largest fa2 graph below the fa3 ones
        need = fa2_workspace_bytes(self.num_heads, self.num_kv_heads, self.head_dim, self._sms, tokens)
        if tokens and need > self._fa2_workspace.numel():
            import flashinfer

            self._fa2_workspace = torch.zeros(need, dtype=torch.uint8, device=self.kv_cache.device)
            self._prefill_split = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._fa2_workspace, "HND",
                                                                                backend="fa2")

    def prepare_prefill_graph(self, tokens: int, fresh: bool = False) -> None:
        """A prefill wrapper for one sequence's chunk padded to ``tokens`` rows; the padding is a
        second request whose keys all sit on the pad page. ``fresh``: the ragged twin, for a
        prompt's first chunk, whose padding rows attend their own (padding) keys."""
        import flashinfer

        dev = self.kv_cache.device
        if fresh:
            self._graph_ragged[tokens] = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
                self._fa2_workspace, "NHD", use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(3, dtype=torch.int32, device=dev),
                kv_indptr_buf=torch.zeros(3, dtype=torch.int32, device=dev))
            return
        max_pages = self.kv_cache.shape[1] + -(-tokens // self.page_size)
        fa3 = self._fa3_graph(tokens)  # FlashInfer's default backend: no split, no partials
        if not fa3:
            self.reserve_prefill_graph_workspace(tokens)

        def buf(n: int) -> torch.Tensor:
            return torch.zeros(n, dtype=torch.int32, device=dev)

        self._graph_prefill[tokens] = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self._fa2_workspace, "HND", use_cuda_graph=True,
            qo_indptr_buf=buf(3), paged_kv_indptr_buf=buf(3), paged_kv_indices_buf=buf(max_pages),
            paged_kv_last_page_len_buf=buf(2), backend="auto" if fa3 else "fa2")

    def plan_prefill_graph(self, layout: BatchLayout, tokens: int, pad_page: int, fresh: bool = False) -> None:
        """Plan one sequence's ``query_lens[0]`` new tokens (up to ``tokens``) for the prefill
        graph of ``tokens`` rows; the remaining rows, a second request, attend only the pad page
        (none: the second request is empty, which FlashInfer plans as no work). ``fresh``: the
        graph's ragged twin, for a chunk with no keys before it."""
        (q,), (kv_len,), (table,) = layout.query_lens, layout.kv_lens, layout.page_tables
        if fresh:
            if kv_len != q:
                raise ValueError(f"a fresh prefill attends only its own keys: {q} new tokens, {kv_len} keys")
            wrapper = self._graph_ragged[tokens]
            self._plan_ragged(wrapper, [0, q, tokens])
            self._set_step(layout, False, wrapper, own_kv=True)
            return
        pad = tokens - q
        indptr, indices, last = _paged_kv([table, [pad_page] * -(-pad // self.page_size)],
                                          [kv_len, pad], self.page_size)
        wrapper = self._graph_prefill[tokens]
        wrapper.plan(
            torch.tensor([0, q, tokens], dtype=torch.int32), torch.tensor(indptr, dtype=torch.int32),
            indices, torch.tensor(last, dtype=torch.int32),
            head_dim_qk=self.head_dim, causal=True, **self._common())
        self._set_step(layout, False, wrapper)

    def _plan_ragged(self, wrapper, indptr: list[int]) -> None:
        """Plan a ragged-KV prefill whose requests each attend their own keys, causally:
        queries and keys share ``indptr``."""
        dt, ptr = self.kv_cache.dtype, torch.tensor(indptr, dtype=torch.int32)
        wrapper.plan(ptr, ptr, self.num_heads, self.num_kv_heads, self.head_dim, causal=True,
                     pos_encoding_mode="NONE", sm_scale=self.scale, q_data_type=dt, kv_data_type=dt)

    def plan(self, layout: BatchLayout) -> None:
        if layout.page_size != self.page_size:
            raise ValueError(f"layout page size {layout.page_size} differs from the cache's {self.page_size}")
        self._set_step(layout, all(q == 1 for q in layout.query_lens), groups=choose_groups(layout, self.cascade))
        self.cascade_steps += bool(self.groups)
        dev = self.kv_cache.device
        ps = layout.page_size
        if (self._ragged_ok() and not self._is_decode and layout.query_lens == layout.kv_lens
                and sum(layout.query_lens) > SHORT_PREFILL_TOKENS):
            # fresh prompts only (no group: a cascade level needs keys before the queries)
            # the plan rewrites the wrapper's pinned host buffer, whose copy for an earlier fresh
            # step may still be queued (a chunk that samples nothing is not read): let it land
            torch.cuda.current_stream(dev).synchronize()
            self._plan_ragged(self._ragged_wrapper, _starts(layout.query_lens))
            self._set_step(layout, False, own_kv=True)
            self._eager_prefill = self._ragged_wrapper
            return
        if self._is_decode and not self.groups and self._small_decode(len(layout.kv_lens)):
            table, lens = self._small_table(layout.page_tables, layout.kv_lens)
            self._small_args = (table.to(dev, non_blocking=True), lens.to(dev, non_blocking=True))
            return
        skip = [0] * len(layout.kv_lens)
        for g in self.groups:
            for s in range(g.first, g.last):
                skip[s] = len(g.shared_pages)
        indptr, indices, last = _paged_kv(layout.page_tables, layout.kv_lens, ps, skip)
        # a blocking copy on purpose: the wrapper's plan rewrites its pinned host buffer, whose copy
        # to the device for the previous step may still be queued (an eager burst plans step after
        # step without reading a token); waiting here lets that copy land first
        kv = (torch.tensor(indptr, dtype=torch.int32), indices.to(dev), torch.tensor(last, dtype=torch.int32))
        if self._is_decode:
            self._decode.plan(*kv, head_dim=self.head_dim, **self._common())
        else:
            split = _split_pages(layout, self.num_heads, self.num_kv_heads, self.head_dim)
            short = len(layout.query_lens) == 1 and layout.query_lens[0] <= SHORT_PREFILL_TOKENS
            self._eager_prefill = self._prefill_split if split or short else self._prefill
            self._eager_prefill.plan(torch.tensor(_starts(layout.query_lens), dtype=torch.int32), *kv,
                                     head_dim_qk=self.head_dim,
                                     causal=True, fixed_split_size=split, **self._common())
        if self.groups:
            self._plan_shared(layout)

    def _plan_shared(self, layout: BatchLayout) -> None:
        dev = self.kv_cache.device
        starts = _starts(layout.query_lens)
        qo, indptr, indices, last, ranges = [0], [0], [], [], []
        for g in self.groups:
            ranges.append((starts[g.first], starts[g.last]))
            qo.append(qo[-1] + starts[g.last] - starts[g.first])
            indices.extend(g.shared_pages)
            indptr.append(len(indices))
            last.append(layout.page_size)
        self._shared.plan(torch.tensor(qo, dtype=torch.int32), torch.tensor(indptr, dtype=torch.int32),
                          torch.tensor(indices, dtype=torch.int32, device=dev),
                          torch.tensor(last, dtype=torch.int32), head_dim_qk=self.head_dim,
                          causal=False, **self._common())
        # the groups' queries are usually one run of rows; a slice merges in place without a gather
        if all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True)):
            self._rows = slice(ranges[0][0], ranges[-1][1])
        else:
            self._rows = torch.cat([torch.arange(a, b, device=dev) for a, b in ranges])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor | None = None,
               v: torch.Tensor | None = None) -> torch.Tensor:
        cache = self.kv_cache[layer]
        if self._small_args is not None:
            return self._small(q, cache, *self._small_args, self.scale)
        wrapper = self._active or (self._decode if self._is_decode else self._eager_prefill)
        if self.own_kv:  # strided views of the step's qkv rows do (the kernels take k's and v's strides)
            return wrapper.run(q, k, v)
        if self._cascade_level is not None:  # a cascade twin's graph: merge the prefix into the group's rows
            shared, mask = self._cascade_level
            out, lse = wrapper.run(q, cache, return_lse=True)
            o_shared, lse_shared = shared.run(q, cache, return_lse=True)
            self._merge(out, lse, o_shared, lse_shared, mask)
            return out
        if self._rows is None:
            return wrapper.run(q, cache)
        out, lse = wrapper.run(q, cache, return_lse=True)
        rows = self._rows
        o_shared, lse_shared = self._shared.run(q[rows], cache, return_lse=True)
        if isinstance(rows, slice):
            self._merge(out[rows], lse[rows], o_shared, lse_shared)
        else:
            o, s = out[rows], lse[rows]
            self._merge(o, s, o_shared, lse_shared)
            out[rows] = o
        return out
