"""Tools and structured output: the grammar each ``tool_choice`` implies, and parsing the
``<tool_call>`` blocks the model writes (whole or streamed) into LangChain tool calls."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from langchain_core.messages import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.utils.function_calling import convert_to_openai_function, convert_to_openai_tool
from langchain_core.utils.json_schema import dereference_refs

from braid_engine import GuidedDecoding
from langchain_braid._thinking import CLOSE as THINK_CLOSE
from langchain_braid._thinking import OPEN as THINK_OPEN

OPEN_CALL, CLOSE_CALL = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_CHOICES = ("auto", "none", "any", "required")
_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class ToolChoiceError(ValueError):
    """``tool_choice`` names no bound tool or is not one of the accepted forms."""


class ToolSchemaError(ValueError):
    """A tool or schema that cannot become a named tool call (e.g. a JSON Schema without a
    ``title``, which is where a call's name comes from)."""


def is_json_schema(schema: Any) -> bool:
    """Whether ``schema`` is a bare JSON Schema dict rather than one of the tool forms LangChain
    converts (OpenAI tool or function, Anthropic, Bedrock), which all carry a name, or a
    provider's built-in tool (``{"type": "web_search"}``)."""
    if not isinstance(schema, dict) or {"name", "function", "toolSpec"} & schema.keys():
        return False
    kind = schema.get("type")
    return kind is None or isinstance(kind, list) or kind in _JSON_TYPES


def to_openai_tool(tool: Any, where: str, instead: str = "") -> dict[str, Any]:
    """``convert_to_openai_tool(tool)``, raising a ToolSchemaError that names ``where`` the tool
    came from and what to do (``instead``: another way out) when it cannot be converted."""
    if is_json_schema(tool) and "title" not in tool:
        raise ToolSchemaError(
            f'{where} is a JSON Schema without a "title"; a tool call needs a name: add a '
            f'top-level "title" (it names the tool){instead}.')
    not_object = ToolSchemaError(
        f"{where}: a tool's arguments must be a JSON object schema (a call's arguments are an "
        f"object); put the value in a property of an object{instead}.")
    if is_json_schema(tool) and tool.get("type", "object") != "object":
        raise not_object
    try:
        formatted = convert_to_openai_tool(tool)
    except ValueError as e:
        raise ToolSchemaError(f"{where} cannot be a tool: {e}") from e
    if formatted.get("type") == "function" and "name" in formatted:  # the Responses API's form
        formatted = {"type": "function", "function": convert_to_openai_function(formatted)}
    if "function" in formatted:
        params = formatted["function"].get("parameters")
        if params is not None and (not isinstance(params, dict) or params.get("type", "object") != "object"):
            raise not_object
        return formatted
    raise ToolSchemaError(
        f"{where} ({{'type': {formatted.get('type')!r}, ...}}) is not a function tool: a "
        "provider's built-in tool runs only on its servers; bind a LangChain tool or function "
        "that does the work instead (ChatBraid binds functions, LangChain tools, pydantic "
        "models, TypedDicts and OpenAI or Anthropic function dicts).")


def format_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """``tools`` (as ``bind_tools`` takes them) as OpenAI function tools, the form the chat
    template renders and the grammar constrains. A call names its tool, so two tools of one name
    must be one tool (the same arguments: a class and its JSON schema): the later is dropped."""
    if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Iterable):
        raise ToolSchemaError(f"tools must be a list of tools, got {type(tools).__name__}; pass [tool, ...].")
    formatted: list[dict[str, Any]] = []
    first: dict[str, tuple[int, dict[str, Any]]] = {}  # a name's first tool: its index, its function
    for i, tool in enumerate(tools):
        one = to_openai_tool(tool, f"tools[{i}]")
        fn = one["function"]
        if fn["name"] not in first:
            first[fn["name"]] = i, fn
            formatted.append(one)
            continue
        j, same = first[fn["name"]]
        if _arguments(same) != _arguments(fn):
            raise ToolSchemaError(f"tools[{i}] is named {fn['name']!r} like tools[{j}] but takes other arguments; "
                                  "tool names must be unique (a call names the tool it is for): rename one.")
    return formatted


def _arguments(fn: dict[str, Any]) -> Any:
    """A function's argument schema as two forms of one tool compare equal: references resolved
    (a pydantic class's tool has them inlined, its raw schema keeps $defs), no titles."""
    params = fn.get("parameters")
    if isinstance(params, dict) and "$defs" in params:
        params = {k: v for k, v in dereference_refs(params).items() if k != "$defs"}
    return _untitled(params)


def _untitled(schema: Any) -> Any:
    """A JSON Schema without its "title" annotations (a pydantic class's schema has them, the
    tool LangChain makes of the class not), property names kept."""
    if isinstance(schema, list):
        return [_untitled(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    return {k: ({p: _untitled(v) for p, v in v.items()} if k == "properties" and isinstance(v, dict) else _untitled(v))
            for k, v in schema.items() if not (k == "title" and isinstance(v, str))}


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str:
    """``"auto"``, ``"none"``, ``"any"`` or a tool name, from LangChain's accepted forms
    (``None`` and ``False`` are no choice: ``"auto"``)."""
    if tool_choice is None or tool_choice is False:
        return "auto"
    if tool_choice is True:
        if len(names) != 1:
            raise ToolChoiceError("tool_choice=True needs exactly one bound tool; pass its name.")
        return names[0]
    given = tool_choice
    if isinstance(tool_choice, dict):  # OpenAI {"type": "function", "function": {"name": …}},
        # Anthropic {"type": "tool", "name": …} or {"type": "any" / "auto"}
        function = tool_choice.get("function")
        tool_choice = ((function.get("name") if isinstance(function, dict) else None) or tool_choice.get("name")
                       or tool_choice.get("type"))
    if tool_choice in _CHOICES:
        return "any" if tool_choice == "required" else tool_choice
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise ToolChoiceError(
        f"tool_choice={given!r} is neither one of {list(_CHOICES)} nor a bound tool "
        f"({', '.join(names) or 'none bound'}); pass one of those.")


def tool_names(tools: Sequence[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def _call_tag(tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    # the exact text the chat template renders a call as, so answers splice back into the cache
    return {"type": "tag", "begin": f'{OPEN_CALL}\n{{"name": {json.dumps(fn["name"])}, "arguments": ',
            "content": {"type": "json_schema", "json_schema": params}, "end": f"}}\n{CLOSE_CALL}"}


def tool_grammar(tools: Sequence[dict[str, Any]], choice: str,
                 answer: dict[str, Any] | None = None, *, parallel: bool = True,
                 reasoning: Literal["open", "may"] | None = None) -> GuidedDecoding:
    """The constraint for ``choice`` (normalised): auto lets the model write text and constrains
    each call it starts; any / a name force calls from the first token; none forbids calls.
    ``answer`` (a structural-tag format, e.g. a response format's JSON schema) constrains an
    answer that is not a call: auto is then calls or that answer, none that answer.
    ``parallel=False`` ends the answer after its first call (a named choice always does).

    ``reasoning``: the answer starts inside a ``<think>`` block the prompt opened (``"open"``,
    whatever the choice: a template may open one even where ``enable_thinking=False`` asks it not
    to) or, with a free choice (auto and none without ``answer``), may start with one (``"may"``);
    the block is free text up to ``</think>``, constrained after it, so a call the model quotes
    while it reasons is reasoning (as the parsers read it): it neither counts as the one call
    ``parallel=False`` allows nor is held to a tool's schema."""
    single = not parallel
    if answer is not None and choice in ("auto", "none"):
        calls = {"type": "tags_with_separator", "separator": "\n", "at_least_one": True,
                 "stop_after_first": single, "tags": [_call_tag(t) for t in tools]}
        fmt: dict[str, Any] = answer if choice == "none" else {"type": "or", "elements": [calls, answer]}
    elif choice == "none":
        fmt = {"type": "any_text", "excludes": [OPEN_CALL]}
    elif choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [OPEN_CALL], "stop_after_first": single,
               "tags": [_call_tag(t) for t in tools]}
    else:
        chosen = [t for t in tools if choice == "any" or t["function"]["name"] == choice]
        fmt = {"type": "tags_with_separator", "separator": "\n", "at_least_one": True,
               "stop_after_first": single or choice != "any", "tags": [_call_tag(t) for t in chosen]}
    if reasoning == "open" or reasoning == "may" and answer is None and choice in ("auto", "none"):
        fmt = after_reasoning(fmt, opened=reasoning == "open")
    return GuidedDecoding(structural_tag={"type": "structural_tag", "format": fmt})


def after_reasoning(fmt: dict[str, Any], *, opened: bool) -> dict[str, Any]:
    """A structural-tag format that applies after a ``<think>`` block, free text up to
    ``</think>``: one the prompt opened (``opened``), or one the answer may open first."""
    block = {"type": "tag", "begin": "" if opened else THINK_OPEN, "content": {"type": "any_text"},
             "end": THINK_CLOSE}
    # the blank lines a model writes after the block (Qwen3: "</think>\n\n"), which a forced call
    # or a JSON answer would not take, and before one it opens (the parsers read past them too)
    blank = {"type": "regex", "pattern": r"\s*"}
    if opened:
        return {"type": "sequence", "elements": [block, blank, fmt]}
    return {"type": "or", "elements": [{"type": "sequence", "elements": [blank, block, blank, fmt]}, fmt]}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_call(body: str, names: Sequence[str], call_id: str) -> ToolCall | InvalidToolCall:
    """One ``<tool_call>`` body as a tool call, or an invalid one saying what is wrong."""
    name = None
    try:
        value = json.loads(body, strict=False)
        if not isinstance(value, dict):
            raise ValueError("the call is not a JSON object")
        name, args = value.get("name"), value.get("arguments", {})
        if name not in names:
            raise ValueError(f"no bound tool is named {name!r}")
        if not isinstance(args, dict):
            raise ValueError("arguments is not a JSON object")
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return InvalidToolCall(type="invalid_tool_call", name=name if isinstance(name, str) else None,
                               args=body, id=call_id, error=str(e))
    return ToolCall(type="tool_call", name=name, args=args, id=call_id)


def parse_tool_calls(text: str, names: Sequence[str], limit: int | None = None,
                     ) -> tuple[str, list[ToolCall], list[InvalidToolCall]]:
    """``(content, tool_calls, invalid_tool_calls)`` of a whole answer; with ``limit``, only
    its first ``limit`` ``<tool_call>`` blocks are read (``parallel_tool_calls=False``: 1).

    Example:
        >>> parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>', ["f"])[1]
        [{'name': 'f', 'args': {'x': 1}, 'id': 'call_…', 'type': 'tool_call'}]
    """
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    cuts, content, last = _Content(), [], 0
    for n, (start, end, body, closed) in enumerate(_call_spans(text)):
        # the spaces before a call and the newlines after it go with it, as the stream parser cuts
        content.append(cuts.cut(text[last:start], after_call=n > 0, before_call=True))
        last = end
        if limit is not None and n >= limit:
            continue
        parsed = parse_call(body.strip(), names, _call_id())
        if closed and parsed["type"] == "tool_call":
            calls.append(parsed)
        else:
            if not closed:  # named as the stream names it: once its header is whole
                header = _HEADER.match(body)
                # its args are the arguments text, as LangChain's invalid calls (and the stream's) hold them
                parsed = InvalidToolCall(type="invalid_tool_call", name=json.loads(header.group(1)) if header else None,
                                         args=(body[header.end():] if header else body).strip(), id=parsed["id"],
                                         error="the call was cut off before </tool_call>")
            invalid.append(parsed)
    # no strip beyond the calls' own cuts: an answer without a call is its text as generated,
    # which the next turn's prompt must hold for its carried ids to be reused
    content.append(cuts.cut(text[last:], after_call=last > 0, before_call=False))
    return "".join(content), calls, invalid


class _Content:
    """An answer's text with its calls cut out, as the whole parse and the stream parser cut
    it: the spaces before a call and the newlines after it go with the call, and two pieces of
    text that a call stood between keep one separator (a newline where one was cut, else a
    space) unless the later one starts with its own."""

    def __init__(self) -> None:
        self.gap = ""  # whitespace cut since the last text handed out
        self.wrote = False

    def text(self, text: str) -> str:
        """``text`` to hand out next, its separator first."""
        if not text:
            return text
        if self.wrote and self.gap and not text[0].isspace():
            text = ("\n" if "\n" in self.gap else " ") + text
        self.wrote, self.gap = True, ""
        return text

    def cut(self, piece: str, *, after_call: bool, before_call: bool) -> str:
        """A piece of text between calls (after one, before one): what of it goes out."""
        if after_call:
            piece = self.lead(piece)
        if not before_call:
            return self.text(piece)
        kept = piece.rstrip()
        out = self.text(kept)
        self.gap += piece[len(kept):]
        return out

    def lead(self, text: str) -> str:
        """``text`` after a call, its leading newlines cut."""
        kept = text.lstrip("\n")
        self.gap += text[:len(text) - len(kept)]
        return kept


def _call_spans(text: str):
    """``(start, end, body, closed)`` of each ``<tool_call>`` block in ``text``: from its opening
    tag to past its closing tag, or to the end where it was cut off. A block ends at the first
    closing tag outside a JSON string: a string argument may hold the tag as text."""
    at = 0
    while (start := text.find(OPEN_CALL, at)) >= 0:
        begin = start + len(OPEN_CALL)
        close = _scan(text, begin, _OUTSIDE)[0]
        if close < 0:
            yield start, len(text), text[begin:], False
            return
        at = close + len(CLOSE_CALL)
        yield start, at, text[begin:close], True


# where a scan of a call body stands: (next index to read, inside a JSON string, after a backslash)
_OUTSIDE = (0, False, False)


def _scan(text: str, at: int, state: tuple[int, bool, bool]) -> tuple[int, tuple[int, bool, bool]]:
    """Read a call body from ``max(at, state[0])`` for its closing tag outside JSON strings:
    ``(the tag's index or -1, the state to go on from)``. A possible tag cut short by the end
    of ``text`` is left unread, for the next delta to decide."""
    i, in_string, escaped = max(at, state[0]), state[1], state[2]
    n = len(text)
    while i < n:
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "<":
            if text.startswith(CLOSE_CALL, i):
                return i, (i, False, False)
            if n - i < len(CLOSE_CALL) and CLOSE_CALL.startswith(text[i:]):
                break
        i += 1
    return -1, (i, in_string, escaped)


class ToolCallStreamParser:
    """Incremental ``parse_tool_calls``: feed answer deltas, get ``(content, tool_call_chunks)``.

    A call's name goes out as soon as its header is complete, then its arguments as they are
    generated; the wrapper's closing brace and tag are held back until they are unambiguous.
    With ``limit``, calls after the first ``limit`` give no chunks (as ``parse_tool_calls``).

    Example:
        >>> p = ToolCallStreamParser(["f"])
        >>> p.feed('<tool_call>\\n{"name": "f", "arguments": {"x"')[1][0]["name"]
        'f'
    """

    def __init__(self, names: Sequence[str], limit: int | None = None) -> None:
        self.names = list(names)
        self.limit = limit
        self.buffer = ""
        self.in_call = False
        self.header_done = False
        self.sent = 0  # characters of the current call's arguments already emitted
        self.args_sent = ""  # those characters
        self.index = -1
        self.call_id = ""
        self.named = False  # the current call names a bound tool
        self.scan = _OUTSIDE  # how far the current call's body has been read for its closing tag
        self.after_call = False
        self.content = _Content()

    def feed(self, delta: str) -> tuple[str, list[ToolCallChunk]]:
        self.buffer += delta
        content: list[str] = []
        chunks: list[ToolCallChunk] = []
        while True:
            if not self.in_call:
                if self.after_call:  # the newlines after a call go with it, in this delta or later ones
                    self.buffer = self.content.lead(self.buffer)
                    self.after_call = not self.buffer
                start = self.buffer.find(OPEN_CALL)
                if start < 0:
                    keep = _partial_suffix(self.buffer, OPEN_CALL)
                    head = self.buffer[:len(self.buffer) - keep]
                    keep += len(head) - len(head.rstrip())  # spaces before a call are dropped
                    text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                    content.append(self.content.text(text))
                    break
                content.append(self.content.cut(self.buffer[:start], after_call=False, before_call=True))
                self.buffer = self.buffer[start + len(OPEN_CALL):]
                self.in_call, self.header_done, self.sent, self.args_sent = True, False, 0, ""
                self.scan = _OUTSIDE
                self.index += 1
                self.call_id = _call_id()
                continue
            end, self.scan = _scan(self.buffer, 0, self.scan)
            body = self.buffer if end < 0 else self.buffer[:end]
            if not self.header_done:
                header = _HEADER.match(body)
                if header is not None:
                    name = json.loads(header.group(1))
                    chunks.append(ToolCallChunk(type="tool_call_chunk", name=name, args="",
                                                id=self.call_id, index=self.index))
                    self.buffer = self.buffer[header.end():]
                    # the header ends outside any string: the scan goes on from the same text
                    at = self.scan[0] - header.end()
                    self.scan = (at, *self.scan[1:]) if at >= 0 else _OUTSIDE
                    self.header_done, self.named = True, name in self.names
                    continue
                if end < 0:
                    break
                # closed in another form than the grammar's header: read whole, as parse_tool_calls does
                call = parse_call(body.strip(), self.names, self.call_id)
                valid = call["type"] == "tool_call"
                chunks.append(ToolCallChunk(type="tool_call_chunk", name=call["name"] if valid else None,
                                            args=json.dumps(call["args"]) if valid else _unrepairable(body.strip()),
                                            id=self.call_id, index=self.index))
            else:
                args = _args_so_far(body, closed=end >= 0)
                if len(args) > self.sent:
                    chunks.append(ToolCallChunk(type="tool_call_chunk", name=None,
                                                args=args[self.sent:], id=None, index=self.index))
                    self.sent, self.args_sent = len(args), args
                if end < 0:
                    break
                if not (self.named and _is_object(self.args_sent)):  # invalid, as parse_tool_calls says
                    chunks.append(ToolCallChunk(type="tool_call_chunk", name=None, id=None, index=self.index,
                                                args=_unrepairable_suffix(self.args_sent)))
            self.buffer = self.buffer[end + len(CLOSE_CALL):]
            self.in_call, self.after_call = False, True
        return "".join(content), self._allowed(chunks)

    def finish(self) -> tuple[str, list[ToolCallChunk]]:
        """Flush at the end: held text is content. A call cut off (after its name or inside its
        header) gets a last args chunk that no JSON repair can close, so the merged message
        lists it under ``invalid_tool_calls`` (as ``parse_tool_calls`` does) instead of running
        a tool, maybe one named "", with partial arguments."""
        rest, self.buffer = self.buffer, ""
        if self.in_call:
            if self.header_done:
                return "", self._allowed([ToolCallChunk(
                    type="tool_call_chunk", name=None, id=None, index=self.index,
                    args=_unrepairable_suffix(self.args_sent))])
            return "", self._allowed([ToolCallChunk(type="tool_call_chunk", name=None, args=_unrepairable(rest.strip()),
                                                    id=self.call_id, index=self.index)])
        return self.content.text(rest), []  # held spaces no call followed: the answer's own

    def _allowed(self, chunks: list[ToolCallChunk]) -> list[ToolCallChunk]:
        return chunks if self.limit is None else [c for c in chunks if c["index"] < self.limit]


def one_chunk_per_call(chunks: list[ToolCallChunk]) -> list[ToolCallChunk]:
    """The tool-call chunks of one message chunk, those of the same call joined in order. A
    message chunk parses each of its tool-call chunks on its own (LangChain merges by index only
    across message chunks, as ``+`` does): a call's header and the rest of it in two chunks of one
    message chunk would read as a call with no arguments beside a nameless invalid one."""
    merged: dict[int, ToolCallChunk] = {}
    for chunk in chunks:
        into = merged.get(chunk["index"])
        if into is None:
            merged[chunk["index"]] = ToolCallChunk(**chunk)
        else:
            into["args"] = (into["args"] or "") + (chunk["args"] or "")
            into["name"] = into["name"] or chunk["name"]
            into["id"] = into["id"] or chunk["id"]
    return list(merged.values())


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


def _args_so_far(body: str, *, closed: bool) -> str:
    """The arguments JSON in a call body, minus what may still be the wrapper's ``}`` / tag."""
    if not closed:
        body = body[:len(body) - _partial_suffix(body, CLOSE_CALL)]
    stripped = body.strip()
    return stripped[:-1] if stripped.endswith("}") else stripped


def _is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, strict=False), dict)
    except ValueError:
        return False


def _unrepairable(text: str) -> str:
    """``text`` as a call's whole args that LangChain's merge cannot repair into a valid call."""
    return text + _unrepairable_suffix(text)


def _unrepairable_suffix(args: str) -> str:
    """Text that, appended to partial JSON ``args``, makes LangChain's partial-JSON repair fail:
    close an open string, then a bracket that matches nothing open."""
    in_string = escaped = False
    stack: list[str] = []
    for ch in args:
        if in_string:
            if ch == "\\" and not escaped:
                escaped = True
                continue
            if ch == '"' and not escaped:
                in_string = False
            escaped = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    suffix = ('n"' if escaped else '"') if in_string else ""
    return suffix + ("}" if stack and stack[-1] == "]" else "]")
