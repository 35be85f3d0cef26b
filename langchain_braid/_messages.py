"""LangChain messages → chat-template dicts → prompt token ids, reusing the ids each answer
was generated as (so a returning conversation hits the retained KV exactly)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from braid_engine.chat import render_chat
from braid_engine.errors import BraidError, ChatTemplateError

#: ``response_metadata`` key under which ChatBraid stores the token ids it generated.
TOKEN_IDS_KEY = "token_ids"

_TEXT_BLOCKS = ("text", "text-plain")
_REASONING_BLOCKS = ("reasoning", "thinking")
_IGNORED_AI_BLOCKS = ("tool_call", "tool_call_chunk", "tool_use", "server_tool_call")
_ROLES = {"system": "system", "developer": "system", "human": "user", "user": "user",
          "ai": "assistant", "assistant": "assistant", "tool": "tool"}


class UnsupportedContentError(BraidError, ValueError):
    """A message holds content ChatBraid cannot feed a text-only model (images, audio, files)."""


class _Memo:
    """What a conversation sends again every turn, computed once: the token ids of its unchanged
    text pieces (the system prompt, earlier questions) and the template's text of its earlier
    messages. Re-tokenising a 36k-character system prompt took ~18 ms a turn on the CPU
    machine, more than a cached turn's forward on the GPU. Least recently used out first, once
    the keys and values held pass ``limit`` characters and ids."""

    limit = 8 << 20

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.splitter: re.Pattern[str] | None | bool = False  # False: not yet worked out

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        value = compute()
        size = len(key) + len(value)
        with self._lock:
            if key not in self._items and size <= self.limit:
                self._items[key] = (value, size)
                self._size += size
                while self._size > self.limit:
                    _, (_, dropped) = self._items.popitem(last=False)
                    self._size -= dropped
        return value


_MEMOS: weakref.WeakKeyDictionary[Any, _Memo] = weakref.WeakKeyDictionary()
_MEMOS_LOCK = threading.Lock()


def _memo(tokenizer: Any) -> _Memo:
    with _MEMOS_LOCK:
        try:
            memo = _MEMOS.get(tokenizer)
            if memo is None:
                memo = _MEMOS[tokenizer] = _Memo()
        except TypeError:  # a tokenizer that cannot be weakly referenced or hashed: nothing kept
            memo = _Memo()
            memo.splitter = None  # nor worth cutting the text for
        return memo


def _content_text(message: BaseMessage) -> tuple[str, str]:
    """The message's text and (for AI messages) its reasoning, from str or list content
    (a tool message's ``json`` blocks as JSON text). An AI message's text blocks are joined as
    they are: they are pieces of one answer (an ``output_version="v1"`` stream splits its text
    where a call stood, the separator kept in the piece after it), as LangChain's ``.text``
    reads them; other messages' blocks are lines."""
    content = message.content
    if isinstance(content, str):
        return content, ""
    texts: list[str] = []
    reasoning: list[str] = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in _TEXT_BLOCKS:
            texts.append(block.get("text", ""))
        elif kind == "json" and isinstance(message, ToolMessage):  # a tool's result as data
            texts.append(json.dumps(block.get("json"), ensure_ascii=False))
        elif kind in _REASONING_BLOCKS and isinstance(message, AIMessage):
            reasoning.append(block.get("reasoning") or block.get("thinking") or "")
        elif kind in _IGNORED_AI_BLOCKS and isinstance(message, AIMessage):
            continue  # tool calls travel in message.tool_calls
        else:
            raise UnsupportedContentError(
                f"a {message.type} message holds a {kind!r} content block, but ChatBraid serves "
                "text-only models; send text blocks only (describe or transcribe media first).")
    return ("" if isinstance(message, AIMessage) else "\n").join(texts), "".join(reasoning)


def to_template_dict(message: BaseMessage) -> dict[str, Any]:
    """One LangChain message as the dict a Hugging Face chat template expects."""
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, ToolMessage):
        role = "tool"
    elif isinstance(message, ChatMessage) and message.role in _ROLES:
        role = _ROLES[message.role]
    else:
        raise UnsupportedContentError(
            f"ChatBraid cannot render a {type(message).__name__} (role "
            f"{getattr(message, 'role', message.type)!r}); use System, Human, AI or Tool messages.")
    text, reasoning = _content_text(message)
    out: dict[str, Any] = {"role": role, "content": text}
    if message.name:
        out["name"] = message.name
    if isinstance(message, AIMessage):
        reasoning = reasoning or message.additional_kwargs.get("reasoning_content") or ""
        if reasoning:
            out["reasoning_content"] = reasoning
        if message.tool_calls:
            out["tool_calls"] = [
                {"type": "function", "id": tc.get("id"),
                 "function": {"name": tc["name"], "arguments": tc["args"]}}
                for tc in message.tool_calls
            ]
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
        if not isinstance(message.content, str):
            out["content"] = text or json.dumps(message.content)
    return out


def carried_token_ids(message: BaseMessage, vocab_size: int | None = None) -> list[int] | None:
    """The token ids ChatBraid generated for ``message``, if it is one of its answers. They come
    back from wherever the history was kept (JSON, a message built by hand), so ids that are not
    ints or fall outside ``[0, vocab_size)`` (decoding 2**40 raised OverflowError) mean none: the
    message is then tokenised from its text."""
    if not isinstance(message, AIMessage):
        return None
    ids = message.response_metadata.get(TOKEN_IDS_KEY)
    if isinstance(ids, list) and ids and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t
            and (vocab_size is None or t < vocab_size) for t in ids):
        return ids
    return None


@dataclass
class RenderedPrompt:
    """The template's text and the spans of it that are spliced with original token ids."""

    text: str
    spans: list[tuple[int, int, list[int]]] = field(default_factory=list)

    def token_ids(self, tokenizer: Any, end: int | None = None) -> list[int]:
        """Token ids of ``text[:end]``: original ids in spans, fresh tokenization elsewhere."""
        end = len(self.text) if end is None else end
        ids: list[int] = []
        pos = 0
        for start, stop, span_ids in self.spans:
            if stop > end:
                break
            ids.extend(_encode(tokenizer, self.text[pos:start]))
            ids.extend(span_ids)
            pos = stop
        ids.extend(_encode(tokenizer, self.text[pos:end]))
        return ids


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _special_splitter(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern that cuts a prompt's text just before each special token (``<|im_start|>``,
    ``</s>``, ...) where cutting leaves its ids unchanged. A fast tokenizer takes the special
    tokens out of the text before anything else, so the text between them is encoded apart
    either way; a token that swallows the whitespace before it (``lstrip``), that matches only
    as a whole word (``single_word``: a cut would make a word boundary) or that the normaliser
    sees would not be, nor one whose probe below disagrees. None: no such token."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if not isinstance(decoder, dict):
        return None
    cut = []
    for added in decoder.values():
        token = getattr(added, "content", None)
        if (not token or not getattr(added, "special", False) or getattr(added, "lstrip", True)
                or getattr(added, "normalized", True) or getattr(added, "single_word", True)):
            continue
        left, right = "a b,\n ", f"{token}x\n y"
        try:
            if _ids(tokenizer, left + right) == _ids(tokenizer, left) + _ids(tokenizer, right):
                cut.append(token)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot take the probe: no cut there
            continue
    if not cut:
        return None
    return re.compile("(?=" + "|".join(re.escape(t) for t in sorted(cut, key=len, reverse=True)) + ")")


def _encode(tokenizer: Any, text: str) -> array:
    """The ids of a piece of the prompt's text, remembered (4 bytes an id) message by message:
    the text is cut before each special token (each message's header), so a system prompt or an
    earlier question is found again every turn even where the text around it changes (an
    answer the template re-renders, the growing text before the generation prompt)."""
    if not text:
        return array("i")
    memo = _memo(tokenizer)
    if memo.splitter is False:
        memo.splitter = _special_splitter(tokenizer)
    pieces = memo.splitter.split(text) if memo.splitter is not None else [text]
    out = array("i")
    for piece in pieces:
        if piece:
            out.extend(memo.get("e" + piece, lambda piece=piece: array("i", _ids(tokenizer, piece))))
    return out


def _prefix_keys(template: Any, dicts: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[str] | None:
    """A key for each leading run of messages (with the template and its arguments): a digest
    chained message by message, so a long history costs one pass, not one per prefix. None when
    JSON cannot spell an argument (nothing is remembered then)."""
    try:
        digest = hashlib.sha256(json.dumps([template, kwargs], sort_keys=True).encode())
        keys = [f"r{digest.hexdigest()}"]
        for d in dicts:
            digest.update(b"\0" + json.dumps(d, sort_keys=True).encode())
            keys.append(f"r{digest.hexdigest()}")
    except (TypeError, ValueError):
        return None
    return keys


def _render_before(tokenizer: Any, dicts: list[dict[str, Any]], key: str | None, kwargs: dict[str, Any]) -> str:
    """The template's text of the messages before a carried answer, remembered: a conversation
    of n answers asks for n of them every turn, n - 1 of which it asked for the turn before."""
    if key is None:
        return render_chat(tokenizer, dicts, False, **kwargs)
    return _memo(tokenizer).get(key, lambda: render_chat(tokenizer, dicts, False, **kwargs))


_RENDERS_TOOLS: dict[str, bool] = {}
_PROBE_TOOL = {"type": "function", "function": {"name": "braid_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template writes the tools it is given (TinyLlama's and ERNIE-4.5's
    ignore them: the model would never see bound tools). Rendered once per template."""
    template = getattr(tokenizer, "chat_template", None)
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True, default=str)
    if key not in _RENDERS_TOOLS:
        try:
            text = render_chat(tokenizer, [{"role": "user", "content": "x"}], True, tools=[_PROBE_TOOL])
        except ChatTemplateError:
            text = ""
        _RENDERS_TOOLS[key] = "braid_probe_tool" in text
    return _RENDERS_TOOLS[key]


def render(tokenizer: Any, messages: Sequence[BaseMessage], *, add_generation_prompt: bool = True,
           template_kwargs: dict[str, Any] | None = None,
           vocab_size: int | None = None) -> RenderedPrompt:
    """Render ``messages`` with the template and mark where each carried answer can be spliced.

    An answer is spliced only where the template wrote exactly the text its ids decode to, so
    the prompt's text never changes; elsewhere (edited answers, templates that drop ``<think>``)
    the text is re-tokenised and the cache reuses the longest common prefix. ``vocab_size``:
    the model's (its embedding rows, which may pass the tokenizer's length: a model can generate
    those ids); carried ids past it are no answer's.
    """
    kwargs = template_kwargs or {}
    dicts = [to_template_dict(m) for m in messages]
    text = render_chat(tokenizer, dicts, add_generation_prompt, **kwargs)
    prompt = RenderedPrompt(text)
    cursor = 0
    carried = [(i, ids) for i, m in enumerate(messages)
               if (ids := carried_token_ids(m, vocab_size)) is not None]
    keys = _prefix_keys(getattr(tokenizer, "chat_template", None), dicts, kwargs) if carried else None
    for i, ids in carried:
        piece = tokenizer.decode(ids, skip_special_tokens=False)
        if not piece or dicts[i]["content"] not in piece:
            continue  # the answer was edited: its ids no longer spell the message
        # start looking after the messages before this one, so a user echoing it cannot match
        try:
            before = _render_before(tokenizer, dicts[:i], keys[i] if keys else None, kwargs) if i else ""
        except ChatTemplateError:
            before = ""
        if text.startswith(before):
            cursor = max(cursor, len(before))
        start = text.find(piece, cursor)
        if start < 0:
            continue
        prompt.spans.append((start, start + len(piece), ids))
        cursor = start + len(piece)
    return prompt
