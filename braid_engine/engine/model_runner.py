"""Turns a scheduled batch into one forward pass: flat inputs, positions, the attention plan."""

from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass

import torch

from braid_engine import kernels
from braid_engine.attention.base import AttentionBackend, BatchLayout
from braid_engine.engine.sequence import Sequence, int64_tensor
from braid_engine.models.layers import CausalLM
from braid_engine.sampling import (
    Penalties,
    RowSampler,
    SamplingParams,
    log_probabilities,
    logprob_entries,
    ranked_logprobs,
)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# one sequence's new tokens (a new turn after a cached history) run in a graph of the next size
PREFILL_GRAPH_TOKENS = (16, 32, 64, 128, 256)
# larger prefill graphs, captured when LLM(prefill_graph_tokens=...) asks for them
LONG_PREFILL_GRAPH_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
# a sampled burst of up to this many sequences, seeded or not, draws its tokens
# (RowSampler) in a CUDA graph of their own, captured once for the batch and replayed after each
# step's replay, instead of launching the draw's few dozen operations one by one every step (0:
# never). H200, Qwen3's 0.6/0.95/20, seeded: batch 1 1.05× and 1.35× the tokens/s in two runs (the
# op-by-op engine's own rate moved, 1,103 and 866), 4 and 8 1.00-1.01×, 32 0.97× (docs/benchmarks.md).
# The graph's memory pool holds each intermediate [rows, vocabulary] tensor
DRAW_GRAPH_ROWS = 8


def _rows_tensor(*rows: list[int]) -> torch.Tensor:
    """Equal-length lists of ints as one int64 host tensor [len(rows), n], through a C array
    (a third of ``torch.tensor``'s time on a list of lists: 0.40 against 1.37 ms for 3 × 4,096)."""
    flat = array("q", rows[0])
    for row in rows[1:]:
        flat.extend(array("q", row))
    return torch.frombuffer(flat, dtype=torch.long).view(len(rows), -1)


# a sequence's new tokens from this many on get their rows from tensor ops instead of a Python
# loop over positions (4,096 tokens on a 2-core CPU: 0.14 ms against 1.1; even at 128)
LONG_ROWS = 128


def _sequence_rows(seq: Sequence, n: int, page_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids, positions and KV slots of ``seq``'s next ``n`` tokens, as one int64 host tensor
    [3, n] (what ``_rows_tensor`` makes of the three lists), written into ``out`` if given."""
    start = seq.num_computed
    first, last = start // page_size, (start + n - 1) // page_size
    # (packed at once: torch.tensor on a 4k prompt's 256 pages took 22 µs, a C array 5)
    pages = int64_tensor(seq.page_table[first:last + 1])
    # every slot of those pages in order, then the n from the start's offset on (an index
    # gather over the positions took 0.33 ms for 4,096, this 0.02; one add that scales the
    # pages, not a multiply and an add: 10 µs less in the loop thread)
    every = torch.add(torch.arange(page_size), pages[:, None], alpha=page_size).view(-1)
    offset = start - first * page_size
    return torch.stack((seq.token_tensor(start, start + n), torch.arange(start, start + n), every[offset:offset + n]),
                       out=out)


def prefill_graph_sizes(largest: int, max_step_tokens: int | None = None) -> tuple[int, ...]:
    """The prefill graphs' row counts, up to ``largest`` (one of the ladder's sizes) and, past
    the short ones, up to the first that holds ``max_step_tokens`` (a step never has more)."""
    ladder = PREFILL_GRAPH_TOKENS + LONG_PREFILL_GRAPH_TOKENS
    if isinstance(largest, bool) or not isinstance(largest, int) or largest not in ladder:
        raise ValueError(f"prefill_graph_tokens must be one of {ladder}, not {largest!r}.")
    cap = max(PREFILL_GRAPH_TOKENS[-1], max_step_tokens or largest)
    return tuple(t for t in ladder if t <= largest and (t <= cap or t // 2 < cap))


def prefill_pieces(n: int, sizes: tuple[int, ...]) -> list[int] | None:
    """How one sequence's ``n`` new tokens are taken through prefill graphs of ``sizes`` rows
    (the rows a piece leaves empty are padding, attending only the pad page): the token counts
    of the pieces, in order, or None when ``n`` is above the largest graph (the step runs
    eagerly). A piece is padded up to the next graph; where that would pad a graph of more than
    ``PREFILL_GRAPH_TOKENS[-1]`` rows by over a quarter, the largest graph that the remaining
    tokens fill is taken first. A graph filled to its last row has no padding at all (a 4k
    prompt is one replay of the 4,096-row graph, not 4,095 rows and a second graph for one
    token, whose weight pass cost about a decode step)."""
    if n > sizes[-1]:
        return None
    pieces = []
    while True:
        fit = next(t for t in sizes if t >= n)
        if fit <= PREFILL_GRAPH_TOKENS[-1] or 4 * (fit - n) <= fit:
            pieces.append(n)
            return pieces
        filled = max(t for t in sizes if t <= n)
        pieces.append(filled)
        n -= filled


def penalties(seq: Sequence, vocab: int, device: torch.device) -> Penalties:
    """A penalized sequence's penalties (``sampling.Penalties``, made at its first token), up
    to date with the output tokens the host holds."""
    if seq.penalties is None:
        seq.penalties = Penalties(seq.params, seq.prompt_token_ids, vocab, device)
    seq.penalties.update(seq.output_token_ids)
    return seq.penalties


def _burst_draw(penalized: list[tuple[int, Penalties]], asked: BurstLogprobs | None, sampler: RowSampler):
    """A burst step's draw, op by op, for a batch with penalized rows (``(row, its penalties)``)
    or rows asking for log-probabilities (``asked``), the k-th call for step k: the
    log-probabilities of the logits written to ``asked``'s step k; the penalties applied to a
    float32 copy of the logits (as a single step applies them to the float32 logits ``execute``
    hands out); the tokens drawn from it, then counted on the device for the next step."""
    step = itertools.count()

    def pick(logits: torch.Tensor) -> torch.Tensor:
        k = next(step)
        lp = log_probabilities(logits, asked.rows) if asked is not None else None
        z = logits
        if penalized:
            z = logits.float() if logits.dtype != torch.float32 else logits.clone()
            for i, state in penalized:
                state.apply(z[i])
        ids = sampler(z)
        for i, state in penalized:
            state.count(ids[i:i + 1])
        if asked is not None:
            values, top_ids = ranked_logprobs(lp, ids[asked.rows], asked.values.shape[-1] - 1)
            asked.values[k].copy_(values)
            asked.ids[k].copy_(top_ids)
        return ids
    return pick


def capture_draw(sampler: RowSampler, generators: list[torch.Generator], logits: torch.Tensor, out: torch.Tensor,
                 pool, stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``out.copy_(sampler(logits))``, captured on ``stream`` into memory pool
    ``pool``. ``generators``: the draw's own (seeded) ones; the default CUDA generator, which
    the rows without one draw from, every graph registers. Each replay advances each generator
    as the operations run one by one would, so a replay draws what they would have drawn.
    Capturing queues nothing and waits for nothing (torch.cuda.graph would synchronize the
    device first): the host goes on ahead of the GPU. Only this thread's calls are checked
    while it captures. Beginning a capture resets each generator's device-side seed and
    offset, which every graph drawing from it reads when it runs: queued on ``stream``, that
    reset is ordered after the work already queued on the current stream, and before any
    queued there later."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    main = torch.cuda.current_stream(out.device)
    stream.wait_stream(main)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out.copy_(sampler(logits))
        finally:
            graph.capture_end()
    main.wait_stream(stream)
    return graph


@dataclass
class Burst:
    """Decode steps queued on the device, their tokens not yet read."""

    out: torch.Tensor  # [steps, rows] each step's tokens (graph rows past the sequences are padding)
    seqs: list[Sequence]  # in row order
    steps: int
    first_done: torch.cuda.Event | None  # recorded after the first step (graphs only)
    # on a GPU: ``out`` copied to pinned host memory when the burst ends, and the event after
    # that copy. A blocking read of ``out`` would also wait for whatever was queued after the
    # burst (a pipelined follow-up): this waits for the burst alone
    host: torch.Tensor | None = None
    done: torch.cuda.Event | None = None
    # the log-probabilities its requests with ``logprobs`` asked for (``BurstLogprobs``)
    logprobs: BurstLogprobs | None = None

    def tokens(self) -> list[list[int]]:
        """``tokens[k][i]``: sequence i's token from step k (waits for the device)."""
        if self.done is None:
            return self.out[:, :len(self.seqs)].tolist()
        self.done.synchronize()
        return self.host[:, :len(self.seqs)].tolist()

    def logprob_entries(self, tokens: list[list[int]]) -> list[tuple[Sequence, list[dict[int, float]]]]:
        """Each asking sequence with its entries (``RequestOutput.logprobs``), one a step; after
        ``tokens()``, which waited for them."""
        lp = self.logprobs
        if lp is None:
            return []
        values, ids = (lp.values, lp.ids) if lp.host is None else lp.host
        values, ids = values.tolist(), ids.tolist()
        steps = range(self.steps)
        return [(self.seqs[i], logprob_entries([tokens[k][i] for k in steps], [values[k][j] for k in steps],
                                               [ids[k][j] for k in steps], [lp.top[j]] * self.steps))
                for j, i in enumerate(lp.rows)]


@dataclass
class BurstLogprobs:
    """A burst's log-probabilities for its rows ``rows`` (their ``top``: each request's
    ``logprobs``), written step by step on the device (``ranked_logprobs``: values [steps, rows,
    1 + k], ids [steps, rows, k]) and, on a GPU, copied to pinned memory (``host``) with the
    burst's tokens."""

    rows: list[int]
    top: list[int]
    values: torch.Tensor
    ids: torch.Tensor
    host: tuple[torch.Tensor, torch.Tensor] | None = None


class ModelRunner:
    def __init__(self, model: CausalLM, backend: AttentionBackend, page_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # batch size → its decode graph with a cascade level (FlashInferBackend.cascade_graph_batch)
        self.cascade_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._replayed: torch.cuda.CUDAGraph | None = None  # the graph the last decode replay ran
        self.cascade_replays = 0  # decode steps replayed from a cascade twin
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # rows → the twin of that prefill graph for a prompt's first chunk, which attends its
        # own k/v (FlashInferBackend.fresh_prefill_graph)
        self.fresh_prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.prefill_sizes: tuple[int, ...] = ()
        self.pad_page = -1
        self.graph_replays = 0
        self.prefill_replays = 0
        # a prompt chunk that does not end its prompt (no token to sample) also goes through the
        # prefill graphs, its logits unused: set when prompts are chunked to interleave with
        # decodes (EngineConfig.prefill_chunk_while_decoding)
        self.graph_prefill_chunks = False
        self._last_prefill_graph: tuple[int, bool] | None = None  # (rows, fresh) of the prefill graph planned last
        # on CUDA: the pinned host buffer a step's rows go through to the device (_host_rows), and
        # the event recorded after the last copy queued from it
        self._staging: torch.Tensor | None = None
        self._staged = torch.cuda.Event() if device.type == "cuda" else None
        # whether the fused Triton kernels may run (LLM(fused_kernels=...) not 'off', set by LLM);
        # with kernels.FUSED_GREEDY at capture, the decode graphs pick their greedy tokens with
        # kernels/argmax.py (_greedy)
        self.fused = False
        self._greedy = None
        # with fused, a sampled step's tokens drawn by kernels/argmax.py (kernels.FUSED_SAMPLING), and
        # top-k's threshold by kernels/topk.py (kernels.FUSED_TOP_K), top-p after top-k's keep rule by
        # kernels/topp.py (kernels.FUSED_TOP_P), as they were when the engine was made
        self.fused_sampling = kernels.FUSED_SAMPLING
        self.fused_top_k = kernels.FUSED_TOP_K
        self.fused_top_p = kernels.FUSED_TOP_P
        self.draw_graph_rows = DRAW_GRAPH_ROWS  # as it was when the engine was made
        # the last burst's draw graph: (its sequences, their graph's logits, the graph, its sampler),
        # replayed again by the next burst of the same sequences (pipelined bursts follow one another)
        self._draw: tuple[list[Sequence], torch.Tensor, torch.cuda.CUDAGraph, RowSampler] | None = None
        self._draw_pool = None  # one memory pool for every draw graph: the last one's is taken again
        self._side: torch.cuda.Stream | None = None  # where draw graphs are captured
        self.draw_captures = 0

    # -- CUDA graphs for decode ------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self, max_batch: int, pad_page: int, max_seq_pages: int,
                       prefill_tokens: int = PREFILL_GRAPH_TOKENS[-1], max_step_tokens: int | None = None) -> None:
        """Capture one decode graph per batch size up to ``max_batch``, and prefill graphs of
        16 … ``prefill_tokens`` rows — none larger than a step of ``max_step_tokens`` tokens
        can use. Inputs live in static buffers; the attention plan is made outside the graph
        before each replay. Padding rows write their KV into ``pad_page``, a page the pool never
        hands out. A sequence's page table has at most ``max_seq_pages`` entries."""
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_batch]
        self.prefill_sizes = prefill_graph_sizes(prefill_tokens, max_step_tokens)
        # the fa2 scratch at the size the largest prefill graph needs, before anything binds it
        self.backend.reserve_prefill_graph_workspace(self.prefill_sizes[-1])
        dev = self.device
        n = max(sizes[-1], self.prefill_sizes[-1])
        self.pad_page = pad_page
        # ids, positions and KV slots of the graphs' rows, one tensor so a burst step loads its
        # positions and slots with one copy
        self.static_in = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.static_ids, self.static_pos, self.static_slots = self.static_in
        self.static_slots.fill_(pad_page * self.page_size)
        self.static_last = torch.zeros(1, dtype=torch.long, device=dev)
        if self.fused and kernels.FUSED_GREEDY:
            from braid_engine.kernels.argmax import GreedyIds

            self._greedy = GreedyIds(sizes[-1], self.model.config.vocab_size, dev)
        pool = None
        for bs in reversed(sizes):
            twin = self.backend.prepare_graph(bs, max_seq_pages)
            layout = BatchLayout([], [], [], self.page_size, self.static_slots[:bs])
            self.backend.plan_graph(layout, bs, pad_page)
            self.graphs[bs] = self._capture(self._forward_static, bs, pool)
            pool = self.graphs[bs][0].pool()
            if twin:
                self.backend.plan_cascade_capture(layout, bs, pad_page)
                self.cascade_graphs[bs] = self._capture(self._forward_static, bs, pool)
        pad_rows = torch.arange(self.prefill_sizes[-1], device=dev)
        self._prefill_pad = torch.stack((torch.zeros_like(pad_rows), pad_rows,
                                         pad_page * self.page_size + pad_rows % self.page_size))
        for tokens in reversed(self.prefill_sizes):
            self.backend.prepare_prefill_graph(tokens)
            layout = BatchLayout([1], [1], [[pad_page]], self.page_size, self.static_slots[:tokens])
            self.backend.plan_prefill_graph(layout, tokens, pad_page)
            self.prefill_graphs[tokens] = self._capture(self._forward_prefill_static, tokens, pool)
            if self.backend.fresh_prefill_graph(tokens):
                self.backend.prepare_prefill_graph(tokens, fresh=True)
                self.backend.plan_prefill_graph(layout, tokens, pad_page, fresh=True)
                self.fresh_prefill_graphs[tokens] = self._capture(self._forward_prefill_static, tokens, pool)
        if self.sample_fused:
            self._warm_sampler(self.graphs[sizes[0]][1])
        torch.cuda.synchronize(dev)

    @property
    def sample_fused(self) -> bool:
        """Whether sampled steps draw their tokens with the fused kernels (``RowSampler(fused=...)``)."""
        return self.fused and self.fused_sampling

    def _warm_sampler(self, logits: torch.Tensor) -> None:
        """Compile the sampler's race kernels (kernels/argmax.py) now, for each form a step's
        logits take (a decode graph's, and the float32 ones ``execute`` hands out; temperature
        alone, and filtered): a Triton kernel's first launch compiles and loads it, which waits
        for the GPU, as a burst's first sampled step would otherwise wait."""
        # a generator of its own: the warm-up must not advance the default one, which unseeded
        # requests draw from
        gen = torch.Generator(device=logits.device)
        # with the keep-rule kernels (fused_top_p, kernels/topp.py), them at Qwen3's top-k of 20, over
        # the logits (rows that take the rule alone) and over the filters' output (beside a top-k
        # row); another k's power of two compiles at its first step
        batches = [[SamplingParams(temperature=1.0)], [SamplingParams(temperature=1.0, top_k=2)]]
        if self.fused_top_p:
            nucleus = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
            batches += [[nucleus], [nucleus, SamplingParams(temperature=1.0, top_k=2)]]
        for x in (logits[:1], logits[:1].float()):
            for params in batches:
                self.sampler(params, [gen] * len(params), x.shape[-1])(x.expand(len(params), -1))

    @property
    def sampling_kernels(self) -> tuple[bool, bool, bool]:
        """RowSampler's ``fused``, ``top_k_kernel`` and ``top_p_kernel`` for this engine."""
        return self.sample_fused, self.fused_top_k, self.fused_top_p

    def sampler(self, params: list[SamplingParams], generators: list[torch.Generator | None],
                vocab: int | None = None) -> RowSampler:
        """A RowSampler for these rows with this engine's sampling kernels; ``vocab`` None: the model's."""
        return RowSampler(params, generators, vocab or self.model.config.vocab_size, self.device,
                          *self.sampling_kernels)

    def _sampler(self, seqs: list[Sequence]) -> RowSampler:
        return self.sampler([seq.params for seq in seqs], [seq.generator for seq in seqs])

    def _draw_graph(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.cuda.CUDAGraph:
        """A CUDA graph that draws ``seqs``' tokens from ``logits`` (the rows of a decode graph's
        output) into the graphs' input ids (``capture_draw``): the last burst's when it drew for
        the same sequences from the same graph's logits, else captured now (where torch can
        register a request's own generator with a graph: ``launch_burst`` checks). Seeded rows
        draw from their own generators, the others from the default CUDA generator, both as the
        ops would (tests/gpu/test_cuda_graphs.py, on the H200: the same tokens and generator
        offsets as the ops, step after step)."""
        last = self._draw
        if (last is not None and last[1].data_ptr() == logits.data_ptr() and len(last[0]) == len(seqs)
                and all(a is b for a, b in zip(last[0], seqs, strict=True))):
            return last[2]
        generators = [seq.generator for seq in seqs if seq.generator is not None and not seq.params.greedy]
        sampler = self._sampler(seqs)
        if self._draw_pool is None:
            self._draw_pool = torch.cuda.graph_pool_handle()
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        # a keep-rule kernel of another k's power of two than the warm-up's compiles now, not in the capture
        sampler.prepare(logits)
        graph = capture_draw(sampler, generators, logits, self.static_ids[:len(seqs)], self._draw_pool, self._side)
        # the old graph goes only now: its pool's memory is the new one's to take again
        self._draw = (seqs, logits, graph, sampler)
        self.draw_captures += 1
        return graph

    @staticmethod
    def _capture(forward, rows: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        forward(rows)  # warm-up outside the graph (kernel selection, autotune)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward(rows)
        return graph, out

    def _load_static(self, ids: list[int] | None, positions: list[int], slots: list[int]) -> None:
        """Copy a step's (padded) inputs into the graphs' static buffers; ``ids`` None keeps the
        ids there (the last replay's argmax)."""
        rows = (positions, slots) if ids is None else (ids, positions, slots)
        self.static_in[3 - len(rows):, :len(positions)].copy_(_rows_tensor(*rows), non_blocking=True)

    def _host_rows(self, n: int) -> torch.Tensor | None:
        """Where a step writes its ``n`` rows (ids, positions, KV slots) on their way to the
        device: on CUDA a [3, n] view of a pinned buffer, so that their copy is queued without
        the host waiting (from pageable memory the driver first copies the rows into a staging
        buffer of its own, in the call); None elsewhere. The buffer serves step after step,
        and a step's copy is not always waited for (a prompt chunk that samples nothing reads
        no token): it is written again only once the copy queued from it last has run, which
        has almost always happened by then."""
        if self._staged is None:
            return None
        if self._staging is None or self._staging.numel() < 3 * n:
            # the old buffer goes back to torch's pinned-memory cache, which hands it out again
            # only once the copies recorded on it are done
            self._staging = torch.empty(3 * n, dtype=torch.long, pin_memory=True)
        else:
            self._staged.synchronize()
        return self._staging[:3 * n].view(3, n)

    def _rows_to_device(self, rows: torch.Tensor) -> torch.Tensor:
        """A step's rows (written where ``_host_rows`` said) copied to the device; on CUDA the
        copy is queued, and the event after it marks when the pinned buffer is free again."""
        rows = rows.to(self.device, non_blocking=True)
        if self._staged is not None:
            self._staged.record(torch.cuda.current_stream(self.device))
        return rows

    def _forward_prefill_static(self, tokens: int) -> torch.Tensor:
        hidden = self.model(self.static_ids[:tokens], self.static_pos[:tokens], self.backend)
        return self.model.compute_logits(hidden.index_select(0, self.static_last))

    def _forward_static(self, bs: int) -> torch.Tensor:
        """The decode graph's forward: its logits (float32, or the model dtype's where the greedy
        kernel picks the tokens; ``execute`` hands them out in float32 either way)."""
        hidden = self.model(self.static_ids[:bs], self.static_pos[:bs], self.backend)
        # the greedy token becomes the next replay's input: a decode burst feeds itself on the GPU
        if self._greedy is not None:
            logits = self.model.compute_logits(hidden, float32=False)
            self._greedy(logits, self.static_ids[:bs])
            return logits
        logits = self.model.compute_logits(hidden)
        self.static_ids[:bs].copy_(logits.argmax(-1))
        return logits

    def _graph_size(self, batch: list[tuple[Sequence, int]]) -> int | None:
        if not self.graphs or any(n != 1 for _, n in batch):
            return None
        return next((b for b in sorted(self.graphs) if b >= len(batch)), None)

    def _replay_prefill_pieces(self, n: int, rows: torch.Tensor, layout: BatchLayout) -> torch.Tensor | None:
        """One sequence's ``n`` new tokens through the prefill graphs, piece by piece (each piece
        attends the keys of the pieces before it in the cache); the last piece's logits, or None
        when the step is too long for the graphs."""
        pieces = prefill_pieces(n, self.prefill_sizes)
        if pieces is None:
            return None
        (kv_len,), (table,) = layout.kv_lens, layout.page_tables
        done = kv_len - n  # keys already in the cache
        at = 0
        for m in pieces:
            rows_m = next(t for t in self.prefill_sizes if t >= m)
            graph = (rows_m, done == 0 and rows_m in self.fresh_prefill_graphs)  # a fresh prompt's first piece
            if graph == self._last_prefill_graph:
                # planning a graph's wrapper again refills host buffers whose copies to the
                # device may still be queued behind its last replay (a piece before this one,
                # or another prompt's chunk, or this prompt's previous chunk with no token read
                # since); when the stream has drained this wait costs nothing
                torch.cuda.current_stream(self.device).synchronize()
            self._last_prefill_graph = graph
            done += m
            piece = BatchLayout([m], [done], [table], self.page_size, layout.slot_mapping)
            logits = self._replay_prefill(m, rows[:, at:at + m], piece, graph)
            at += m
        return logits

    def _replay_prefill(self, n: int, rows: torch.Tensor, layout: BatchLayout,
                        graph: tuple[int, bool]) -> torch.Tensor:
        """``rows``: the piece's token ids, positions and KV slots, [3, n] on the device; ``graph``:
        the rows of the graph to replay (at least n) and whether its twin that attends the
        piece's own keys (it has no others)."""
        tokens, fresh = graph
        graph_layout = BatchLayout(layout.query_lens, layout.kv_lens, layout.page_tables, self.page_size,
                                   self.static_slots[:tokens])
        self.backend.plan_prefill_graph(graph_layout, tokens, self.pad_page, fresh=fresh)
        self.static_in[:, :n].copy_(rows, non_blocking=True)
        # padding rows: token 0 at positions 0, 1, … writing their KV into the pad page (none
        # where the piece fills its graph, as a 4k prompt does: the empty copy's two slices
        # and call took 5 µs)
        if n < tokens:
            self.static_in[:, n:tokens].copy_(self._prefill_pad[:, :tokens - n])
        self.static_last.fill_(n - 1)
        replayed, logits = (self.fresh_prefill_graphs if fresh else self.prefill_graphs)[tokens]
        replayed.replay()
        self.prefill_replays += 1
        return logits

    def _replay(self, bs: int, ids: list[int] | None, positions: list[int], slots: list[int],
                layout: BatchLayout) -> torch.Tensor | None:
        n = len(positions)
        graph_layout = BatchLayout(layout.query_lens, layout.kv_lens, layout.page_tables,
                                   self.page_size, self.static_slots[:bs])
        kind = self.backend.plan_graph(graph_layout, bs, self.pad_page)
        if kind is None:
            return None
        pad = bs - n
        self._load_static(None if ids is None else ids + [0] * pad, positions + [0] * pad,
                          slots + [self.pad_page * self.page_size] * pad)
        graph, logits = (self.cascade_graphs if kind == "cascade" else self.graphs)[bs]
        graph.replay()
        self._replayed = graph
        self.cascade_replays += kind == "cascade"
        self.graph_replays += 1
        return logits[:n]

    @torch.inference_mode()
    def launch_burst(self, batch: list[tuple[Sequence, int]], steps: int, after: Burst | None = None) -> Burst:
        """Queue ``steps`` decode steps back to back, each step's tokens (the argmax, or drawn
        where a sequence samples: ``RowSampler``, each request's generator drawn step by step as
        single steps draw it) fed to the next on the device; ``Burst.tokens()`` reads them once
        at the end (on the GPU the host goes on at once). Every sequence decodes one token a
        step, and its next ``steps`` positions lie in the page of its current one, so the
        attention plan's page counts hold for the whole burst (only the last page's fill
        changes). ``after``: a burst still in flight that this one follows — the same sequences,
        each ``after.steps`` tokens further on (their pages reserved), its first input the tokens
        of ``after``'s last step, on the device. The host reads nothing in between, so the GPU
        need not wait for the host's work on ``after``'s tokens."""
        seqs = [seq for seq, _ in sorted(batch, key=lambda b: b[0].page_table)]
        if after is not None and [id(s) for s in seqs] != [id(s) for s in after.seqs]:
            raise ValueError("a burst can follow only a burst of the same sequences in the same order")
        offset = 0 if after is None else after.steps
        ps, dev = self.page_size, self.device
        starts = [seq.num_computed + offset for seq in seqs]
        tables = [seq.page_table for seq in seqs]
        first = None if after is not None else [seq.token_range(c, c + 1)[0] for seq, c in zip(seqs, starts, strict=True)]

        def layout(k: int, slot_mapping: torch.Tensor) -> BatchLayout:
            return BatchLayout([1] * len(seqs), [c + k + 1 for c in starts], tables, ps, slot_mapping)

        def slots(k: int) -> list[int]:
            return [t[(c + k) // ps] * ps + (c + k) % ps for t, c in zip(tables, starts, strict=True)]

        bs = self._graph_size(batch)
        # penalized rows (greedy ones too) are drawn from their penalized logits, op by op: each
        # step's drawn tokens are counted on the device for the next
        vocab = self.model.config.vocab_size
        penalized = [(i, penalties(seq, vocab, dev)) for i, seq in enumerate(seqs) if seq.params.penalized]
        for _, state in penalized:
            state.taken += steps  # this burst counts its tokens (a sequence that stops in it ends)
        rows = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
        asked = None
        if rows:  # their log-probabilities, step by step, read with the tokens
            top = [seqs[i].params.logprobs for i in rows]
            k = min(max(top), vocab)  # as ranked_logprobs takes it
            asked = BurstLogprobs(rows, top, torch.empty(steps, len(rows), 1 + k, device=dev),
                                  torch.empty(steps, len(rows), k, dtype=torch.long, device=dev))
        op_by_op = bool(penalized) or asked is not None
        sampled = op_by_op or any(not seq.params.greedy for seq in seqs)
        graph_draws = (sampled and not op_by_op and bs is not None and steps > 1
                       and len(seqs) <= self.draw_graph_rows
                       and hasattr(torch.cuda.CUDAGraph, "register_generator_state"))
        sampler = self._sampler(seqs) if sampled and not graph_draws else None
        pick = _burst_draw(penalized, asked, sampler) if op_by_op else sampler
        if after is not None and after.first_done is not None:
            # planning refills pinned host buffers (FlashInfer's plan information) whose copies to
            # the device were queued before the first replay of ``after``: once that replay is
            # done they have been taken. The rest of the plan and the replays queue behind
            # ``after`` without waiting for it (FlashInferBackend.plan_graph copies nothing
            # blocking), so the host takes ``after``'s tokens while the GPU runs this burst
            after.first_done.synchronize()
        elif after is not None and bs is not None:
            # an eager burst's last argmax is not in the graphs' input buffer
            self.static_ids[:len(seqs)].copy_(after.out[-1, :len(seqs)])
        # the first step plans and replays like a single decode step; the rest move its inputs
        logits = None if bs is None else self._replay(bs, first, starts, slots(0), layout(0, torch.empty(0)))
        if logits is not None:
            n = len(seqs)
            draw_graph = self._draw_graph(seqs, logits) if graph_draws else None

            def draw() -> None:  # the sampled tokens replace the graph's argmax as the next input
                if draw_graph is not None:
                    draw_graph.replay()
                elif pick is not None:
                    self.static_ids[:n].copy_(pick(logits[:n]))

            first_done = torch.cuda.Event()
            first_done.record(torch.cuda.current_stream(dev))
            draw()
            pad = bs - len(seqs)
            pad_slot = self.pad_page * ps
            # non-blocking: a blocking copy would wait here for the first replay to finish and
            # leave the GPU idle while the host launches the rest
            rows = torch.tensor([[[c + k for c in starts] + [0] * pad, slots(k) + [pad_slot] * pad]
                                 for k in range(1, steps)], dtype=torch.long).to(dev, non_blocking=True)
            fills = torch.tensor([[(c + k) % ps + 1 for c in starts] + [1] * pad for k in range(1, steps)],
                                 dtype=torch.int32).to(dev, non_blocking=True)
            graph = self._replayed  # the plain graph of bs or its cascade twin, as the first step planned
            out = torch.empty(steps, bs, dtype=torch.long, device=dev)
            out[0].copy_(self.static_ids[:bs])
            for k in range(1, steps):
                self.static_in[1:, :bs].copy_(rows[k - 1])
                self.backend.set_graph_fill(bs, fills[k - 1])
                graph.replay()
                draw()
                out[k].copy_(self.static_ids[:bs])
            self.graph_replays += steps - 1
            if bs in self.cascade_graphs and graph is self.cascade_graphs[bs][0]:
                self.cascade_replays += steps - 1
                self.backend.cascade_steps += steps - 1  # planned once, cascaded every step
            return Burst(out, seqs, steps, first_done, *self._to_host(out, asked), logprobs=asked)
        if sampled and pick is None:  # no graph took the step after all
            pick = self._sampler(seqs)
        # (a graph's padding rows come after the sequences')
        ids = torch.tensor(first, dtype=torch.long, device=dev) if after is None else after.out[-1, :len(seqs)]
        out = []
        for k in range(steps):
            self.backend.plan(layout(k, torch.tensor(slots(k), dtype=torch.long, device=dev)))
            positions = torch.tensor([c + k for c in starts], dtype=torch.long, device=dev)
            logits = self.model.compute_logits(self.model(ids, positions, self.backend))
            ids = logits.argmax(-1) if pick is None else pick(logits)
            out.append(ids)
        out = torch.stack(out)
        return Burst(out, seqs, steps, None, *self._to_host(out, asked), logprobs=asked)

    def _to_host(self, out: torch.Tensor, asked: BurstLogprobs | None = None
                 ) -> tuple[torch.Tensor | None, torch.cuda.Event | None]:
        """A burst's tokens on their way to the host: a pinned copy queued behind the burst and
        the event that marks it done (None, None off the GPU: the host reads ``out`` itself);
        ``asked``'s log-probabilities copied alike (to ``asked.host``)."""
        if out.device.type != "cuda":
            return None, None

        def pinned(t: torch.Tensor) -> torch.Tensor:
            copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            copy.copy_(t, non_blocking=True)
            return copy

        host = pinned(out)
        if asked is not None:
            asked.host = (pinned(asked.values), pinned(asked.ids))
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(out.device))
        return host, done

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
        long = len(batch) == 1 and batch[0][1] >= LONG_ROWS
        for seq, n in batch:
            start = seq.num_computed
            if not long:
                ids.extend(seq.token_range(start, start + n))
                pos = range(start, start + n)
                positions.extend(pos)
                slots.extend(seq.page_table[p // ps] * ps + p % ps for p in pos)
            if start + n == len(seq):
                last_rows.append(n - 1 if long else len(ids) - 1)
                samplers.append(seq)
        dev = self.device
        layout = BatchLayout(
            query_lens=[n for _, n in batch],
            kv_lens=[seq.num_computed + n for seq, n in batch],
            page_tables=[seq.page_table for seq, _ in batch],
            page_size=ps,
            slot_mapping=torch.empty(0, dtype=torch.long),
        )
        bs = self._graph_size(batch) if len(samplers) == len(batch) else None
        if bs is not None:
            logits = self._replay(bs, ids, positions, slots, layout)
            if logits is not None:
                return logits.float(), samplers
        if long:
            rows = _sequence_rows(batch[0][0], batch[0][1], ps, self._host_rows(batch[0][1]))
        else:
            rows = _rows_tensor(ids, positions, slots)
            staging = self._host_rows(len(ids))
            if staging is not None:
                rows = staging.copy_(rows)
        rows = self._rows_to_device(rows)  # one copy, for the prefill graphs' pieces or the eager forward
        if (bs is None and self.prefill_graphs and len(batch) == 1 and batch[0][1] > 1
                and (len(samplers) == 1 or self.graph_prefill_chunks)):
            logits = self._replay_prefill_pieces(batch[0][1], rows, layout)
            if logits is not None:
                return logits[:len(samplers)], samplers
        step_ids, step_positions, layout.slot_mapping = rows
        self.backend.plan(layout)
        hidden = self.model(step_ids, step_positions, self.backend)
        logits = self.model.compute_logits(hidden[torch.tensor(last_rows, dtype=torch.long, device=dev)])
        return logits, samplers
