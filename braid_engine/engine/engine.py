"""LLMEngine: request lifecycle and the step loop, run by one background thread.

Callers on any thread (or event loop) add requests and read their ``RequestStream``; the
loop thread alone touches the scheduler, the page pool and the model, one step at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
import queue
import struct
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace

import torch

from braid_engine.config import EngineConfig, ModelConfig
from braid_engine.detokenizer import IncrementalDetokenizer
from braid_engine.engine.kv_cache import PagePool
from braid_engine.engine.model_runner import Burst, ModelRunner, penalties
from braid_engine.engine.prefix_cache import RadixCache, RadixNode
from braid_engine.engine.scheduler import Scheduler
from braid_engine.engine.sequence import RequestOutput, Sequence, int64_tensor
from braid_engine.errors import (
    BraidError,
    EngineClosedError,
    InvalidRequestError,
    KVCacheFullError,
    PromptTooLongError,
    RequestFailedError,
    WaitInsideTogetherError,
)
from braid_engine.grammar import GrammarRuntime
from braid_engine.sampling import (
    SamplingParams,
    log_probabilities,
    sample,
    token_logprobs,
)

# with EngineConfig.pipeline_bursts: follow-up bursts launched in one step at most; the GPU then
# waits for the host once every PIPELINE_CHAIN + 1 bursts
PIPELINE_CHAIN = 8

logger = logging.getLogger("braid_engine")
_ids = itertools.count()
# what an EngineClosedError advises (ChatBraid, which cannot be handed a new LLM, loads one itself)
_REOPEN = "create a new LLM (a ChatBraid loads a new engine on its next call)"


class RequestStream:
    """The outputs of one request: deltas as tokens are sampled, the last with a finish reason."""

    def __init__(self, engine: LLMEngine, seq: Sequence, loop: asyncio.AbstractEventLoop | None,
                 final_only: bool = False) -> None:
        self.engine = engine
        self.final_only = final_only  # the caller wants only the result: no per-token deltas
        self.request_id = seq.request_id
        self.prompt_token_ids = seq.prompt_token_ids
        self.params = seq.params  # the request's own copy
        self._loop = loop
        # (a SimpleQueue, not a Queue: made in 0.1 µs against 9, put and get in 0.2 against 1.6)
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, float]] | None = [] if seq.params.logprobs is not None else None
        self.text = ""
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0
        self.error: BaseException | None = None  # what failed the request (raised to every reader)

    def _put(self, item: RequestOutput | BaseException) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                # (on the loop thread, holding the state lock: an abort waits for no lock, and the
                # loop takes it on its next turn)
                self.engine._abort(self)
        else:
            self._queue.put(item)

    def _accept(self, item: RequestOutput | BaseException) -> RequestOutput:
        if isinstance(item, BaseException):
            self.error, self.finish_reason = item, "error"
            raise item
        self.token_ids.extend(item.token_ids)
        if item.logprobs is not None and self.logprobs is not None:
            self.logprobs.extend(item.logprobs)
        self.text += item.text
        self.finish_reason = item.finish_reason
        self.num_cached_tokens = item.num_cached_tokens
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        if self.error is not None:
            raise self.error
        try:
            while self.finish_reason is None:
                if self.engine._inside_together():
                    yield self._accept(self._ready())
                else:
                    yield self._accept(self._queue.get())
        finally:
            if self.finish_reason is None:
                self.engine._abort(self)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise self.error
        try:
            while self.finish_reason is None:
                if self.engine._inside_together():
                    yield self._accept(self._ready())
                else:
                    yield self._accept(await self._queue.get())
        finally:
            if self.finish_reason is None:
                self.engine._abort(self)

    def _ready(self) -> RequestOutput | BaseException:
        """An output already delivered, inside ``LLMEngine.together()``: the loop thread takes that
        block's lock between steps, so a wait there for one not yet delivered would never end."""
        try:
            return self._queue.get_nowait()
        except (queue.Empty, asyncio.QueueEmpty):
            raise WaitInsideTogetherError(
                f"request {self.request_id!r}'s output was awaited inside together(), which would wait "
                "forever: the engine steps only between blocks. Add the requests inside the block and "
                "read their results after it.") from None

    def result(self) -> RequestOutput:
        """Block until the request finishes; the whole output."""
        for _ in self:
            pass
        return self._final()

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self._final()

    def _final(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt_token_ids, list(self.token_ids),
                             self.text, self.finish_reason, self.num_cached_tokens,
                             logprobs=None if self.logprobs is None else list(self.logprobs))


@dataclass
class PinHandle:
    """Keeps a cached prefix resident until ``release()``. Releasing twice is harmless."""

    engine: LLMEngine
    node: RadixNode | None
    num_tokens: int

    def release(self) -> None:
        self.engine.release(self)


def _in_range(token_id, vocab: int) -> bool:
    try:
        return 0 <= operator.index(token_id) < vocab
    except TypeError:
        return False


def _raise(error: Exception) -> None:
    """``error`` raised where a request's handling goes through ``LLMEngine._alone``."""
    raise error


def _id_tensor(token_ids: list[int], vocab: int) -> torch.Tensor | None:
    """The ids as an int64 host tensor if every one is an integer in [0, vocab), else None.
    Prompts run to many thousand ids, so they are packed at once (``int64_tensor`` refuses
    floats, strings and ints past 64 bits; bools and numpy integers are integers) and torch
    takes the range; the tensor is kept for the request's steps (``Sequence.prompt_ids``)."""
    try:
        ids = int64_tensor(token_ids)
    except struct.error:
        return None
    low, high = torch.aminmax(ids)
    return ids if 0 <= int(low) and int(high) < vocab else None


class LLMEngine:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, tokenizer, runner: ModelRunner,
                 eos_token_ids: set[int]) -> None:
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        runner.graph_prefill_chunks = config.prefill_chunk_while_decoding is not None
        self.split_steps = 0  # steps whose decodes and prompt chunks ran as separate forwards
        self.eos_token_ids = eos_token_ids
        self.pool = PagePool(config.num_pages, config.page_size)
        self.cache = RadixCache(self.pool) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(config, self.pool, self.cache, self._copy_page)
        self._streams: dict[str, RequestStream] = {}
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[Sequence] = []
        # requests handed to the loop thread (written under _wake) and taken into its scheduler
        # (by the loop thread, under _state): stats() counts the difference as waiting. One writer
        # lock each, so no update is lost, and no lock is taken inside the other to count them
        self._queued = self._taken = 0
        self._together_thread: int | None = None  # the thread inside together(), if any
        # streams whose requests are to stop, taken by the loop thread each turn. Queued without
        # a lock (a deque's append and popleft are atomic): a stream's iterator aborts in its
        # ``finally``, which runs wherever it is dropped or collected, maybe on a thread holding
        # the state lock (the loop thread mid-step, a caller in stats()); waiting there for
        # ``_wake`` deadlocked with a together() block waiting in stats() for the state lock
        self._aborts: deque[RequestStream] = deque()
        self._wake = threading.Condition()
        self._state = threading.RLock()
        self._closed = False
        self._stopped = False  # the loop thread has ended every request after shutdown()
        self._thread: threading.Thread | None = None
        self._grammar: GrammarRuntime | None = None
        self._grammar_lock = threading.Lock()
        self.steps = 0
        self.bursts = 0  # decode bursts: several steps between token reads
        self.pipelined_bursts = 0  # bursts launched before the host read the one before them

    # -- requests ----------------------------------------------------------------------
    def validate_prompt(self, token_ids: list[int]) -> torch.Tensor:
        """Raise if the prompt cannot run; else the ids as an int64 host tensor."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; pass at least one token.")
        vocab = self.model_config.vocab_size
        ids = _id_tensor(token_ids, vocab)
        bad = [t for t in token_ids if not _in_range(t, vocab)] if ids is None else None
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]!r} is outside the vocabulary (0 … {vocab - 1}); "
                "encode prompts with this model's tokenizer."
            )
        if len(token_ids) >= self.config.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is "
                f"{self.config.max_model_len} (and one token must be left to generate); shorten "
                "the prompt, or raise max_model_len if the model and KV pool allow it."
            )
        return ids

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None,
                    loop: asyncio.AbstractEventLoop | None = None,
                    final_only: bool = False) -> RequestStream:
        """Queue a request; its stream yields deltas (or, with ``final_only``, just the last one,
        carrying every token and all the text)."""
        return self._submit(prompt_token_ids, params, request_id, loop, final_only)[0]

    def _submit(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                loop: asyncio.AbstractEventLoop | None = None, final_only: bool = False,
                pin: PinHandle | None = None) -> tuple[RequestStream, Sequence]:
        """``add_request``, and the request's sequence; with ``pin``, the loop thread pins the
        prompt's KV into that handle as the request finishes (``pin()``)."""
        stream, seq = self._make(prompt_token_ids, params, request_id, loop, final_only, pin)
        self._queue(stream, seq)
        return stream, seq

    def _make(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None,
              loop: asyncio.AbstractEventLoop | None, final_only: bool,
              pin: PinHandle | None = None) -> tuple[RequestStream, Sequence]:
        """A request's checks, grammar, sequence and stream, made without the loop's lock: a
        first guided request builds the grammar runtime (~1 s for a 150k vocabulary)."""
        if self._closed:
            raise EngineClosedError(f"the engine was shut down; {_REOPEN}.")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}.")
        params.validate()
        # the request keeps the params it was submitted with: the loop reads some fields while it
        # runs, and a caller may change its SamplingParams for the next call meanwhile (the copy's
        # validation gives it stop lists of its own)
        params = replace(params)
        prompt = list(prompt_token_ids)
        prompt_ids = self.validate_prompt(prompt)
        request_id = request_id or f"req-{next(_ids)}"
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.config.device).manual_seed(params.seed)
        matcher = self.grammar().matcher(params.guided) if params.guided is not None else None
        max_len = self.config.max_model_len
        if params.max_tokens is not None:
            max_len = min(max_len, len(prompt) + params.max_tokens)
        seq = Sequence(
            request_id=request_id, prompt_token_ids=prompt, params=params,
            detok=IncrementalDetokenizer(self.tokenizer, prompt, params.stop_strings,
                                         params.skip_special_tokens),
            max_len=max_len, generator=gen, matcher=matcher, prompt_ids=prompt_ids, pin=pin,
        )
        seq.text_deferred = final_only and not params.stop_strings
        return RequestStream(self, seq, loop, final_only), seq

    def _queue(self, stream: RequestStream, seq: Sequence) -> None:
        """Hand a made request to the loop thread."""
        with self._wake:
            if self._closed:  # shut down since the check in _make: the loop would never take it
                raise EngineClosedError(f"the engine was shut down; {_REOPEN}.")
            if seq.request_id in self._streams:
                raise InvalidRequestError(f"request id {seq.request_id!r} is already in use.")
            self._streams[seq.request_id] = stream
            self._pending.append(seq)
            self._queued += 1
            self._ensure_thread()
            self._wake.notify()

    def add_requests(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                     final_only: bool = False) -> list[RequestStream]:
        """Queue several requests as one batch: they join the same step, and if one is refused
        (a bad prompt, say) none of them is queued. ``params``: one SamplingParams for all, or a
        list paired with the prompts. Each is made (checks, grammar) before the loop's lock is
        taken, so running streams go on meanwhile."""
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise InvalidRequestError(
                    f"{len(prompts)} prompts but {len(params)} SamplingParams: give one for all, or one "
                    "per prompt.")
            paired = list(params)
        else:
            paired = [params] * len(prompts)
        made = [self._make(prompt, p, None, None, final_only) for prompt, p in zip(prompts, paired)]
        streams: list[RequestStream] = []
        with self.together():
            try:
                for stream, seq in made:
                    self._queue(stream, seq)
                    streams.append(stream)
            except BaseException:
                added = {s.request_id for s in streams}
                for rid in added:
                    del self._streams[rid]
                self._pending = [seq for seq in self._pending if seq.request_id not in added]
                self._queued -= len(added)
                raise
        return streams

    def _inside_together(self) -> bool:
        """Whether the calling thread is inside ``together()``."""
        return self._together_thread == threading.get_ident()

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """Requests added inside this block join the batch in the same step: the loop thread
        takes new requests, and its next step, only under this lock, so a wait inside it for an
        output not yet delivered would never end: it raises WaitInsideTogetherError.
        ``stats()``, ``clear_cache()``, ``release()`` and ``shutdown()`` may be called inside:
        the loop thread never waits for this lock while it holds the state lock they take, an
        abort (made on any thread, holding any lock) waits for neither, and ``shutdown()`` gives
        this one up while it waits for the loop to stop."""
        with self._wake:
            outer, self._together_thread = self._together_thread, threading.get_ident()
            try:
                yield
            finally:
                self._together_thread = outer

    def grammar(self) -> GrammarRuntime:
        """The engine's grammar compiler and mask computer (created on first guided request).
        Built under a lock of its own: the loop takes ``_wake`` every step, and building takes
        ~1 s for a 150k-token vocabulary."""
        with self._grammar_lock:
            if self._grammar is None:
                self._grammar = GrammarRuntime(self.tokenizer, self.model_config.vocab_size,
                                               self.eos_token_ids)
            return self._grammar

    def abort(self, request_id: str) -> None:
        """Stop a request; its computed KV stays cached. Unknown or finished ids are ignored."""
        # without ``_wake``, as ``_abort``: a caller may hold the state lock. A dict's get is
        # atomic; an id read just before _queue registers it or _forget drops it is an abort
        # made a moment earlier or later
        stream = self._streams.get(request_id)
        if stream is not None:
            self._abort(stream)

    def _abort(self, stream: RequestStream) -> None:
        """Stop ``stream``'s request if it still runs. Aborts name the stream, not its id: one
        read after its request finished (a stream closed late, an abort racing the finish) would
        otherwise stop a new request that took the id again. Takes no lock (see ``_aborts``)."""
        self._aborts.append(stream)
        # the loop is woken where the lock is free; where it is held, nothing is lost: an abort
        # matters only while its request is queued (_queue woke the loop for it) or in the
        # scheduler (the loop does not sleep then, and takes the aborts every turn)
        if self._wake.acquire(blocking=False):
            try:
                self._wake.notify()
            finally:
                self._wake.release()

    # -- the loop ----------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stopped = False
            self._thread = threading.Thread(target=self._loop, name="braid-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            self._run()
        finally:  # also should the thread die of a bug: shutdown() waits for this
            with self._wake:
                self._stopped = True
                self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._pending or self._aborts or self.scheduler.has_work()):
                    self._wake.wait()
                if self._closed:
                    break
                pending, self._pending = self._pending, []
                # after the requests, under the same lock: a stream is aborted only once _queue has
                # registered it, so each abort taken here is of a request taken by now (drained
                # after the lock is let go, one of a request queued meanwhile would come before its
                # request, and be dropped)
                aborts = [self._aborts.popleft() for _ in range(len(self._aborts))]
            with self._state:
                for seq in pending:
                    self._seqs[seq.request_id] = seq
                    self.scheduler.add(seq)
                self._taken += len(pending)
                for stream in aborts:
                    rid = stream.request_id
                    seq = self._seqs.get(rid)
                    if seq is not None and not seq.is_finished and self._streams.get(rid) is stream:
                        try:
                            self._finish(seq, "abort")
                        except Exception as e:  # fails that request, not the loop thread
                            logger.exception("aborting request %s failed", rid)
                            self._fail(seq, e)
                try:
                    self.step()
                except Exception as e:  # a failed step fails its requests, not the engine
                    logger.exception("engine step failed")
                    for seq in list(self.scheduler.running) + self._unplaced():
                        self._fail(seq, e)
        self._fail_unfinished()
        if self._grammar is not None:  # after the last step that could fill a mask with it
            self._grammar.shutdown()

    def _unplaced(self) -> list[Sequence]:
        """Unfinished requests neither waiting nor running: ones a failed ``schedule()`` took off
        the queue (maybe with pages) before it could admit them. Nothing would run them again."""
        placed = {id(s) for s in self.scheduler.running} | {id(s) for s in self.scheduler.waiting}
        return [s for s in self._seqs.values() if not s.is_finished and id(s) not in placed]

    def _fail_unfinished(self) -> None:
        """At shutdown: every request still queued or running gets EngineClosedError (its caller
        would otherwise wait forever) and gives its pages back."""
        with self._wake:
            pending, self._pending = self._pending, []
        with self._state:
            self._taken += len(pending)
            for seq in pending + list(self._seqs.values()):
                self._fail(seq, EngineClosedError(
                    f"the engine was shut down before request {seq.request_id} finished; {_REOPEN} "
                    "and submit it again."))

    def step(self) -> None:
        """One forward over the scheduled batch, then sample and emit. Loop thread only."""
        batch = self.scheduler.schedule()
        for seq, error in self.scheduler.failed:
            self._fail(seq, error)
        if not batch:
            stuck = self.scheduler.stuck()
            if stuck is not None:
                self._end_stuck(stuck)
            return
        burst = self._burst_steps(batch)
        if burst > 1:
            self._run_burst(batch, burst)
            return
        self.steps += 1
        # masks depend only on tokens already accepted, so they are computed during the forward
        guided = [s for s, n in batch if s.matcher is not None and s.num_computed + n == len(s)]
        masks = self._grammar.fill_async([s.matcher for s in guided]) if guided else None
        logits, samplers = self._execute(batch)
        # log-probabilities from the model's logits, before the masks and penalties change them
        asked = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
        logprobs = log_probabilities(logits, asked) if asked else None
        failed = {}  # a request whose mask could not be filled fails alone, its token unused
        if masks is not None:
            rows = {id(s): i for i, s in enumerate(samplers)}
            bitmask, failures = masks.result()
            self._grammar.apply(logits, bitmask, [rows[id(s)] for s in guided])
            failed = {id(guided[i]): e for i, e in failures.items()}
        for i, s in enumerate(samplers):
            if s.params.penalized:
                penalties(s, logits.shape[-1], logits.device).apply(logits[i])
        for seq, n in batch:
            self._computed(seq, n)
        tokens = sample(logits, [s.params for s in samplers], [s.generator for s in samplers],
                        *self.runner.sampling_kernels)
        if logprobs is not None:
            entries = token_logprobs(logprobs, [tokens[i] for i in asked], [samplers[i].params.logprobs for i in asked])
            for i, entry in zip(asked, entries, strict=True):
                samplers[i].logprobs.append(entry)
        for seq, token in zip(samplers, tokens):
            error = failed.get(id(seq))
            if error is None:
                self._alone(seq, self._append, seq, token)
            else:  # its grammar mask could not be filled: it fails as any request's handling does
                self._alone(seq, _raise, error)

    def _end_stuck(self, seq: Sequence) -> None:
        """End a request that can never run on (``Scheduler.stuck``): alone, it cannot grow
        beside the pinned prefixes. One that has generated tokens ends as at max_model_len:
        "length", every token kept (its KV, cached as it was preempted, stays in the tree); one
        that cannot hold its prompt fails."""
        if seq.output_token_ids:
            self._alone(seq, self._finish, seq, "length")
            return
        total, room = self.pool.num_pages * self.pool.page_size, self.scheduler.room()
        self._fail(seq, KVCacheFullError(
            f"request {seq.request_id} needs {len(seq)} tokens of KV but the pool holds {total}, "
            f"{total - room} of them in pinned prefixes, and nothing more can be evicted; release "
            "pins or enlarge the pool."))

    def _execute(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """The runner's forward over the batch; with ``prefill_chunk_while_decoding`` set, a step
        that mixes decodes with prompt chunks runs the decodes in one forward (their graph) and
        each chunk in its own (its prefill graphs), instead of one eager forward over all of
        them. Logits and sequences come back in the order one forward gives them."""
        decodes, chunks = [], []
        for s, n in batch:
            (decodes if n == 1 and s.is_decoding else chunks).append((s, n))
        if self.config.prefill_chunk_while_decoding is None or not decodes or not chunks:
            return self.runner.execute(batch)
        self.split_steps += 1
        parts = []
        for part in [decodes] + [[c] for c in chunks]:
            logits, samplers = self.runner.execute(part)
            # a graph's logits are a view of its output buffer, which the next replay of that
            # graph (another prompt's chunk of the same size) overwrites
            parts.append((logits.clone(), samplers))
        samplers = [s for _, part in parts for s in part]
        logits = torch.cat([lg for lg, _ in parts])
        order = sorted(range(len(samplers)), key=lambda i: samplers[i].page_table)  # as execute sorts
        return logits[order], [samplers[i] for i in order]

    def _computed(self, seq: Sequence, n: int) -> None:
        seq.num_computed += n
        if (self.cache is not None and not seq.output_token_ids
                and seq.num_computed == len(seq.prompt_token_ids)):
            self.scheduler.cache_sequence(seq)  # a shared prompt is reusable while it runs

    def _burst_steps(self, batch: list[tuple[Sequence, int]]) -> int:
        """How many decode steps may run back to back before the host reads tokens: all
        sequences decode without a grammar, nobody who could join waits, no sequence can reach
        its length limit sooner, and every sequence's positions stay in its current page. A
        stop token ends a sequence inside a burst; the steps computed after it are dropped."""
        if self.config.decode_burst <= 1 or not self._nobody_joins():
            return 1
        for seq, n in batch:
            if n != 1 or seq.num_computed + 1 != len(seq) or seq.matcher is not None:
                return 1
        return self._burst_room([seq for seq, _ in batch])

    def _nobody_joins(self) -> bool:
        """No request arrives, is aborted, or waits with room to join: the batch may decode
        several steps without the host scheduling in between."""
        admissible = self.scheduler.waiting and len(self.scheduler.running) < self.config.max_num_seqs
        return not (self._pending or self._aborts or admissible)

    def _burst_room(self, seqs: list[Sequence], ahead: int = 0) -> int:
        """Steps a burst may take with each sequence ``ahead`` tokens further on than now: at most
        ``decode_burst``, none past a sequence's length limit or out of its current page."""
        limit, ps = self.config.decode_burst, self.config.page_size
        for seq in seqs:
            limit = min(limit, seq.max_len - len(seq) - ahead, ps - (seq.num_computed + ahead) % ps)
        return limit

    def _run_burst(self, batch: list[tuple[Sequence, int]], steps: int) -> None:
        burst = self.runner.launch_burst(batch, steps)
        scheduled = True  # the scheduler counted the first step's tokens of this burst
        # a chain of follow-ups runs inside one step, holding the engine's state lock (stats,
        # cache control and shutdown wait for it): a few bursts, then the step ends
        for chained in range(PIPELINE_CHAIN + 1):
            follow = self._follow(burst) if chained < PIPELINE_CHAIN else None
            self._take_burst(burst, scheduled)
            if follow is None:
                return
            scheduled = False
            if any(seq.is_finished for seq in follow.seqs):
                # the batch has changed: what follow computed for the finished is dropped, and the
                # next step is scheduled afresh
                self._take_burst(follow, scheduled)
                return
            burst = follow

    def _follow(self, burst: Burst) -> Burst | None:
        """With ``pipeline_bursts``, the burst that follows ``burst`` for the same sequences,
        launched before the host reads ``burst``'s tokens (so the GPU has the next burst queued
        while the host takes them), as if none of them stopped; None where the rules of
        ``_burst_steps`` would not run one after ``burst`` or a page cannot be reserved. A
        sequence that stops in ``burst`` has its share of the follow-up dropped."""
        if not self.config.pipeline_bursts or self._closed or not self._nobody_joins():
            return None
        limit = self._burst_room(burst.seqs, burst.steps)
        if limit < 1:
            return None
        for seq in burst.seqs:
            if not self.scheduler._reserve(seq, seq.num_computed + burst.steps + limit):
                return None  # the pool is short: the next step is scheduled as usual
        batch = [(seq, 1) for seq in burst.seqs]
        if [s for s, _ in sorted(batch, key=lambda b: b[0].page_table)] != burst.seqs:
            return None  # a new page moved a sequence among those sharing a prefix
        self.pipelined_bursts += 1
        return self.runner.launch_burst(batch, limit, after=burst)

    def _take_burst(self, burst: Burst, scheduled: bool) -> None:
        """Read a burst's tokens and emit them. ``scheduled``: the scheduler counted its first
        step (a burst that follows another was never scheduled). Sequences already finished
        are skipped: their tokens here were computed past their end."""
        steps = burst.steps
        tokens = burst.tokens()
        for seq, entries in burst.logprob_entries(tokens):
            if not seq.is_finished:
                seq.logprobs.extend(entries)  # cut to the tokens taken, below
        self.steps += steps
        self.bursts += 1
        # sequences whose caller wants only the result take their column in bulk; streamed ones
        # token by token. Finishes still happen step by step in batch order, as single steps
        # would do them (the prefix cache's insertion order and eviction ties depend on it).
        finishing: dict[int, list[tuple[int, Sequence, str]]] = {}
        streamed = []
        for i, (seq, column) in enumerate(zip(burst.seqs, zip(*tokens, strict=True), strict=True)):
            if seq.is_finished:
                continue
            if seq.text_deferred and seq.matcher is None and seq.output_token_ids:
                end = self._append_quiet(seq, column, scheduled)
                if end is not None:
                    finishing.setdefault(end[0], []).append((i, seq, end[1]))
            else:
                streamed.append((i, seq, column))
        for k in range(steps):
            events = finishing.get(k, []) + [(i, seq, col[k]) for i, seq, col in streamed if not seq.is_finished]
            for _, seq, what in sorted(events, key=operator.itemgetter(0)):
                if isinstance(what, str):
                    self._alone(seq, self._finish, seq, what)
                    continue
                if k or not scheduled:
                    self.scheduler.decoded_tokens += 1
                self._computed(seq, 1)
                self._alone(seq, self._append, seq, what)
        for seq in burst.seqs:
            if seq.params.logprobs is not None:
                del seq.logprobs[len(seq.output_token_ids):]  # steps past a stop

    def _append_quiet(self, seq: Sequence, column: tuple[int, ...], scheduled: bool) -> tuple[int, str] | None:
        """A burst's tokens for a sequence whose caller wants only the final output (no text
        until the end, no grammar): what ``_computed`` + ``_append`` do token by token, in bulk —
        up to the first stop token or the length limit, whichever comes first. Returns the step
        and reason of the finish the caller must then make, or None."""
        p = seq.params
        stops = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            stops.update(self.eos_token_ids)
        cut, reason = len(column), None
        if not stops.isdisjoint(column):
            cut, reason = next(j for j, t in enumerate(column) if t in stops) + 1, "stop"
        room = seq.max_len - len(seq)  # the token at index room - 1 reaches the limit
        if room <= cut and not (reason == "stop" and room == cut):
            cut, reason = room, "length"
        seq.output_token_ids.extend(column[:cut])
        seq.num_computed += cut
        seq.text_tokens += cut - (reason == "stop")
        self.scheduler.decoded_tokens += cut - scheduled
        return None if reason is None else (cut - 1, reason)

    def _alone(self, seq: Sequence, action, *args) -> None:
        """``action(*args)``, the handling of ``seq``'s new token or finish. Where it raises (the
        request's detokenizer, stop strings, grammar or stream), ``seq`` alone fails: the step's
        other requests go on (they all failed with it; one raising past its scheduler finish
        was left unfinished for its caller)."""
        try:
            action(*args)
        except Exception as e:
            logger.exception("request %s failed", seq.request_id)
            self._fail(seq, e)

    def _append(self, seq: Sequence, token: int) -> None:
        seq.output_token_ids.append(token)
        p = seq.params
        reason = None
        if seq.matcher is not None and not seq.matcher.accept_token(token):
            raise RuntimeError(f"token {token} was sampled outside the grammar of {seq.request_id}")
        if token in (p.stop_token_ids or ()) or (not p.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        else:
            seq.text_tokens += 1
            if not seq.text_deferred:
                seq.detok.add(token)
                if seq.detok.stopped:
                    reason = "stop"
        if reason is None and seq.matcher is not None and seq.matcher.is_terminated():
            reason = "stop"  # the constraint is complete: nothing more may follow
        if reason is None and len(seq) >= seq.max_len:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
        else:
            self._emit(seq, final=False)

    def _emit(self, seq: Sequence, final: bool) -> None:
        stream = self._streams.get(seq.request_id)
        if not final and (stream is None or stream.final_only):
            return  # the final output carries everything not yet handed out
        new = seq.output_token_ids[seq.emitted_tokens:]
        # (a burst adds its steps' entries at once: those past the tokens taken wait)
        end = len(seq.output_token_ids)
        logprobs = seq.logprobs[seq.emitted_tokens:end] if seq.params.logprobs is not None else None
        seq.emitted_tokens = end
        text = seq.detok.take(final)
        if stream is not None:
            stream._put(RequestOutput(seq.request_id, seq.prompt_token_ids, new, text,
                                      seq.finish_reason, seq.num_cached_tokens, finished=final,
                                      logprobs=logprobs))

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.penalties = None  # its device tensors go now
        if seq.pin is not None and reason != "abort":
            error = self._pin_prompt(seq)
            if error is not None:
                self._fail(seq, error)
                return
        self.scheduler.finish(seq)
        if seq.text_deferred:
            seq.detok.add_all(seq.output_token_ids[:seq.text_tokens])
        seq.detok.flush()
        self._emit(seq, final=True)
        self._forget(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        """End ``seq`` with ``error``: its caller gets the error, its pages go back. The loop calls
        it where something already failed, so it never raises (it killed the loop thread,
        stranding every other request): a piece that fails is logged and the rest still run. A
        fault that is no BraidError reaches the caller as the cause of a RequestFailedError."""
        seq.finish_reason = "error"
        if not isinstance(error, BraidError):
            fault, error = error, RequestFailedError(
                f"request {seq.request_id} failed inside the engine ({type(error).__name__}: {error}); "
                "the engine goes on serving: submit it again, and report the error if it repeats.")
            error.__cause__ = fault
        for end in (self.scheduler.finish, self.scheduler.drop):  # drop: its pages go back uncached
            if seq.is_finished:  # (already, where _finish raised after the scheduler's part)
                break
            try:
                end(seq)
            except Exception:
                logger.exception("request %s: %s failed while failing it", seq.request_id, end.__name__)
        stream = self._streams.get(seq.request_id)
        if stream is not None:
            try:
                stream._put(error)
            except Exception:
                logger.exception("request %s: its stream refused its error", seq.request_id)
                stream.error = error  # a reader that comes later raises it
        self._forget(seq)

    def _forget(self, seq: Sequence) -> None:
        # without ``_wake``: the loop thread holds the state lock here, which a caller inside
        # together() may be waiting for (stats()). A dict's pop is atomic, and the id is free
        # for a new request only once popped, so _queue's check-and-insert cannot interleave
        self._seqs.pop(seq.request_id, None)
        self._streams.pop(seq.request_id, None)

    def _copy_page(self, src: int, dst: int) -> None:
        kv = self.runner.backend.kv_cache
        kv[:, dst].copy_(kv[:, src])

    def _pin_prompt(self, seq: Sequence) -> KVCacheFullError | None:
        """Insert the prompt of ``seq``, a request of ``pin()``, into the tree and pin it there,
        in the step that computed it: pinned from the caller's thread, after the finish, other
        steps in between could evict it first. The error where the pin would pass the limit."""
        self.scheduler.cache_sequence(seq, ending=True)
        node = seq.cache_node
        if node is None or node.end != len(seq.prompt_token_ids):
            return None  # not cached: pin() finds its handle empty and says so
        pinned = self.cache.pinned_pages() | self.cache.path_pages(node)
        limit = int(self.config.max_pinned_fraction * self.pool.num_pages)
        if len(pinned) > limit:
            return KVCacheFullError(
                f"pinning would hold {len(pinned)} pages, over the limit of {limit} "
                f"({self.config.max_pinned_fraction:.0%} of the pool); release other pins "
                "or raise max_pinned_fraction.")
        self.cache.pin(node)
        seq.pin.node, seq.pin.num_tokens = node, node.end
        return None

    # -- prefix cache control ------------------------------------------------------------
    def pin(self, token_ids: list[int]) -> PinHandle:
        """Compute (if needed) and keep resident the KV of ``token_ids``."""
        if self.cache is None:
            raise InvalidRequestError("prefix caching is off (enable_prefix_caching=False); nothing to pin.")
        self.validate_prompt(token_ids)
        handle = PinHandle(self, None, 0)
        # a one-token request leaves the whole prompt's KV in the tree, and the loop thread pins
        # it there as the request finishes (_pin_prompt)
        stream, seq = self._submit(token_ids, SamplingParams(temperature=0, max_tokens=1), pin=handle)
        try:
            out = stream.result()
        except BaseException:  # (its error, an interrupt): a pin nobody holds would never go
            with self._state:  # the loop pins under this lock: it pinned already, or never will
                seq.pin = None
                self.release(handle)
            raise
        if handle.node is None:
            raise KVCacheFullError(
                f"the request computing the prefix ended ({out.finish_reason}) before its KV was "
                "cached, so nothing was pinned (an abort of its id ends it early); pin it again.")
        return handle

    def release(self, handle: PinHandle) -> None:
        with self._state:
            if handle.node is not None:
                self.cache.unpin(handle.node)
                handle.node = None

    def stats(self) -> dict[str, int]:
        with self._state:
            used = sum(1 for r in self.pool.refs if r > 0)
            c = self.cache
            return {
                "pages_total": self.pool.num_pages,
                "page_size": self.pool.page_size,
                "pages_used": used,
                "pages_free": self.pool.num_free,
                "pages_peak": self.pool.peak_used,
                "pages_cached": len(c.cached_pages()) if c else 0,
                "pages_pinned": len(c.pinned_pages()) if c else 0,
                "prefix_lookups": c.stats.lookups if c else 0,
                "prefix_hits": c.stats.prefix_hits if c else 0,
                "prefix_hit_tokens": c.stats.hit_tokens if c else 0,
                "evictions": c.stats.evictions if c else 0,
                "evicted_pages": c.stats.evicted_pages if c else 0,
                "prefilled_tokens": self.scheduler.prefilled_tokens,
                "reused_tokens": self.scheduler.reused_tokens,
                "decoded_tokens": self.scheduler.decoded_tokens,
                "preemptions": self.scheduler.num_preemptions,
                "running": len(self.scheduler.running),
                # with the requests added that the loop thread has not yet taken
                "waiting": len(self.scheduler.waiting) + self._queued - self._taken,
                "steps": self.steps,
                "decode_bursts": self.bursts,
                "pipelined_bursts": self.pipelined_bursts,
                "split_steps": self.split_steps,
                "cascade_steps": self.runner.backend.cascade_steps,
            }

    def clear_cache(self) -> None:
        """Evict every cached prefix that is not pinned or in use."""
        with self._state:
            if self.cache is not None:
                self.cache.clear()

    def shutdown(self) -> None:
        """Refuse new requests and stop the loop thread, which ends each request still queued
        or running with EngineClosedError; returns once it has (or after 30 s of a step). Inside
        ``together()`` as well: a Condition's wait gives its lock up however deeply this thread
        holds it, and the loop takes that lock to stop (a join while holding it hung)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
            if (thread is not None and thread is not threading.current_thread()
                    and self._wake.wait_for(lambda: self._stopped or not thread.is_alive(), timeout=30)):
                thread.join()  # it needs no lock any more: it only returns
        if (thread is None or not thread.is_alive()) and self._grammar is not None:
            self._grammar.shutdown()  # no loop thread left to do it after its last step

    @property
    def closed(self) -> bool:
        """Whether ``shutdown()`` was called: no request is taken any more."""
        return self._closed

    @property
    def idle(self) -> bool:
        with self._wake:
            return not (self._pending or self._streams) and not self.scheduler.has_work()

