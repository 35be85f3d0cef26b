"""ChatBraid: a LangChain chat model over an embedded braid_engine, whose prefix cache keeps
every answer's KV so each turn of a conversation pays only for its new tokens."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import pydantic
import pydantic.v1
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import (
    BaseChatModel,
    LangSmithParams,
    LanguageModelInput,
    ModelProfile,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser
from langchain_core.output_parsers.openai_tools import (
    JsonOutputKeyToolsParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, Generation
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, field_validator

from braid_engine import LLM, GuidedDecoding, PinHandle, RequestOutput, SamplingParams
from braid_engine.chat import check_template_kwargs
from braid_engine.engine.engine import RequestStream
from braid_engine.llm import pool_context
from braid_engine.loader import load_config, load_tokenizer, resolve_model_path
from braid_engine.sampling import MAX_LOGPROBS
from langchain_braid._messages import TOKEN_IDS_KEY, render, template_renders_tools
from langchain_braid._thinking import CLOSE, OPEN, ReasoningParser, split_reasoning
from langchain_braid._tools import (
    ToolCallStreamParser,
    ToolChoiceError,
    after_reasoning,
    format_tools,
    is_json_schema,
    normalize_tool_choice,
    one_chunk_per_call,
    parse_tool_calls,
    to_openai_tool,
    tool_grammar,
    tool_names,
)

_PROVIDER = "braid"
_WARNED_TOOLS: set[str] = set()  # models warned that their template ignores bound tools
_PIN_SENTINEL = "\u2063braid-pin\u2063"  # marks where the next user turn would start
# the sampling settings where neither the call, the model's fields nor the checkpoint give one
_SAMPLING_FALLBACKS = {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0,
                       "frequency_penalty": 0.0, "repetition_penalty": 1.0}
_CALL_OPTIONS = frozenset({"temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                           "repetition_penalty", "logprobs", "top_logprobs", "max_tokens", "seed",
                           "enable_thinking", "enable_prefix_caching", "chat_template_kwargs",
                           "tools", "tool_choice", "parallel_tool_calls", "response_format", "stream_usage"})
# those with_structured_output binds as given (it sets the tools and response format itself)
_SCHEMA_CALL_OPTIONS = _CALL_OPTIONS - {"tools", "tool_choice", "parallel_tool_calls",
                                        "response_format"}


class _Engine:
    """One loaded ``LLM`` and the thread pins on it, shared by every matching ChatBraid."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.pins: dict[str, PinHandle] = {}
        self.lock = threading.Lock()


_ENGINES: dict[tuple[Any, ...], _Engine] = {}
# async calls load the engine, render, set up their grammar and submit on their key's thread, off
# the event loop: one at a time, in the order they were made (as when they ran on the loop). The
# thread belongs to the key, not to one loaded engine, so a reload never strands a call on it
_SUBMITTERS: dict[tuple[Any, ...], ThreadPoolExecutor] = {}
_SUBMITTERS_LOCK = threading.Lock()  # taken on the event loop: never held for long (as loads hold the registry's)
_REGISTRY_LOCK = threading.Lock()  # _ENGINES'; held while an engine loads (seconds)
# a model's tokenizer and vocabulary size, read without loading its engine (token counts), under
# a lock of their own: they should not wait for a load
_TOKENIZERS: dict[str, Any] = {}
_VOCAB_SIZES: dict[str, int] = {}
_FILES_LOCK = threading.Lock()


def _engine_key(model: str, device: str, dtype: str, engine_kwargs: dict[str, Any]) -> tuple:
    return (model, device, dtype, json.dumps(engine_kwargs, sort_keys=True, default=str))


def _loaded(key: tuple) -> _Engine | None:
    """The shared engine for ``key``, unless none is loaded or it was shut down since."""
    engine = _ENGINES.get(key)
    return None if engine is None or engine.llm.engine.closed else engine


def _engine_facts(engine: _Engine) -> ModelProfile:
    """What the profile can say only once the engine is loaded: the context its pool allows,
    and whether the chat template writes bound tools (TinyLlama's and ERNIE-4.5's do not)."""
    return ModelProfile(max_input_tokens=engine.llm.config.max_model_len,
                        tool_calling=template_renders_tools(engine.llm.tokenizer))


class ChatBraid(BaseChatModel):
    """A local chat model on braid_engine; a conversation's history is served from retained KV.

    Constructing it loads nothing: the engine loads on first use and is shared by every
    ``ChatBraid`` with the same ``(model, device, dtype, engine_kwargs)`` in the process, so
    calls from many threads, ``batch`` and ``abatch`` are batched together on one model.

    Every returned ``AIMessage`` carries the ids it was generated as in
    ``response_metadata["token_ids"]``. When the history comes back, those ids are spliced in
    wherever the chat template rendered the answer unchanged, so the cached KV is hit exactly;
    ``usage_metadata["input_token_details"]["cache_read"]`` says how many prompt tokens were
    reused. Reasoning (``<think>…</think>``) goes to ``additional_kwargs["reasoning_content"]``
    (and to reasoning blocks with ``output_version="v1"``); ``content`` holds the answer.

    Example:
        >>> from langchain_braid import ChatBraid
        >>> llm = ChatBraid(model="Qwen/Qwen3-0.6B", temperature=0, max_tokens=256)
        >>> msg = llm.invoke("Name three colours.")
        >>> msg.content, msg.usage_metadata["input_token_details"]["cache_read"]
    """

    model_config = ConfigDict(populate_by_name=True, extra="forbid")  # no option silently ignored

    model: str = Field(alias="model_name")
    """A Hugging Face hub id (e.g. ``"Qwen/Qwen3-0.6B"``) or a local checkpoint directory (a
    path object too)."""
    device: str = "auto"
    """``"auto"`` (CUDA if available, else CPU), ``"cuda"``, ``"cuda:1"`` or ``"cpu"``."""
    dtype: str = "auto"
    """``"auto"`` (the checkpoint's dtype; float32 on CPU), ``"bfloat16"``, ``"float16"``…"""
    temperature: float | None = None
    """Sampling temperature; 0 is greedy. ``None``: the model's (its ``generation_config.json``;
    Qwen3: 0.6), else 0.7."""
    top_p: float | None = None
    """Nucleus sampling mass; 1 disables it. ``None``: the model's (Qwen3: 0.95), else 1."""
    top_k: int | None = None
    """Sample among the k most likely tokens; -1 disables it. ``None``: the model's (Qwen3: 20),
    else -1."""
    presence_penalty: float | None = None
    """Subtracted once from the logit of each token the answer already holds (OpenAI's and
    vLLM's; -2 to 2, positive discourages repeating: a small model's endless loops, say).
    ``None``: 0 (off)."""
    frequency_penalty: float | None = None
    """Subtracted from a token's logit once for each time the answer holds it (-2 to 2).
    ``None``: 0 (off)."""
    repetition_penalty: float | None = None
    """transformers' penalty (> 0): a token already in the prompt or the answer has a positive
    logit divided by it and a negative one multiplied. ``None``: the model's, else 1 (off)."""
    logprobs: bool | None = None
    """Return each output token's log-probability in ``response_metadata["logprobs"]`` (OpenAI's
    form: ``{"content": [{"token", "bytes", "logprob", "top_logprobs"}]}``; a stream's chunks
    each carry their tokens'), from the model's own distribution. ``None``: on where
    ``top_logprobs`` is given."""
    top_logprobs: int | None = None
    """With ``logprobs``: how many of the most likely tokens to list at each position (0-20)."""
    max_tokens: int | None = None
    """Most tokens to generate; ``None`` runs to end of turn or the context limit."""
    stop: list[str] | None = None
    """Strings that end the answer (not included in it)."""
    seed: int | None = None
    """Seed of the request's sampler, for reproducible sampling."""
    enable_thinking: bool | None = None
    """Qwen3 thinking switch passed to the chat template; ``None`` keeps the template default."""
    enable_prefix_caching: bool = True
    """Per request: ``False`` neither reads nor writes the prefix cache."""
    streaming: bool = False
    """Use the streaming path for ``invoke`` (callbacks get each token)."""
    stream_usage: bool = True
    """Accepted as ChatOpenAI's parameter (also per call): a stream's last chunk always carries
    the usage, which a local engine has at no cost."""
    timeout: float | None = None
    """Accepted as LangChain's standard parameter; a local engine has no network to wait on."""
    max_retries: int | None = None
    """Accepted as LangChain's standard parameter; local calls are not retried."""
    api_key: SecretStr | None = Field(default=None, exclude=True)
    """Accepted as LangChain's standard parameter; a local engine needs no key."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra variables for the chat template."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Passed to ``braid_engine.LLM`` (e.g. ``max_model_len``, ``kv_cache_memory``)."""

    @field_validator("model", mode="before")
    @classmethod
    def _model_path(cls, value: Any) -> Any:
        """A path object given as ``model``, as its string."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    # the profile _resolve_model_profile made (not one the caller gave), whose context limit is
    # corrected to the engine's once it loads
    _own_profile: ModelProfile | None = PrivateAttr(default=None)

    # -- LangChain identity ------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "braid-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        # everything that changes an answer: LangChain's cache keys answers by these
        return {"model": self.model, "device": self.device, "dtype": self.dtype,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "repetition_penalty": self.repetition_penalty, "logprobs": self.logprobs,
                "top_logprobs": self.top_logprobs, "max_tokens": self.max_tokens, "stop": self.stop, "seed": self.seed,
                "enable_thinking": self.enable_thinking, "chat_template_kwargs": self.chat_template_kwargs,
                "engine_kwargs": self.engine_kwargs, "output_version": self.output_version}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=_PROVIDER, ls_model_type="chat",
            ls_model_name=kwargs.get("model") or self.model,
            ls_temperature=kwargs.get("temperature", self.temperature))
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> ChatBraid:
        """A copy; one of another model or engine gets that model's profile (the one this
        model made described this model), unless the profile was the caller's."""
        copy = super().model_copy(update=update, deep=deep)
        own = self._own_profile is not None and self.profile is self._own_profile
        if own and update and {"model", "device", "dtype", "engine_kwargs"} & update.keys():
            copy.profile = copy._resolve_model_profile()
        return copy

    def _resolve_model_profile(self) -> ModelProfile | None:
        profile = ModelProfile(text_inputs=True, text_outputs=True, image_inputs=False,
                               audio_inputs=False, video_inputs=False, pdf_inputs=False,
                               tool_calling=True, tool_choice=True, structured_output=True,
                               reasoning_output=False, temperature=True)
        config = Path(self.model).expanduser() / "config.json"
        cfg: dict[str, Any] = {}
        if config.is_file():  # a local checkpoint: read only its small config, never weights
            cfg = json.loads(config.read_text())
            profile["reasoning_output"] = cfg.get("model_type", "").startswith("qwen3")
        elif "qwen3" in self.model.lower():
            profile["reasoning_output"] = True
        limit = self._context_limit(cfg)
        if limit is not None:
            profile["max_input_tokens"] = limit
        engine = _loaded(_engine_key(self.model, self.device, self.dtype, self.engine_kwargs))
        if engine is not None:
            profile.update(_engine_facts(engine))
        self._own_profile = profile
        return profile

    def _context_limit(self, cfg: dict[str, Any]) -> int | None:
        """As much of the engine's ``max_model_len`` as ``cfg`` (the checkpoint's config) and
        ``engine_kwargs`` tell before it loads: a pool sized from memory is known only once it is
        allocated (the loaded engine's facts replace it then)."""
        given = self.engine_kwargs.get("max_model_len")
        if isinstance(given, int):
            return given
        limit = cfg.get("max_position_embeddings")
        pages, page_size = self.engine_kwargs.get("num_pages"), self.engine_kwargs.get("page_size", 16)
        if isinstance(limit, int) and isinstance(pages, int) and isinstance(page_size, int):
            limit = min(limit, pool_context(pages, page_size))  # as LLM caps it
        return limit if isinstance(limit, int) else None

    # -- engine and tokenizer ------------------------------------------------------------
    def _engine(self) -> _Engine:
        key = _engine_key(self.model, self.device, self.dtype, self.engine_kwargs)
        engine = _loaded(key)
        if engine is None:
            with _REGISTRY_LOCK:
                engine = _loaded(key)
                if engine is None:
                    if _ENGINES.pop(key, None) is not None:
                        # shut down (to free its memory): let it go before the next one loads, or
                        # both engines' weights and KV pools are held at once
                        gc.collect()  # (an engine's parts hold each other in cycles)
                    llm = LLM(self.model, device=self.device, dtype=self.dtype,
                              **{"enable_prefix_caching": True, **self.engine_kwargs})
                    engine = _ENGINES[key] = _Engine(llm)
        profile = self._own_profile
        if profile is not None and self.profile is profile:
            facts = _engine_facts(engine)
            if any(profile.get(k) != v for k, v in facts.items()):
                self.profile = self._own_profile = {**profile, **facts}
        return engine

    @property
    def llm(self) -> LLM:
        """The shared ``braid_engine.LLM`` (loaded on first access).

        Example:
            >>> ChatBraid(model="Qwen/Qwen3-0.6B").llm.stats()["prefix_hit_tokens"]
        """
        return self._engine().llm

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer; loads only the tokenizer if the engine is not loaded.

        Example:
            >>> ChatBraid(model="Qwen/Qwen3-0.6B").tokenizer.decode([9707])
        """
        # one look-up: a shut-down engine is dropped from the registry before its successor loads
        engine = _ENGINES.get(_engine_key(self.model, self.device, self.dtype, self.engine_kwargs))
        if engine is not None:
            return engine.llm.tokenizer
        with _FILES_LOCK:
            if self.model not in _TOKENIZERS:
                _TOKENIZERS[self.model] = load_tokenizer(resolve_model_path(self.model))
            return _TOKENIZERS[self.model]

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` under the checkpoint's own tokenizer.

        Example:
            >>> ChatBraid(model="Qwen/Qwen3-0.6B").get_token_ids("hello world")
        """
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def get_num_tokens_from_messages(self, messages: list[BaseMessage],
                                     tools: Sequence[Any] | None = None) -> int:
        """Tokens of the prompt ``invoke(messages)`` sends (with ``tools`` bound, as given to
        ``bind_tools``): rendered as a call renders it, generation prompt and carried answer ids
        included, so it equals that call's ``usage_metadata["input_tokens"]``. (A forced
        ``tool_choice`` or a ``response_format`` renders without thinking, which may differ.)

        ``trim_messages(token_counter=chat)`` then keeps what fits the prompt. With
        ``include_system=True`` it counts the system message apart from the rest (and, with
        ``strategy="last"``, the rest in reverse), each count with its own generation prompt, so
        it keeps a few tokens to spare.

        Example:
            >>> ChatBraid(model="Qwen/Qwen3-0.6B").get_num_tokens_from_messages([HumanMessage("hi")])
        """
        if not messages:
            return 0  # nothing to render (templates refuse an empty conversation)
        tok = self.tokenizer
        template = self._template_kwargs({})
        if tools:
            template["tools"] = format_tools(tools)
        rendered = render(tok, messages, template_kwargs=template, vocab_size=self._vocab_size())
        return len(rendered.token_ids(tok))

    def _vocab_size(self) -> int:
        """The model's vocabulary (its embedding rows; padding rows may pass the tokenizer's
        length): the engine's, else config.json's, read without loading the engine."""
        engine = _loaded(_engine_key(self.model, self.device, self.dtype, self.engine_kwargs))
        if engine is not None:
            return engine.llm.model_config.vocab_size
        with _FILES_LOCK:
            if self.model not in _VOCAB_SIZES:
                _VOCAB_SIZES[self.model] = load_config(resolve_model_path(self.model)).vocab_size
            return _VOCAB_SIZES[self.model]

    # -- thread pins ---------------------------------------------------------------------
    def pin_thread(self, thread_id: str, messages: Sequence[BaseMessage],
                   tools: Sequence[Any] | None = None) -> int:
        """Keep the KV of a conversation resident until ``release_thread(thread_id)``.

        Pins what the thread's next turn will reuse (its history as the template renders it
        before a new user message; pass an agent's ``tools``, which the template renders into
        the prompt, as given to ``bind_tools``). Pinning the same thread again moves the pin
        to the new history. Returns the number of tokens pinned.

        Example:
            >>> state = graph.get_state(config)
            >>> chat.pin_thread(config["configurable"]["thread_id"], state.values["messages"])
        """
        engine = self._engine()
        tok = engine.llm.tokenizer
        template = self._template_kwargs({})
        if tools:
            template["tools"] = format_tools(tools)
        rendered = render(tok, [*messages, HumanMessage(_PIN_SENTINEL)],
                          add_generation_prompt=False, template_kwargs=template,
                          vocab_size=engine.llm.model_config.vocab_size)
        ids = rendered.token_ids(tok, end=rendered.text.rfind(_PIN_SENTINEL))
        handle = engine.llm.engine.pin(ids)
        with engine.lock:
            old = engine.pins.pop(thread_id, None)
            engine.pins[thread_id] = handle
        if old is not None:  # after the new pin, so the shared prefix never leaves the cache
            old.release()
        return handle.num_tokens

    def release_thread(self, thread_id: str) -> bool:
        """Let the KV of a pinned thread be evicted again; ``False`` if it was not pinned.

        Example:
            >>> chat.release_thread("user-42")
        """
        engine = self._engine()
        with engine.lock:
            handle = engine.pins.pop(thread_id, None)
        if handle is None:
            return False
        handle.release()
        return True

    # -- requests ------------------------------------------------------------------------
    def _template_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        # the model's settings, then the call's over them; within each, the enable_thinking
        # switch over a chat_template_kwargs value of the same name
        kwargs = dict(self.chat_template_kwargs)
        if self.enable_thinking is not None:
            kwargs["enable_thinking"] = self.enable_thinking
        kwargs.update(options.get("chat_template_kwargs", {}))
        if options.get("enable_thinking") is not None:
            kwargs["enable_thinking"] = options["enable_thinking"]
        check_template_kwargs(kwargs)
        return kwargs

    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[_Engine, list[int], SamplingParams, bool,
                                                  list[str], int | None]:
        """The engine, the prompt ids, the sampling params, whether the prompt opened a
        ``<think>`` block, the names of the bound tools (calls are parsed if any) and the most
        calls an answer may hold (``None``: no limit)."""
        options = {k: v for k, v in kwargs.items() if k != "stream" and not k.startswith("ls_")}
        unknown = set(options) - _CALL_OPTIONS
        if unknown:
            raise TypeError(
                f"ChatBraid got unknown call options {sorted(unknown)}; per call it accepts "
                f"{sorted(_CALL_OPTIONS)} and stop.")
        _check_switches(options)  # before anything loads
        template = self._template_kwargs(options)
        tools = format_tools(options.get("tools") or [])  # bound ones are already formatted
        choice = _tool_choice(options.get("tool_choice"), tool_names(tools))
        parallel = _parallel_tool_calls(options.get("parallel_tool_calls"))
        response_format = _response_format_grammar(options.get("response_format"))
        if tools:  # (create_agent binds a response_format beside the tools for its final answer)
            template["tools"] = tools
        else:
            choice = "any" if response_format is not None else "auto"
        # an answer the grammar writes whole (forced calls, a response format) starts at its first
        # token and ends where the grammar ends: stop strings, which end free text, would cut it
        whole = choice not in ("auto", "none") or response_format is not None
        if whole:
            template["enable_thinking"] = False
        engine = self._engine()
        tok = engine.llm.tokenizer
        if tools and not template_renders_tools(tok) and self.model not in _WARNED_TOOLS:
            _WARNED_TOOLS.add(self.model)
            warnings.warn(
                f"the chat template of {self.model} ignores the bound tools: the model never sees "
                "their definitions, and tool calls in the history are not rendered. Calls forced by "
                "tool_choice still come out schema-valid (the grammar writes them); for a model to "
                "choose tools, use one whose template renders them (Qwen3).", UserWarning, stacklevel=3)
        rendered = render(tok, messages, template_kwargs=template,
                          vocab_size=engine.llm.model_config.vocab_size)
        opened = rendered.text.rstrip().endswith(OPEN)
        # a free answer may reason first (in a block the prompt opened, or one it opens itself):
        # the calls' grammar starts after it
        if tools:
            guided = tool_grammar(tools, choice, _answer_format(response_format), parallel=parallel,
                                  reasoning="open" if opened else "may")
        elif response_format is not None and opened:  # a template that opens <think> whatever it is asked
            guided = GuidedDecoding(structural_tag={"type": "structural_tag", "format": after_reasoning(
                _answer_format(response_format), opened=True)})
        else:
            guided = response_format
        # per call, else the model's field, else the checkpoint's generation_config.json, else ours
        model = engine.llm.sampling_defaults
        sampling = {name: next(v for v in (options.get(name), getattr(self, name, None), model.get(name), fallback)
                               if v is not None)
                    for name, fallback in _SAMPLING_FALLBACKS.items()}
        params = SamplingParams(
            **sampling, max_tokens=options.get("max_tokens", self.max_tokens),
            stop=None if whole else stop if stop is not None else self.stop, seed=options.get("seed", self.seed),
            logprobs=self._logprobs(options),
            enable_prefix_caching=options.get("enable_prefix_caching", self.enable_prefix_caching),
            guided=guided,
        )
        limit = None if parallel else 1
        return engine, rendered.token_ids(tok), params, opened, tool_names(tools), limit

    def _usage(self, prompt_ids: list[int], out_ids: list[int], cached: int, tok: Any,
               opened: bool) -> UsageMetadata:
        """The usage; reasoning tokens run to ``</think>``, or to the end when the block (opened
        by the prompt, ``opened``, or by the answer's first token) never closed."""
        usage = UsageMetadata(input_tokens=len(prompt_ids), output_tokens=len(out_ids),
                              total_tokens=len(prompt_ids) + len(out_ids),
                              input_token_details={"cache_read": cached})
        close_id = tok.convert_tokens_to_ids(CLOSE)
        if isinstance(close_id, int) and close_id in out_ids:
            usage["output_token_details"] = {"reasoning": out_ids.index(close_id) + 1}
        elif out_ids and (opened or out_ids[0] == tok.convert_tokens_to_ids(OPEN)):
            usage["output_token_details"] = {"reasoning": len(out_ids)}
        return usage

    def _logprobs(self, options: dict[str, Any]) -> int | None:
        """SamplingParams' ``logprobs`` from ``logprobs`` and ``top_logprobs`` (the call's, else the
        fields'): None where off."""
        on = options.get("logprobs", self.logprobs)
        top = options.get("top_logprobs", self.top_logprobs)
        if on is not None and not isinstance(on, bool):
            raise TypeError(f"logprobs must be True, False or None, got {on!r}.")
        if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_LOGPROBS):
            raise ValueError(f"top_logprobs must be an int from 0 to {MAX_LOGPROBS} or None, got {top!r}.")
        if on is False or (on is None and top is None):
            return None
        return 0 if top is None else top

    def _metadata(self, engine: _Engine, out_ids: list[int], delta: RequestOutput, top: int | None) -> dict[str, Any]:
        """A message's (or a stream's last chunk's) metadata; ``top``: the request's ``logprobs``."""
        return {"model_name": self.model, "model_provider": _PROVIDER,
                "finish_reason": delta.finish_reason, TOKEN_IDS_KEY: list(out_ids),
                **_logprob_metadata(engine, delta, top)}

    def _message(self, engine: _Engine, out: RequestOutput, opened: bool,
                 names: list[str], limit: int | None, top: int | None) -> AIMessage:
        reasoning, answer = split_reasoning(out.text, thinking=opened)
        calls: dict[str, Any] = {}
        if names:
            answer, tool_calls, invalid = parse_tool_calls(answer, names, limit)
            calls = {"tool_calls": tool_calls, "invalid_tool_calls": invalid}
        return AIMessage(
            content=answer, **calls,
            additional_kwargs={"reasoning_content": reasoning} if reasoning else {},
            usage_metadata=self._usage(out.prompt_token_ids, out.token_ids,
                                       out.num_cached_tokens, engine.llm.tokenizer, opened),
            response_metadata=self._metadata(engine, out.token_ids, out, top),
        )

    def _chunk(self, reasoning: str, answer: str, **extra: Any) -> ChatGenerationChunk:
        kwargs = {"reasoning_content": reasoning} if reasoning else {}
        return ChatGenerationChunk(
            message=AIMessageChunk(content=answer, additional_kwargs=kwargs, **extra))

    def _delta_chunk(self, engine: _Engine, prompt_ids: list[int], out_ids: list[int],
                     parser: _AnswerParser, delta: RequestOutput, top: int | None) -> ChatGenerationChunk:
        """The chunk of one engine delta (``out_ids`` collects the generated ids; ``top``: the
        request's ``logprobs``)."""
        out_ids += delta.token_ids
        reasoning, answer, calls = parser.feed(delta.text)
        if delta.finish_reason is None:  # one chunk per sampled token, even if its text is held
            logprobs = _logprob_metadata(engine, delta, top)
            extra = {"response_metadata": logprobs} if logprobs else {}
            return self._chunk(reasoning, answer, tool_call_chunks=one_chunk_per_call(calls), **extra)
        tail_reasoning, tail_answer, tail_calls = parser.finish()
        return self._last_chunk(engine, prompt_ids, out_ids, delta, reasoning + tail_reasoning,
                                answer + tail_answer, one_chunk_per_call(calls + tail_calls), parser.opened, top)

    def _last_chunk(self, engine: _Engine, prompt_ids: list[int], out_ids: list[int],
                    delta: RequestOutput, reasoning: str, answer: str,
                    calls: list[Any], opened: bool, top: int | None) -> ChatGenerationChunk:
        return self._chunk(
            reasoning, answer, chunk_position="last", tool_call_chunks=calls,
            usage_metadata=self._usage(prompt_ids, out_ids, delta.num_cached_tokens,
                                       engine.llm.tokenizer, opened),
            response_metadata=self._metadata(engine, out_ids, delta, top))

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        engine, ids, params, opened, names, limit = self._prepare(messages, stop, kwargs)
        out = engine.llm.engine.add_request(ids, params, final_only=True).result()
        message = self._message(engine, out, opened, names, limit, params.logprobs)
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": self.model})

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        engine, stream, opened, names, limit = await self._asubmit(messages, stop, kwargs, final_only=True)
        out = await stream.aresult()
        message = self._message(engine, out, opened, names, limit, stream.params.logprobs)
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": self.model})

    async def _asubmit(self, messages: list[BaseMessage], stop: list[str] | None,
                       kwargs: dict[str, Any], final_only: bool = False) -> tuple[_Engine, RequestStream, bool,
                                                                                list[str], int | None]:
        """``_prepare`` and ``add_request`` on the submitting thread of the model's key, never on
        the event loop: loading takes seconds, a first guided request builds the grammar runtime (~1.1 s
        for a 150k-token vocabulary), each new schema compiles (10-20 ms) and a long prompt takes
        milliseconds to render. The request's stream, the prompt's ``<think>`` state, the tool
        names and the call limit come back. A call cancelled while it is being submitted aborts
        its request once it is queued (the thread cannot be stopped midway)."""
        loop = asyncio.get_running_loop()
        key = _engine_key(self.model, self.device, self.dtype, self.engine_kwargs)
        with _SUBMITTERS_LOCK:
            submitter = _SUBMITTERS.get(key)
            if submitter is None:
                submitter = _SUBMITTERS[key] = ThreadPoolExecutor(1, thread_name_prefix="braid-submit")
        submission = _Submission()

        def submit() -> tuple[_Engine, RequestStream, bool, list[str], int | None]:
            engine, ids, params, opened, names, limit = self._prepare(messages, stop, kwargs)
            stream = engine.llm.engine.add_request(ids, params, loop=loop, final_only=final_only)
            submission.queued(stream)
            return engine, stream, opened, names, limit

        submitted = loop.run_in_executor(submitter, contextvars.copy_context().run, submit)
        try:
            return await asyncio.shield(submitted)
        except asyncio.CancelledError:
            submission.cancel()
            raise

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        engine, ids, params, opened, names, limit = self._prepare(messages, stop, kwargs)
        parser = _AnswerParser(opened, names, limit)
        deltas = iter(engine.llm.engine.add_request(ids, params))
        out_ids: list[int] = []
        try:
            for delta in deltas:
                yield self._delta_chunk(engine, ids, out_ids, parser, delta, params.logprobs)
        finally:
            deltas.close()  # a caller that stops early aborts the request

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        engine, stream, opened, names, limit = await self._asubmit(messages, stop, kwargs)
        parser = _AnswerParser(opened, names, limit)
        deltas = stream.__aiter__()
        out_ids: list[int] = []
        try:
            async for delta in deltas:
                yield self._delta_chunk(engine, stream.prompt_token_ids, out_ids, parser, delta,
                                        stream.params.logprobs)
        finally:
            await deltas.aclose()  # a caller that stops early aborts the request

    # -- tools and structured output -----------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, strict: bool | None = None,
                   parallel_tool_calls: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, pydantic models, TypedDicts, functions or OpenAI dicts).

        They are rendered through the chat template's ``tools`` support, and every call the
        model writes is constrained by a grammar, so ``tool_calls`` always parse and match the
        tool's argument schema. ``tool_choice``: ``"auto"`` (default; the model decides),
        ``"any"``/``"required"`` (at least one call, from the first token), a tool name (that
        tool), or ``"none"`` (no call); ``False``, as ``None``, is no choice. A forced call
        answers without a reasoning block. ``strict`` is accepted for compatibility: calls are
        always schema-strict. ``parallel_tool_calls=False`` ends the answer after its first call
        (at most one call; ``True``/``None``: any number); like the other options it may also
        be given per call.

        Example:
            >>> def get_weather(city: str) -> str:
            ...     \"\"\"The weather in a city.\"\"\"
            >>> msg = chat.bind_tools([get_weather], tool_choice="any").invoke("Paris?")
            >>> msg.tool_calls[0]["name"], msg.tool_calls[0]["args"]["city"]
        """
        formatted = format_tools(tools)
        names = tool_names(formatted)
        if tool_choice is not None:
            tool_choice = _tool_choice(tool_choice, names)
        if parallel_tool_calls is not None:
            kwargs["parallel_tool_calls"] = _parallel_tool_calls(parallel_tool_calls)
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self, schema: dict[str, Any] | type, *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False, strict: bool | None = None,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool] | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """A runnable returning ``schema``-shaped output (pydantic instance, else a dict).

        ``schema``: a pydantic model (v1 or v2), a TypedDict, a function, a LangChain tool, a
        JSON Schema dict (``"title"`` names its tool; only ``"function_calling"`` needs one),
        an OpenAI or Anthropic tool dict, or OpenAI's ``{"name": …, "schema": {…}}`` (also
        inside ``{"type": "json_schema", "json_schema": …}``).

        ``method="json_schema"`` constrains the answer to the schema's JSON; ``"function_calling"``
        forces a call of a tool named after the schema; ``"json_mode"`` constrains the answer to
        some JSON object (describe the keys in the prompt; ``schema`` then only parses).
        ``include_raw=True`` returns ``{"raw", "parsed", "parsing_error"}`` instead of raising.
        ``strict`` is accepted for compatibility: decoding is always schema-strict (with
        ``"json_mode"``, which has no schema, it is refused, as ChatOpenAI does).
        ``tools`` (``"json_schema"`` only): the model may call one of them instead, as with
        ChatOpenAI (``parsed`` is then ``None``; the calls are in the raw message). Call options
        (``temperature``, ``max_tokens``, ``seed``…) are bound to the model.

        Example:
            >>> class Person(BaseModel):
            ...     name: str
            ...     age: int
            >>> chat.with_structured_output(Person).invoke("Invent a person.")
            Person(name='…', age=…)
        """
        unknown = set(kwargs) - _SCHEMA_CALL_OPTIONS
        if unknown:
            raise TypeError(
                f"with_structured_output got unexpected arguments {sorted(unknown)}; besides "
                f"method, include_raw, strict and tools it binds the call options "
                f"{sorted(_SCHEMA_CALL_OPTIONS)}.")
        if tools and method != "json_schema":
            raise TypeError(f'tools= needs method="json_schema" (got {method!r}): the answer is '
                            "then a call of one of the tools or the schema's JSON.")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method={method!r}: use 'json_schema', 'function_calling' or 'json_mode'.")
        if method == "json_mode" and strict is not None:
            raise ValueError(f"strict={strict!r} has nothing to act on with method='json_mode' (any JSON object "
                             "is accepted); leave it out, or use method='json_schema' with the schema, whose "
                             "answers always keep to it.")
        if schema is None and method != "json_mode":
            raise ValueError(f"method={method!r} needs a schema; pass one, or use method='json_mode'.")
        schema = _named_schema(schema)
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        ls_format = {"kwargs": {"method": method}, "schema": schema}
        parser: Runnable
        if method == "function_calling":
            tool = to_openai_tool(schema, 'with_structured_output(schema, method="function_calling")',
                                  ', or use method="json_schema", which takes any JSON Schema')
            name = tool["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, ls_structured_output_format=ls_format,
                                  **kwargs)
            parser = (_PydanticToolsParser(tools=[schema], first_tool_only=True) if pydantic
                      else _JsonOutputKeyToolsParser(key_name=name, first_tool_only=True))
        else:
            if method == "json_schema":  # a bare JSON Schema is used as given: nothing is named
                if is_json_schema(schema):
                    json_schema = schema
                elif pydantic and hasattr(schema, "model_json_schema"):
                    # pydantic v2's own schema keeps $defs and $ref: a model that nests itself stays
                    # constrained all the way down (LangChain's inlining leaves its children {})
                    json_schema = schema.model_json_schema()
                else:
                    json_schema = convert_to_json_schema(schema)
                fmt = {"type": "json_schema", "json_schema": {"schema": json_schema}}
            else:
                fmt = {"type": "json_object"}
            bound = {"response_format": fmt, **kwargs,
                     "ls_structured_output_format": ls_format if schema is not None else None}
            llm = self.bind_tools(tools, **bound) if tools else self.bind(**bound)
            if pydantic or tools:
                parser = RunnableLambda(_json_parser(schema if pydantic else None, calls=bool(tools)))
            else:  # streams the object as it grows, as ChatOpenAI and ChatOllama do
                parser = _JsonOutputParser()
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser,
                                            parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([fallback], exception_key="parsing_error")


def _named_schema(schema: Any) -> Any:
    """OpenAI's response-format forms of a schema, ``{"name", "schema"}`` and ``{"type":
    "json_schema", "json_schema": {"name", "schema"}}``, as the JSON Schema they hold titled
    with the name (LangChain would read the first as a tool without arguments); any other
    schema unchanged."""
    if isinstance(schema, dict) and schema.get("type") == "json_schema" \
            and isinstance(schema.get("json_schema"), dict):
        schema = schema["json_schema"]
    if isinstance(schema, dict) and isinstance(schema.get("schema"), dict) and "name" in schema:
        described = {"description": schema["description"]} if "description" in schema else {}
        return {**schema["schema"], "title": schema["name"], **described}
    return schema


def _response_format_grammar(response_format: dict[str, Any] | None) -> GuidedDecoding | None:
    """The constraint of an OpenAI-style ``response_format`` (``json_schema``/``json_object``;
    ``text``, OpenAI's default, is none)."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedDecoding(json_object=True)
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        spec = response_format["json_schema"]
        return GuidedDecoding(json_schema=spec.get("schema", spec))
    raise ValueError(f"response_format={response_format!r}: use {{'type': 'json_object'}}, "
                     "{'type': 'json_schema', 'json_schema': {'schema': {...}}} or {'type': 'text'}.")


class _Submission:
    """An async call's request, queued on the engine's submitting thread, and whether the call
    was cancelled meanwhile: whichever of the two comes second aborts the request. (A callback on
    the call's event loop never ran where the loop closed first, asyncio.run after a timeout, and
    an ainvoke's request, which hands the loop nothing until it ends, ran to its end for nobody.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: RequestStream | None = None
        self._cancelled = False

    def queued(self, stream: RequestStream) -> None:
        with self._lock:
            self._stream, cancelled = stream, self._cancelled
        if cancelled:
            stream.engine.abort(stream.request_id)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled, stream = True, self._stream
        if stream is not None:
            stream.engine.abort(stream.request_id)


def _check_switches(options: dict[str, Any]) -> None:
    """Refuse per-call options of the wrong kind, naming them: a string passed as a switch is
    true however it reads ("no"), and a template's variables must be a dict."""
    kwargs = options.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise TypeError(f"chat_template_kwargs must be a dict of template variables, got {kwargs!r}.")
    caching = options.get("enable_prefix_caching", True)
    if not isinstance(caching, bool):
        raise TypeError(f"enable_prefix_caching must be True or False, got {caching!r}.")
    thinking = options.get("enable_thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise TypeError(f"enable_thinking must be True, False or None, got {thinking!r} (None keeps "
                        "the template's default).")


def _tool_choice(tool_choice: Any, names: list[str]) -> str:
    """``normalize_tool_choice``, refusing a choice that asks for a call when no tool is bound
    (it was dropped silently and the answer was free text; OpenAI's API refuses it too)."""
    if not names and tool_choice not in (None, False, "auto", "none"):
        try:
            forced = normalize_tool_choice(tool_choice, names) not in ("auto", "none")
        except ToolChoiceError:  # a tool's name, or True: a call of a tool not bound
            forced = True
        if forced:
            raise ToolChoiceError(
                f"tool_choice={tool_choice!r} asks for a tool call, but no tools are bound; bind "
                "them with bind_tools(tools, tool_choice=...) (or pass tools= with it).")
    return normalize_tool_choice(tool_choice, names)


def _parallel_tool_calls(value: Any) -> bool:
    """Whether an answer may hold several calls, from OpenAI's ``parallel_tool_calls``."""
    if value is None or isinstance(value, bool):
        return value is not False
    raise TypeError(f"parallel_tool_calls={value!r}: pass True, False or None (False allows at "
                    "most one tool call per answer).")


def _answer_format(guided: GuidedDecoding | None) -> dict[str, Any] | None:
    """A response format's constraint as a structural-tag format (to combine with tool calls)."""
    if guided is None:
        return None
    schema = {"type": "object"} if guided.json_object else guided.json_schema
    return {"type": "json_schema", "json_schema": schema}


def _json_parser(model: type | None, *, calls: bool = False) -> Callable[[AIMessage], Any]:
    """Parse an answer's JSON (into ``model`` when given; pydantic v1 and v2 alike); with
    ``calls``, an answer that calls tools parses as ``None``."""

    def parse(message: AIMessage) -> Any:
        _refuse_cut_off(message)
        if calls and message.tool_calls:
            return None
        try:
            value = json.loads(message.text, strict=False)  # raw control characters are allowed
        except ValueError as e:
            raise OutputParserException(f"structured output: the answer is not JSON ({e})",
                                        llm_output=message.text) from e
        if model is None:
            return value
        try:
            return model.model_validate(value) if hasattr(model, "model_validate") else model.parse_obj(value)
        except (pydantic.ValidationError, pydantic.v1.ValidationError) as e:
            # JSON the schema does not take (json_mode constrains only to an object; validators
            # no grammar enforces): the parser exception that retrying and fixing parsers catch
            raise OutputParserException(f"structured output: the answer does not fit {model.__name__} ({e})",
                                        llm_output=message.text) from e

    return parse


def _refuse_cut_off(message: BaseMessage) -> None:
    """Raise OutputParserException for an answer cut off before its JSON (or call) was complete:
    parsed, it failed with a bare JSONDecodeError, or came back as a partial object (dict schemas'
    parser repairs what it can) or as no call at all. An answer that ends "length" with its JSON
    or calls whole (its last token closed them; the stop token had no room) is no cut."""
    if message.response_metadata.get("finish_reason") != "length" or _whole(message):
        return
    used = (getattr(message, "usage_metadata", None) or {}).get("output_tokens")
    raise OutputParserException(
        f"structured output: the answer was cut off at max_tokens ({used} tokens, finish_reason "
        "'length') before its JSON was complete; raise max_tokens (or, if the prompt filled the "
        "context, shorten it).", llm_output=message.text)


def _whole(message: BaseMessage) -> bool:
    """Whether ``message``'s calls, or else its text as JSON, are complete."""
    calls, invalid = getattr(message, "tool_calls", None), getattr(message, "invalid_tool_calls", None)
    if calls or invalid:
        return bool(calls) and not invalid
    try:
        json.loads(message.text, strict=False)
    except ValueError:
        return False
    return True


class _RefusesCutOff:
    """A LangChain output parser that refuses an answer cut off at max_tokens (streamed too:
    the accumulated last chunk carries the finish reason)."""

    def parse_result(self, result: list[Generation], *, partial: bool = False) -> Any:
        if result and isinstance(result[0], ChatGeneration):
            _refuse_cut_off(result[0].message)
        return super().parse_result(result, partial=partial)  # type: ignore[misc]


class _JsonOutputParser(_RefusesCutOff, JsonOutputParser):
    pass


class _PydanticToolsParser(_RefusesCutOff, PydanticToolsParser):
    pass


class _JsonOutputKeyToolsParser(_RefusesCutOff, JsonOutputKeyToolsParser):
    pass


class _AnswerParser:
    """Reasoning split, then (when tools are bound) tool calls, for a streamed answer."""

    def __init__(self, opened: bool, names: list[str], limit: int | None) -> None:
        self.opened = opened  # the prompt opened a <think> block
        self.reasoning = ReasoningParser(thinking=opened)
        self.calls = ToolCallStreamParser(names, limit) if names else None

    def feed(self, delta: str) -> tuple[str, str, list[Any]]:
        reasoning, answer = self.reasoning.feed(delta)
        if self.calls is None:
            return reasoning, answer, []
        answer, chunks = self.calls.feed(answer)
        return reasoning, answer, chunks

    def finish(self) -> tuple[str, str, list[Any]]:
        reasoning, answer = self.reasoning.finish()
        if self.calls is None:
            return reasoning, answer, []
        text, chunks = self.calls.feed(answer)
        tail, more = self.calls.finish()
        return reasoning, text + tail, chunks + more


def _logprob_metadata(engine: _Engine, delta: RequestOutput, top: int | None) -> dict[str, Any]:
    """``{"logprobs": ...}`` (``openai_logprobs``) for a delta or answer of a request that asked
    for them (``top``: its ``logprobs``), else {}."""
    if delta.logprobs is None or top is None:
        return {}
    return {"logprobs": openai_logprobs(delta.logprobs, top, engine.llm.tokenizer)}


def openai_logprobs(entries: list[dict[int, float]], top: int, tok: Any) -> dict[str, Any]:
    """The engine's log-probabilities (``RequestOutput.logprobs`` of a request with
    ``logprobs=top``: per token, the drawn token's first, then the ``top`` most likely) in
    OpenAI's form, as ChatOpenAI puts them in ``response_metadata["logprobs"]``: each token's
    text (decoded alone), its own bytes (``token_bytes``: a character split over several tokens
    has its UTF-8 bytes spread over their entries, where the text of each is U+FFFD), its
    log-probability and the ``top`` most likely tokens at its position, most likely first."""
    byte_level = "ByteLevel" in repr(getattr(getattr(tok, "backend_tokenizer", None), "decoder", None))

    def one(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tok.decode([token]), "bytes": list(token_bytes(tok, token, byte_level)),
                "logprob": logprob}

    content = []
    for entry in entries:
        token, logprob = next(iter(entry.items()))
        # the engine took the most likely by (log-probability, lower id): the drawn token, where
        # it is not one of them, sorts after them all
        likely = sorted(entry.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        content.append({**one(token, logprob), "top_logprobs": [one(t, v) for t, v in likely]})
    return {"content": content}


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary (GPT-2's scheme, Qwen's and Llama
    3's) stands for: a byte that is a visible Latin-1 character is written as itself, the others
    (space, controls, a few more), in byte order, as U+0100, U+0101, and so on."""
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return {chr(b if b in visible else next(shifted)): b for b in range(256)}


_BYTE_OF = _byte_level_alphabet()


def token_bytes(tok: Any, token: int, byte_level: bool) -> bytes:
    """A token's own bytes, as OpenAI's ``bytes`` gives them: those its vocabulary piece spells in
    a byte-level BPE (``byte_level``) or a byte-fallback piece (``<0xE6>``), so that a character
    split over tokens is whole again when their bytes are joined; otherwise (and for added
    tokens) the UTF-8 of the token's text decoded alone."""
    piece = tok.convert_ids_to_tokens(token)
    if isinstance(piece, str) and token not in getattr(tok, "added_tokens_decoder", {}):
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        if byte_level and all(ch in _BYTE_OF for ch in piece):
            return bytes(_BYTE_OF[ch] for ch in piece)
    return tok.decode([token]).encode("utf-8", errors="replace")
