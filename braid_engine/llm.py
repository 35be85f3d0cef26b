"""``LLM``: the offline API (vLLM's names) over one ``LLMEngine``."""

from __future__ import annotations

import asyncio
import atexit
import functools
import gc
import json
import logging
import numbers
import os
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from braid_engine.attention.base import AttentionBackend
from braid_engine.chat import check_text, render_chat
from braid_engine.compat import check_model
from braid_engine.config import EngineConfig, resolve_device, resolve_dtype
from braid_engine.engine.engine import LLMEngine, PinHandle
from braid_engine.engine.kv_cache import allocate_kv_cache, kv_bytes_per_token
from braid_engine.engine.model_runner import ModelRunner, prefill_graph_sizes
from braid_engine.engine.sequence import RequestOutput
from braid_engine.errors import CheckpointError, InvalidRequestError
from braid_engine.kernels import fused_kernels_available
from braid_engine.loader import load_config, load_model, load_tokenizer, resolve_model_path
from braid_engine.models.layers import CausalLM
from braid_engine.sampling import SamplingParams

logger = logging.getLogger("braid_engine")

PromptType = str | Sequence[int]

_CPU_KV_BYTES = 1 << 30  # default KV pool on CPU: at most 1 GiB
# prompt tokens a step while others decode, when CUDA graphs are on (prefill_chunk_while_decoding="auto")
AUTO_PREFILL_CHUNK_WHILE_DECODING = 2048


# engines not yet shut down: stopped at interpreter exit, before anything is torn down
_LIVE_ENGINES: weakref.WeakSet[LLMEngine] = weakref.WeakSet()


def _shut_down_live_engines() -> None:
    """A script may end without ``shutdown()`` while its engine's thread is still inside a step
    (finishing the last request after its stream has ended). Left running into the interpreter's
    teardown, such a thread can be inside a torch call when native thread pools are destroyed;
    the example chat script once aborted so in a CI run ("terminate called without an active
    exception"). Each engine's thread is stopped and joined here first; a step in flight ends
    before its thread does."""
    for engine in list(_LIVE_ENGINES):
        engine.shutdown()


@functools.cache
def _exit_hooks() -> None:
    """Registered once: at exit, engines are shut down first, then frozen objects go back to
    the collector so they are torn down as usual (extension modules report objects still alive
    at exit as leaks). atexit runs the last registered first."""
    atexit.register(gc.unfreeze)
    atexit.register(_shut_down_live_engines)


class LLM:
    """An embedded engine for one model on one device.

    Example:
        >>> llm = LLM("Qwen/Qwen3-0.6B")
        >>> out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=8))
        >>> print(out[0].text)
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        page_size: int = 16,
        num_pages: int | None = None,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.85,
        attention_backend: str = "auto",
        cascade: str = "auto",
        fused_kernels: str = "auto",
        cuda_graphs: bool | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_pinned_fraction: float = 0.5,
        decode_burst: int = 8,
        prefill_graph_tokens: int = 8192,
        prefill_chunk_while_decoding: int | str | None = "auto",
        pipeline_bursts: bool | str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        if pipeline_bursts != "auto" and not isinstance(pipeline_bursts, bool):
            raise ValueError(f"pipeline_bursts must be 'auto', True or False, got {pipeline_bursts!r}.")
        _check_size("decode_burst", decode_burst, 1, "1 reads every step's token")
        _check_size("max_num_seqs", max_num_seqs, 1, "the most requests a step runs")
        _check_size("max_num_batched_tokens", max_num_batched_tokens, 1, "the most tokens a step computes")
        _check_size("page_size", page_size, 1, "tokens per KV page; 16 is usual")
        _check_size("num_pages", num_pages, 1, "None sizes the pool from memory", optional=True)
        _check_size("kv_cache_memory", kv_cache_memory, 1, "bytes for the KV pool; None sizes it from free "
                    "memory", optional=True)
        _check_size("max_model_len", max_model_len, 2, "a prompt token and one to generate; None takes "
                    "the model's", optional=True)
        if not isinstance(max_pinned_fraction, (int, float)) or not 0 <= max_pinned_fraction <= 1:
            raise ValueError(f"max_pinned_fraction must be a number in [0, 1] (the share of the KV pool "
                             f"pins may hold), got {max_pinned_fraction!r}.")
        if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1] (the share of the card the engine "
                             f"may fill), got {gpu_memory_utilization!r}.")
        prefill_graph_sizes(prefill_graph_tokens)  # a clear error before anything loads
        chunk = prefill_chunk_while_decoding
        if chunk != "auto" and chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"prefill_chunk_while_decoding must be 'auto', None or an int ≥ 1 (prompt tokens "
                             f"a step while others decode), got {chunk!r}.")
        path = resolve_model_path(model)
        self.model_path = path
        self.model_config = cfg = load_config(path)
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, cfg.torch_dtype)
        max_len = max_model_len or cfg.max_position_embeddings
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_len} exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings}); use a value at most that."
            )
        torch_model = load_model(path, cfg, dev, dt, max_positions=cfg.max_position_embeddings)
        self.fused_layers = _enable_fused(torch_model, fused_kernels, dev)
        per_token = kv_bytes_per_token(cfg, dt)
        if num_pages is None:
            budget = kv_cache_memory or self._default_kv_bytes(dev, gpu_memory_utilization, per_token, max_len)
            num_pages = max(1, budget // (per_token * page_size))
        if max_model_len is None:
            max_len = min(max_len, pool_context(num_pages, page_size))
            if max_len < 2:
                raise ValueError(
                    f"a KV pool of {num_pages} page(s) of {page_size} token(s) holds sequences of at most "
                    f"{max_len} tokens (one page spare for copy-on-write), and a request needs 2 (a prompt "
                    "token and one to generate); give the KV cache more memory (kv_cache_memory, num_pages) "
                    "or use larger pages."
                )
        elif max_len > (num_pages - 1) * page_size:
            raise ValueError(
                f"max_model_len={max_len} needs {-(-max_len // page_size) + 1} KV pages (one spare for "
                f"copy-on-write) but the pool has {num_pages}; lower max_model_len or give the KV "
                "cache more memory."
            )
        backend_name = _choose_backend(attention_backend, dev, dt)
        # decode graphs need the fixed-buffer FlashInfer plans; the torch backend runs eagerly
        graphs = backend_name == "flashinfer" if cuda_graphs is None else cuda_graphs
        if graphs and backend_name != "flashinfer":
            raise ValueError("cuda_graphs=True needs attention_backend='flashinfer' on a CUDA device.")
        if chunk == "auto":
            # with graphs, decodes keep their graph and a prompt's chunks take the prefill graphs
            # (an H200: streams' longest wait 31 -> 14 ms during an 8k prompt, its first token no later);
            # without them one mixed forward reads the weights once for both
            chunk = AUTO_PREFILL_CHUNK_WHILE_DECODING if graphs else None
        if pipeline_bursts == "auto":
            # with graphs the host queues the next burst and reads the last one's tokens while the
            # GPU runs it (an H200: batch 1 1,260 -> 1,306 tokens/s, batch 32 17,340 -> 18,123); on
            # the CPU the host is the device, so there is nothing to overlap
            pipeline_bursts = graphs
        self.config = EngineConfig(
            device=dev, dtype=dt, max_model_len=max_len, page_size=page_size, num_pages=num_pages,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, max_pinned_fraction=max_pinned_fraction,
            attention_backend=backend_name, cascade=cascade, decode_burst=decode_burst,
            pipeline_bursts=pipeline_bursts, prefill_chunk_while_decoding=chunk,
        )
        # one page beyond the pool takes the KV writes of graph padding rows
        kv_cache = allocate_kv_cache(cfg, num_pages + graphs, page_size, dt, dev)
        backend = _make_backend(backend_name, kv_cache, cfg.num_attention_heads, cfg.head_dim, cascade)
        backend.warm_up()
        runner = ModelRunner(torch_model, backend, page_size, dev)
        runner.fused = fused_kernels_available(dev) and fused_kernels != "off"
        if graphs:
            runner.capture_graphs(max_num_seqs, pad_page=num_pages, max_seq_pages=-(-max_len // page_size),
                                  prefill_tokens=prefill_graph_tokens, max_step_tokens=max_num_batched_tokens)
        generation = _generation_config(path)
        self.sampling_defaults = _sampling_defaults(generation, path)
        self.engine = LLMEngine(cfg, self.config, self.tokenizer, runner, self._eos_ids(generation, path))
        # Everything alive now (torch, transformers, the model's modules: ~370k objects) leaves the
        # cyclic collector's reach; a full collection over it took ~220 ms on a 2-core CPU, a
        # pause that would land inside some request's step
        gc.collect()
        gc.freeze()
        _LIVE_ENGINES.add(self.engine)
        _exit_hooks()
        logger.info("braid: %s on %s (%s), %s attention, %d KV pages of %d tokens",
                    cfg.architecture, dev, dt, backend_name, num_pages, page_size)

    @staticmethod
    def _default_kv_bytes(dev: torch.device, util: float, per_token: int, max_len: int) -> int:
        if dev.type == "cuda":
            # blocks torch's allocator keeps but no tensor holds (an engine shut down before this
            # one, the loader's temporaries) count as used in the driver's figures: hand them back
            # first, or the pool is sized without them and cannot reuse them
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(dev)
            used = total - free
            return max(int(total * util) - used, per_token * max_len)
        return min(_CPU_KV_BYTES, per_token * max(4 * max_len, 16384))

    def _eos_ids(self, generation: dict[str, Any], path: Path) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        eos = generation.get("eos_token_id")
        eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos):
            raise CheckpointError(f"{path / _GENERATION_CONFIG}'s eos_token_id must be token ids, got {eos!r}.")
        ids.update(eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- prompts -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._text_ids(check_text(text))

    def _text_ids(self, text: str, **kwargs: Any) -> list[int]:
        """The tokenizer's ids for ``text``; an id the model cannot embed means the checkpoint's
        tokenizer and weights disagree (config.json's vocab_size below the tokenizer's length), which
        no prompt edit can fix: said so, not reported as a bad token id of the caller's."""
        ids = list(self.tokenizer(text, **kwargs)["input_ids"])
        vocab = self.model_config.vocab_size
        if ids and max(ids) >= vocab:
            raise InvalidRequestError(
                f"the tokenizer encoded this text with token id {max(ids)}, past the model's {vocab} embeddings "
                f"(config.json vocab_size; the tokenizer has {len(self.tokenizer)} tokens): the checkpoint's "
                "tokenizer and weights do not match; re-download it.")
        return ids

    def _to_ids(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, (bytes, bytearray)):
            raise InvalidRequestError("a prompt of bytes: decode it to a str first (e.g. data.decode('utf-8')).")
        if _is_array(prompt):
            return _array_ids(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable):
                raise InvalidRequestError(f"prompt_token_ids must be a list of token ids, got {type(ids).__name__}.")
            return list(ids)
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and (not prompt or isinstance(prompt[0], numbers.Integral)):
            return list(prompt)  # the engine checks every id (types and range) once
        raise InvalidRequestError(
            f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}.")

    def _normalize(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Iterable) or _is_array(prompts) or (
            isinstance(prompts, Sequence) and prompts and _all_ints(prompts)
        ):  # (what is no prompt and holds none gets _to_ids's error)
            return [self._to_ids(prompts)]
        return [self._to_ids(p) for p in prompts]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **template_kwargs: Any) -> list[int]:
        """Render ``messages`` with the checkpoint's own chat template → token ids."""
        text = render_chat(self.tokenizer, messages, add_generation_prompt, **template_kwargs)
        return self._text_ids(text, add_special_tokens=False)

    # -- generation ------------------------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        """The SamplingParams a call without any gets: the sampling settings the checkpoint's
        ``generation_config.json`` gives (temperature, top_p, top_k, min_p and repetition_penalty;
        Qwen3: 0.6, 0.95, 20), the others SamplingParams' own defaults. A new object each call,
        to change freely."""
        return SamplingParams(**self.sampling_defaults)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or many, batched together; outputs in prompt order. ``params``:
        one SamplingParams for every prompt, or a list of them paired with the prompts; None: the
        model's (``get_default_sampling_params()``)."""
        params = self.get_default_sampling_params() if params is None else params
        streams = self.engine.add_requests(self._normalize(prompts), params, final_only=True)
        try:
            return [s.result() for s in streams]
        except BaseException:  # (a failed request, an interrupt): nobody will read the rest
            for s in streams:
                self.engine.abort(s.request_id)
            raise

    def stream(self, prompt: PromptType, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield deltas (new token ids, new text) as they are sampled; the last carries the
        finish reason. Closing the iterator early aborts the request."""
        yield from self.engine.add_request(self._to_ids(prompt), params or self.get_default_sampling_params())

    async def astream(self, prompt: PromptType,
                      params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """``stream`` for asyncio: the event loop is never blocked by the engine."""
        stream = self.engine.add_request(self._to_ids(prompt), params or self.get_default_sampling_params(),
                                         loop=asyncio.get_running_loop())
        async for delta in stream:
            yield delta

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             params: SamplingParams | list[SamplingParams] | None = None,
             **template_kwargs: Any) -> list[RequestOutput]:
        """Render a conversation (a list of messages), or each of a list of them, with the chat
        template and generate the assistant turns, batched; ``params`` as for ``generate``."""
        batch = isinstance(messages, (list, tuple)) and bool(messages) and all(
            isinstance(m, (list, tuple)) for m in messages)
        conversations = messages if batch else [messages]
        return self.generate([self.apply_chat_template(c, **template_kwargs) for c in conversations], params)

    # -- prefix cache --------------------------------------------------------------------
    def pin(self, prompt: PromptType) -> PinHandle:
        """Keep the KV of a prefix (token ids or text) resident until ``handle.release()``."""
        return self.engine.pin(self._to_ids(prompt))

    def release(self, handle: PinHandle) -> None:
        if not isinstance(handle, PinHandle):
            raise InvalidRequestError(
                f"release takes the handle that pin() returned, got {type(handle).__name__}.")
        handle.release()

    def stats(self) -> dict[str, int]:
        """Pages total/used/cached/pinned, prefix hits, reused and prefilled tokens, evictions."""
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()
        gc.unfreeze()  # the engine's reference cycles (model, KV cache) may be collected again

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.shutdown()


def _choose_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name not in ("auto", "torch", "flashinfer"):
        raise ValueError(f"attention_backend must be 'auto', 'torch' or 'flashinfer', not {name!r}.")
    if name == "auto":
        if device.type == "cuda" and dtype not in (torch.float16, torch.bfloat16):
            logger.info("braid: FlashInfer needs float16/bfloat16; using the torch attention backend for %s", dtype)
        elif device.type == "cuda":
            try:
                import flashinfer  # noqa: F401

                from braid_engine.attention import flashinfer_backend  # noqa: F401

                logger.info("braid: attention backend auto → flashinfer (CUDA, FlashInfer imports)")
                return "flashinfer"
            except ImportError:
                logger.info("braid: attention backend auto → torch (FlashInfer does not import)")
        else:
            logger.info("braid: attention backend auto → torch (device %s has no CUDA)", device)
        return "torch"
    if name == "flashinfer" and device.type != "cuda":
        raise ValueError("attention_backend='flashinfer' needs a CUDA device; use 'torch' on CPU.")
    return name


_GENERATION_CONFIG = "generation_config.json"
# the sampling settings a checkpoint's generation_config.json may give, as SamplingParams names them
# (transformers' generate takes repetition_penalty from there; it has no presence or frequency penalty)
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# ones braid does not take from there, as transformers does not, with the value that means "off"
_NOT_TAKEN = {"presence_penalty": 0.0, "frequency_penalty": 0.0}


def _generation_config(path: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json ({} where it has none)."""
    gen = path / _GENERATION_CONFIG
    if not gen.is_file():
        return {}
    try:
        settings = json.loads(gen.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{gen} is not a JSON object of settings ({e}); re-download it.") from e
    if not isinstance(settings, dict):
        raise CheckpointError(f"{gen} is not a JSON object of settings (a {type(settings).__name__}); "
                              "re-download it.")
    return settings


def _sampling_defaults(generation: dict[str, Any], path: Path) -> dict[str, Any]:
    """The sampling settings of generation_config.json, which requests without their own take, as
    vLLM's and transformers' do (``do_sample`` is not read: a temperature of 0 is greedy).
    Checked here: a bad one is the checkpoint's fault, not a request's."""
    defaults = {k: generation[k] for k in _SAMPLING_KEYS if generation.get(k) is not None}
    try:
        # a JSON true or false is no number (SamplingParams took one as 1 or 0 for all but top_k)
        flags = [k for k, v in defaults.items() if isinstance(v, bool)]
        if flags:
            raise ValueError(f"{', '.join(flags)} must be numbers, not true or false")
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / _GENERATION_CONFIG} gives sampling settings {defaults} that "
                              f"cannot be used ({e}); fix or remove them.") from e
    ignored = {k: v for k, v in _NOT_TAKEN.items() if generation.get(k) not in (None, v)}
    if ignored:
        logger.warning("%s gives %s, which braid does not take from there (nor does transformers): pass "
                       "it in SamplingParams.", path / _GENERATION_CONFIG,
                       ", ".join(f"{k}={generation[k]}" for k in ignored))
    if defaults.get("repetition_penalty", 1) != 1:
        logger.info("braid: requests without their own settings take %s's repetition_penalty=%s (their "
                    "draws are not captured in CUDA graphs)", path / _GENERATION_CONFIG,
                    defaults["repetition_penalty"])
    return defaults


def _check_size(name: str, value: Any, low: int, hint: str, optional: bool = False) -> None:
    """Raise unless ``value`` is an int ≥ ``low`` (or None where ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be an int ≥ {low}{none} ({hint}), got {value!r}.")


def pool_context(num_pages: int, page_size: int) -> int:
    """The longest sequence a pool of ``num_pages`` holds with one page of headroom: a request
    that reuses a prefix ending inside a page holds its own copy of that page while the cache
    keeps the original. ``max_model_len`` left out is capped at it."""
    return max(num_pages - 1, 0) * page_size


def _is_array(value: Any) -> bool:
    """A numpy array or torch tensor (a tokenizer's ``return_tensors`` row)."""
    return isinstance(value, torch.Tensor) or type(value).__module__ == "numpy" and hasattr(value, "ndim")


def _array_ids(array: Any) -> list[int]:
    """The ids of a one-dimensional integer array, as a list."""
    if array.ndim != 1:
        raise InvalidRequestError(
            f"a prompt given as an array must be one-dimensional, got shape {tuple(array.shape)}; "
            "pass each row as its own prompt, without padding.")
    if isinstance(array, torch.Tensor):
        integral = not (array.is_floating_point() or array.is_complex())
    else:  # numpy: signed, unsigned or bool
        integral = array.dtype.kind in "iub"
    if not integral:
        raise InvalidRequestError(f"a prompt's token ids must be integers, got an array of {array.dtype}.")
    return array.tolist()


def _all_ints(seq: Sequence) -> bool:
    """Whether every item is an integer (numpy's too, as the engine takes them); exact ints are
    checked in C (prompts can be long)."""
    return set(map(type, seq)) <= {int} or all(isinstance(t, numbers.Integral) for t in seq)


def _enable_fused(model: CausalLM, mode: str, device: torch.device) -> set[int]:
    """Switch the model to the Triton kernels where they run and the checkpoint allows;
    returns the fused layers. 'force' ignores the compatibility check (tests, benchmarks)."""
    if mode not in ("auto", "off", "force"):
        raise ValueError(f"fused_kernels must be 'auto', 'off' or 'force', not {mode!r}.")
    n = model.config.num_hidden_layers
    if mode == "off" or not fused_kernels_available(device):
        if mode == "force":
            raise ValueError("fused_kernels='force' needs a CUDA device with triton installed.")
        return set()
    layers = set(range(n))
    final = True
    if mode == "auto":
        report = check_model(model)
        for line in report.warnings():
            logger.warning("braid: %s", line)
        layers -= report.risky_layers
        final = report.level(-1) != "risk"
    model.set_fused(layers, final)
    logger.info("braid: fused Triton kernels in %d of %d layers", len(layers), n)
    return layers


def _make_backend(name: str, kv_cache: torch.Tensor, num_heads: int, head_dim: int,
                  cascade: str) -> AttentionBackend:
    if name == "flashinfer":
        from braid_engine.attention.flashinfer_backend import FlashInferBackend

        return FlashInferBackend(kv_cache, num_heads, head_dim, cascade)
    from braid_engine.attention.torch_backend import TorchBackend

    return TorchBackend(kv_cache, num_heads, head_dim, cascade)
