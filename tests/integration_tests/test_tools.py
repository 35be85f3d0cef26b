"""Tool calling and structured output on a random tiny checkpoint: grammar-constrained
decoding makes even noise-driven sampling produce calls and objects that match their schemas."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel
from typing_extensions import TypedDict

from langchain_braid import ChatBraid, ToolSchemaError
from langchain_braid._tools import ToolCallStreamParser, ToolChoiceError, parse_tool_calls


class Forecast(BaseModel):
    """Forecast for a number of days."""

    days: int
    metric: bool
    unit: Literal["celsius", "fahrenheit"]


class Flags(TypedDict):
    """Two switches."""

    on: bool
    level: int


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def toggle(enabled: bool) -> str:
    """Toggle a switch."""
    return "ok"


DICT_TOOL = {"type": "function", "function": {
    "name": "pick", "description": "Pick a colour.",
    "parameters": {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}},
                   "required": ["colour"]}}}


@pytest.fixture
def chat(tiny_model: str) -> ChatBraid:
    return ChatBraid(model=tiny_model, device="cpu", temperature=0.7, max_tokens=96)


def check_args(name: str, args: dict) -> None:
    if name == "Forecast":
        Forecast.model_validate(args)
        assert type(args["days"]) is int and type(args["metric"]) is bool
    elif name == "add":
        assert set(args) == {"a", "b"} and all(type(v) is int for v in args.values())
    elif name == "toggle":
        assert set(args) == {"enabled"} and type(args["enabled"]) is bool
    else:
        assert name == "pick" and args["colour"] in ("red", "green")


@pytest.mark.parametrize("choice", ["any", "required", "add", "Forecast", "pick", "toggle"])
def test_forced_tool_choice_gives_calls_that_match_their_schema(chat, choice):
    bound = chat.bind_tools([Forecast, add, toggle, DICT_TOOL], tool_choice=choice)
    for seed in (1, 2):
        msg = bound.invoke("What is the weather in Paris?", seed=seed, max_tokens=256)
        assert msg.tool_calls and not msg.invalid_tool_calls
        assert msg.response_metadata["finish_reason"] == "stop"
        for call in msg.tool_calls:
            assert choice in ("any", "required") or call["name"] == choice
            check_args(call["name"], call["args"])
            assert call["id"].startswith("call_")


def test_bind_tools_accepts_strict_as_with_structured_output_does(chat):
    """bind_tools(tools, strict=True), as written for OpenAI, failed at invoke with 'unknown
    call options ['strict']'; calls are always schema-strict here, so it is accepted."""
    msg = chat.bind_tools([add], tool_choice="add", strict=True).invoke("Add 2 and 3.", seed=1)
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "add"


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
TWO_CALLS = "Add 2 and 3, and toggle."


@pytest.mark.parametrize("choice", ["any", "auto"])
def test_parallel_tool_calls_false_gives_at_most_one_call(chat, choice):
    """bind_tools(tools, parallel_tool_calls=False), OpenAI's option, was refused at invoke as
    an unknown call option. The grammar now ends the answer after its first call: with these
    seeds the unlimited grammar writes two calls, the limited one the same first call alone."""
    free = chat.bind_tools([add, toggle], tool_choice=choice)
    single = chat.bind_tools([add, toggle], tool_choice=choice, parallel_tool_calls=False)
    for seed in (3, 6):
        many = free.invoke(TWO_CALLS, seed=seed, max_tokens=256)
        assert len(many.tool_calls) == 2, seed
        one = single.invoke(TWO_CALLS, seed=seed, max_tokens=256)
        assert one.response_metadata["finish_reason"] == "stop" and not one.invalid_tool_calls
        assert [(c["name"], c["args"]) for c in one.tool_calls] == [
            (many.tool_calls[0]["name"], many.tool_calls[0]["args"])]
        # as a call option too, and on the streaming path
        assert [c["args"] for c in free.invoke(TWO_CALLS, seed=seed, max_tokens=256,
                                               parallel_tool_calls=False).tool_calls] == [
            one.tool_calls[0]["args"]]
        merged = None
        for chunk in single.stream(TWO_CALLS, seed=seed, max_tokens=256):
            merged = chunk if merged is None else merged + chunk
        assert [c["args"] for c in merged.tool_calls] == [one.tool_calls[0]["args"]]
    same = chat.bind_tools([add, toggle], tool_choice=choice, parallel_tool_calls=True)
    assert len(same.invoke(TWO_CALLS, seed=3, max_tokens=256).tool_calls) == 2


@pytest.mark.parametrize("choice", ["any", "auto", "auto or an answer"])
def test_parallel_tool_calls_false_masks_a_second_call(chat, choice):
    """The limit is in the grammar: after one complete call only the end of the answer is
    allowed, where the unlimited grammar goes on to a second call (also where a response
    format stands beside the tools, as create_agent binds them)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from langchain_braid._tools import tool_grammar

    runtime = chat.llm.engine.grammar()
    tools = [convert_to_openai_tool(t) for t in (add, toggle)]
    answer = {"type": "json_schema", "json_schema": UNTITLED} if choice == "auto or an answer" else None
    lead = "Sure. " if choice == "auto" else ""

    def grammar(parallel: bool):
        return tool_grammar(tools, choice.split()[0], answer, parallel=parallel)

    for parallel in (True, False):
        matcher = runtime.matcher(grammar(parallel))
        assert matcher.accept_string(lead + CALL)
        assert matcher.accept_string("\n" + CALL) is parallel
    single = runtime.matcher(grammar(False))
    assert single.accept_string(lead + CALL) and single.is_completed()
    mask = runtime.fill([single])
    allowed = {t for t in range(runtime.vocab_size) if mask[0, t // 32] >> (t % 32) & 1}
    assert allowed and allowed <= set(chat.llm.engine.eos_token_ids)


@pytest.mark.parametrize("reasoning", ["may", "open"])
def test_a_call_quoted_in_the_reasoning_is_free_text_and_not_the_one_call(chat, reasoning):
    """Qwen3 quotes the call it plans inside <think>: the grammar starts after the block (one the
    prompt opened, or one the answer opens), so the quote neither ends an answer that allows one
    call nor is held to a schema; after the block calls are constrained as before, and
    tool_choice="none" still forbids them there."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from langchain_braid._tools import tool_grammar

    runtime = chat.llm.engine.grammar()
    tools = [convert_to_openai_tool(t) for t in (add, toggle)]
    start = "\n<think>\n" if reasoning == "may" else "\n"  # (the parsers read past blank lines before it)
    thought = start + "I will write " + CALL + ', or <tool_call>{"name": "add", "arguments": {"a": "x"}}? No.\n</think>\n\n'
    for parallel in (True, False):
        matcher = runtime.matcher(tool_grammar(tools, "auto", parallel=parallel, reasoning=reasoning))
        assert matcher.accept_string(thought + "Sure. " + CALL)
        assert matcher.accept_string("\n" + CALL) is parallel
        bad = runtime.matcher(tool_grammar(tools, "auto", parallel=parallel, reasoning=reasoning))
        assert bad.accept_string(thought + "Sure. ") and not bad.accept_string(
            '<tool_call>\n{"name": "add", "arguments": {"a": "x"')
    none = runtime.matcher(tool_grammar(tools, "none", reasoning=reasoning))
    assert none.accept_string(thought + "No call: ") and not none.accept_string(CALL)
    if reasoning == "may":  # an answer that does not reason is constrained from its first token
        direct = runtime.matcher(tool_grammar(tools, "auto", parallel=False, reasoning=reasoning))
        assert direct.accept_string("Sure. " + CALL) and direct.is_completed()


def test_a_template_that_always_opens_think_still_gets_its_forced_call_and_json(tiny_model, tmp_path):
    """A template may open <think> in every prompt, enable_thinking=False or not (as Qwen3's
    thinking-only models do): a forced call or structured output then follows the model's free
    reasoning, where the grammar forced it from the first token inside the block (the parser read
    it all as reasoning: no call, "not JSON")."""
    import shutil

    path = tmp_path / "always-think"
    shutil.copytree(tiny_model, path)
    template = path / "chat_template.jinja"
    text = template.read_text()
    closed = "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif -%}"
    assert closed in text
    template.write_text(text.replace(closed, "<think>\n"))
    chat = ChatBraid(model=str(path), device="cpu", temperature=1.0, max_tokens=300)
    runtime = chat.llm.engine.grammar()
    bound = chat.bind_tools([add], tool_choice="add")
    _, ids, params, opened, _, _ = bound.bound._prepare([HumanMessage("Add 2 and 3")], None, bound.kwargs)
    assert opened and chat.tokenizer.decode(ids).rstrip().endswith("<think>")
    matcher = runtime.matcher(params.guided)
    assert matcher.accept_string("Two numbers, <tool_call> to add them.</think>\n\n" + CALL)
    assert matcher.is_completed()
    refused = runtime.matcher(params.guided)  # after the block, the call is forced as before
    assert refused.accept_string("Hmm.</think>\n\n") and not refused.accept_string("Sure. ")
    answer = {"type": "json_schema", "json_schema": {"name": "Pair", "schema": UNTITLED}}
    _, _, params, opened, _, _ = chat._prepare([HumanMessage("A pair")], None, {"response_format": answer})
    assert opened
    matcher = runtime.matcher(params.guided)
    assert matcher.accept_string('Two numbers.</think>\n{"days": 3, "unit": "celsius"}') and matcher.is_completed()


def test_parallel_tool_calls_must_be_a_bool(chat):
    with pytest.raises(TypeError, match="parallel_tool_calls.*True, False or None"):
        chat.bind_tools([add], parallel_tool_calls="no")
    with pytest.raises(TypeError, match="parallel_tool_calls.*True, False or None"):
        chat.bind_tools([add]).invoke("hi", parallel_tool_calls=0, max_tokens=2)


def test_parse_keeps_only_the_first_calls_up_to_a_limit():
    text = "Hi " + CALL + "\n" + CALL.replace("1", "5") + " bye"
    content, calls, invalid = parse_tool_calls(text, ["add"], limit=1)
    assert content == "Hi bye" and invalid == []
    assert [c["args"] for c in calls] == [{"a": 1, "b": 2}]
    for step in (1, 5, len(text)):
        parser = ToolCallStreamParser(["add"], limit=1)
        chunks, content = [], ""
        for i in range(0, len(text), step):
            c, more = parser.feed(text[i:i + step])
            content, chunks = content + c, chunks + more
        tail, more = parser.finish()
        content, chunks = content + tail, chunks + more
        assert {c["index"] for c in chunks} == {0}, step
        assert "".join(c["args"] for c in chunks) == '{"a": 1, "b": 2}' and content == "Hi bye"


def test_responses_api_function_tools_and_provider_built_in_tools(chat):
    """LangChain passes OpenAI's Responses-API tools through unchanged, so a flat {"type":
    "function", "name": …, "parameters": …} and a built-in such as {"type": "web_search"} both
    failed with KeyError: 'function'. The flat form is now the same tool as the nested one (also
    where tools are counted or pinned); a built-in, which only its provider runs, is a
    ToolSchemaError that says what to bind instead."""
    flat = {"type": "function", **DICT_TOOL["function"]}
    msg = chat.bind_tools([flat], tool_choice="pick").invoke("Pick one.", seed=1)
    nested = chat.bind_tools([DICT_TOOL], tool_choice="pick").invoke("Pick one.", seed=1)
    assert msg.response_metadata["token_ids"] == nested.response_metadata["token_ids"]
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [
        (c["name"], c["args"]) for c in nested.tool_calls]
    question = [HumanMessage("Pick one.")]
    assert chat.get_num_tokens_from_messages(question, tools=[flat]) == \
        chat.get_num_tokens_from_messages(question, tools=[DICT_TOOL])
    with pytest.raises(ToolSchemaError, match=r"tools\[1\].*'web_search'.*bind a LangChain tool"):
        chat.bind_tools([add, {"type": "web_search"}])
    with pytest.raises(ToolSchemaError, match=r"tools\[0\].*'code_interpreter'"):
        chat.get_num_tokens_from_messages(question, tools=[{"type": "code_interpreter"}])


def test_tools_given_per_call_take_the_forms_bind_tools_takes(chat):
    """tools= is a call option (as with .bind(tools=...)), but only ready OpenAI dicts worked
    there: a LangChain tool or the Responses-API form failed with KeyError: 'function'."""
    flat = {"type": "function", **DICT_TOOL["function"]}
    bound = chat.bind_tools([add, DICT_TOOL], tool_choice="any").invoke("Pick one.", seed=2)
    for tools in ([add, flat], [add, DICT_TOOL]):
        msg = chat.invoke("Pick one.", tools=tools, tool_choice="any", seed=2)
        assert msg.response_metadata["token_ids"] == bound.response_metadata["token_ids"]
        assert [c["args"] for c in msg.tool_calls] == [c["args"] for c in bound.tool_calls]
    with pytest.raises(ToolSchemaError, match=r"tools\[0\].*'web_search'"):
        chat.invoke("Pick one.", tools=[{"type": "web_search"}], max_tokens=2)


def test_tool_choice_none_never_calls(chat):
    msg = chat.bind_tools([add], tool_choice="none").invoke("Add 2 and 3.", seed=3, max_tokens=24)
    assert msg.tool_calls == [] and "<tool_call>" not in msg.content


def test_bad_tool_choice_is_a_clear_error(chat):
    with pytest.raises(ToolChoiceError, match="neither one of"):
        chat.bind_tools([add], tool_choice="subtract")


def test_tool_choice_dicts_of_each_provider_form():
    """Anthropic's {"type": "any"} / {"type": "auto"} were read as tool_choice=None and refused
    with a message naming None; a dict naming nothing now says which dict it was."""
    from langchain_braid._tools import normalize_tool_choice

    names = ["add", "pick"]
    assert normalize_tool_choice({"type": "function", "function": {"name": "pick"}}, names) == "pick"
    assert normalize_tool_choice({"type": "tool", "name": "add"}, names) == "add"
    assert normalize_tool_choice({"type": "any"}, names) == "any"
    assert normalize_tool_choice({"type": "auto"}, names) == "auto"
    with pytest.raises(ToolChoiceError, match="'type': 'function'"):
        normalize_tool_choice({"type": "function"}, names)


def test_tool_lists_that_cannot_be_bound_are_refused_by_what_is_wrong(chat):
    """Found by review: two tools of one name were both bound and the grammar gave calls of that
    name either tool's arguments (a tool runner would hand one tool the other's); a tool whose
    arguments are not a JSON object was bound and every forced call came back invalid (or, as a
    schema, returned {}); None for the tool list, a non-dict function in a tool_choice dict and a
    json_schema response_format that is not a dict failed untyped."""
    from langchain_braid._tools import normalize_tool_choice

    def f(a: bool) -> bool:
        """f."""
        return a

    other = {"type": "function", "function": {"name": "f", "description": "another f",
                                              "parameters": {"type": "object", "properties": {"b": {"type": "boolean"}}}}}
    with pytest.raises(ToolSchemaError, match=r"tools\[1\] is named 'f' like tools\[0\] but takes other.*unique"):
        chat.bind_tools([f, other])
    # one tool given twice (a function and its OpenAI form, as LangChain's standard tests bind a
    # class and its schema) is one tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    assert chat.bind_tools([f, convert_to_openai_tool(f)]).kwargs["tools"] == chat.bind_tools([f]).kwargs["tools"]
    # also a class with nested models and enums beside its raw schema ($defs and $ref against inlined),
    # and tools given as any iterable
    from enum import Enum

    class Unit(str, Enum):
        c = "c"
        f = "f"

    class Loc(BaseModel):
        city: str

    class GetWeather(BaseModel):
        """Get the weather."""

        loc: Loc
        units: list[Unit]

    once = chat.bind_tools([GetWeather]).kwargs["tools"]
    assert chat.bind_tools([GetWeather, GetWeather.model_json_schema()]).kwargs["tools"] == once
    assert chat.bind_tools({"w": GetWeather}.values()).kwargs["tools"] == once
    string_args = {"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}
    with pytest.raises(ToolSchemaError, match=r"tools\[0\].*arguments must be a JSON object"):
        chat.bind_tools([string_args], tool_choice="any")
    with pytest.raises(ToolSchemaError, match='arguments must be a JSON object.*method="json_schema"'):
        chat.with_structured_output({"title": "s", "type": "string"}, method="function_calling")
    with pytest.raises(ToolSchemaError, match="a list of tools"):
        chat.bind_tools(None)
    with pytest.raises(ToolChoiceError, match="neither one of"):
        normalize_tool_choice({"function": "f"}, ["f"])
    with pytest.raises(ValueError, match="response_format="):
        chat.invoke("hi", response_format={"type": "json_schema", "json_schema": "x"}, max_tokens=2)
    assert chat.invoke("hi", max_tokens=2).content is not None  # still serving


def test_stop_strings_do_not_cut_an_answer_the_grammar_writes(chat):
    """Found by review: with stop strings (the model's or the call's), a forced call ended at the
    first newline of its tag (an invalid call named None) and structured output at the first quote
    (a bare JSONDecodeError). Stop strings end free text; an answer a grammar writes whole
    (forced calls, a response format) ends where the grammar ends."""
    stopping = chat.model_copy(update={"stop": ["\n"]})
    whole = 0
    for seed in range(4):
        msg = stopping.bind_tools([add], tool_choice="add").invoke("Add 2 and 3.", seed=seed)
        if msg.response_metadata["finish_reason"] == "length":
            continue  # this random model writes some integers past max_tokens
        assert msg.invalid_tool_calls == [] and [c["name"] for c in msg.tool_calls] == ["add"]
        check_args("add", msg.tool_calls[0]["args"])
        whole += 1
    assert whole >= 2
    forecast = chat.with_structured_output(Forecast).invoke("Forecast", seed=7, stop=['"', "}"])
    assert forecast == chat.with_structured_output(Forecast).invoke("Forecast", seed=7)
    # free text still stops at them
    free = chat.invoke("Say something.", seed=1, max_tokens=40, stop=["e"])
    assert "e" not in free.content


def test_tool_choice_false_is_no_choice(chat):
    """ChatOpenAI and others read tool_choice=False as no choice, like None; it was refused
    as neither a choice nor a tool. It is now the default, "auto"."""
    from langchain_braid._tools import normalize_tool_choice

    assert normalize_tool_choice(False, ["add"]) == "auto"
    default = chat.bind_tools([add, toggle]).invoke(TWO_CALLS, seed=3, max_tokens=256)
    off = chat.bind_tools([add, toggle], tool_choice=False).invoke(TWO_CALLS, seed=3, max_tokens=256)
    assert off.content == default.content and len(off.tool_calls) == 2
    assert [(c["name"], c["args"]) for c in off.tool_calls] == [
        (c["name"], c["args"]) for c in default.tool_calls]


def test_streaming_yields_call_chunks_as_arguments_are_generated(chat):
    bound = chat.bind_tools([Forecast], tool_choice="Forecast")
    chunks = list(bound.stream("Forecast please", seed=5))
    with_args = [c for c in chunks if c.tool_call_chunks and c.tool_call_chunks[0]["args"]]
    assert len(with_args) >= 3  # arguments arrive over several tokens, not at the end
    assert chunks[0].tool_call_chunks == [] or chunks[0].tool_call_chunks[0]["name"] == "Forecast"
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert len(full.tool_calls) == 1 and full.tool_calls[0]["name"] == "Forecast"
    check_args("Forecast", full.tool_calls[0]["args"])
    assert full.tool_calls[0]["args"] == bound.invoke("Forecast please", seed=5).tool_calls[0]["args"]


@pytest.mark.parametrize("schema", [Forecast, Flags, Forecast.model_json_schema()])
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_validates(chat, schema, method):
    structured = chat.with_structured_output(schema, method=method)
    for seed in (1, 2):
        out = structured.invoke("Describe the forecast.", seed=seed)
        if schema is Forecast:
            assert isinstance(out, Forecast)
        elif schema is Flags:
            assert set(out) == {"on", "level"} and type(out["on"]) is bool and type(out["level"]) is int
        else:
            Forecast.model_validate(out)


UNTITLED = {"type": "object", "additionalProperties": False, "required": ["days", "unit"],
            "properties": {"days": {"type": "integer"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}


def test_structured_output_of_a_json_schema_without_a_title(chat):
    """A JSON Schema dict without "title" failed with LangChain's 'must have a top-level title
    key to be used as the function name', though method="json_schema" names nothing: it now
    constrains the answer to the schema as given (as ChatOllama does)."""
    structured = chat.with_structured_output(UNTITLED)
    for seed in (1, 2):
        out = structured.invoke("Forecast", seed=seed)
        assert set(out) == {"days", "unit"} and type(out["days"]) is int
        assert out["unit"] in ("celsius", "fahrenheit")


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
@pytest.mark.parametrize("form", ["inner", "response_format"])
def test_structured_output_of_openai_response_format_dicts(chat, form, method):
    """OpenAI's forms, {"name": …, "schema": {…}} and {"type": "json_schema", "json_schema":
    {…}}, which ChatOpenAI takes as a schema: the first was read as a tool named "Forecast"
    without arguments, so the answer was any JSON value (a bare number came back), the second
    was refused. Both now constrain the answer (or the call's arguments) to the inner schema."""
    inner = {"name": "Forecast", "schema": UNTITLED, "description": "Days and unit."}
    schema = inner if form == "inner" else {"type": "json_schema", "json_schema": {**inner, "strict": True}}
    for seed in (1, 2):  # bound: with include_raw=True, invoke's keyword arguments are dropped
        out = chat.with_structured_output(schema, method=method, include_raw=True,
                                          seed=seed).invoke("Forecast")
        assert out["parsing_error"] is None and set(out["parsed"]) == {"days", "unit"}
        assert type(out["parsed"]["days"]) is int and out["parsed"]["unit"] in ("celsius", "fahrenheit")
        if method == "function_calling":
            assert [c["name"] for c in out["raw"].tool_calls] == ["Forecast"]


def test_structured_output_of_a_titled_schema_whose_root_is_not_an_object(chat):
    """LangChain's conversion keeps a titled schema's body only when it has "properties", so
    an array schema lost its items and any JSON came back; the schema is now used as given."""
    schema = {"title": "Scores", "type": "array", "items": {"type": "integer", "maximum": 99},
              "minItems": 1, "maxItems": 3}
    for seed in (1, 2):
        out = chat.with_structured_output(schema).invoke("Scores", seed=seed)
        assert isinstance(out, list) and out and all(type(v) is int for v in out)


def test_a_tool_from_a_schema_without_a_title_is_a_clear_error(chat):
    """A call needs a name: function_calling and bind_tools say where it comes from and that
    json_schema needs none (they raised LangChain's 'Unsupported function' ValueError)."""
    with pytest.raises(ToolSchemaError, match=r'add a top-level "title".*method="json_schema"'):
        chat.with_structured_output(UNTITLED, method="function_calling")
    with pytest.raises(ToolSchemaError, match=r'tools\[1\].*add a top-level "title"'):
        chat.bind_tools([add, UNTITLED])
    named = chat.with_structured_output({**UNTITLED, "title": "Forecast"}, method="function_calling")
    assert set(named.invoke("Forecast", seed=1)) == {"days", "unit"}


@pytest.mark.parametrize("schema", [Flags, UNTITLED])
def test_structured_output_streams_partial_objects(chat, schema):
    """ChatOpenAI and ChatOllama stream a dict schema's object as it grows; here stream() gave
    the whole object once, at the end. Each key now comes out as it is generated."""
    structured = chat.with_structured_output(schema)
    parts = list(structured.stream("Describe it.", seed=4))
    assert len(parts) >= 2 and all(isinstance(p, dict) for p in parts)
    assert parts[0] != parts[-1] and set(parts[0]) < set(parts[-1])  # a first key, alone
    assert parts[-1] == structured.invoke("Describe it.", seed=4)


def test_structured_output_include_raw_and_tracing_format(chat):
    from langchain_core.callbacks import BaseCallbackHandler

    class Capture(BaseCallbackHandler):
        options: list = []

        def on_chat_model_start(self, *args, **kwargs):
            self.options.append(kwargs.get("options"))

    capture = Capture()
    out = chat.with_structured_output(Forecast, include_raw=True, seed=7).invoke(
        "Forecast", config={"callbacks": [capture]})
    assert isinstance(out["parsed"], Forecast) and out["parsing_error"] is None
    assert isinstance(out["raw"], AIMessage)
    fmt = capture.options[0]["ls_structured_output_format"]
    assert fmt["kwargs"] == {"method": "json_schema"} and fmt["schema"]["title"] == "Forecast"


def test_structured_output_binds_call_options_given_to_it(chat):
    """ChatOpenAI binds with_structured_output's other keyword arguments to the model; they
    were refused here. Call options are now bound (with include_raw=True, LangChain drops
    invoke's own keyword arguments, so this is where a seed or max_tokens goes); anything else
    is still a TypeError that lists them."""
    out = chat.with_structured_output(Forecast, include_raw=True, max_tokens=3, seed=1).invoke("Forecast")
    assert out["raw"].usage_metadata["output_tokens"] == 3 and out["parsed"] is None
    assert out["raw"].response_metadata["finish_reason"] == "length" and out["parsing_error"]
    seeded = chat.with_structured_output(Forecast, seed=7).invoke("Forecast")
    assert seeded == chat.with_structured_output(Forecast).invoke("Forecast", seed=7)
    with pytest.raises(TypeError, match=r"unexpected arguments \['logit_bias'\].*'seed'"):
        chat.with_structured_output(Forecast, logit_bias={1: 5.0})


@pytest.mark.parametrize("schema", [Forecast, Flags, Forecast.model_json_schema(), None])
@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_structured_output_cut_off_at_max_tokens_says_so(chat, schema, method):
    """An answer cut off at max_tokens is no complete JSON: a pydantic schema raised a bare
    JSONDecodeError, a dict one (JsonOutputParser repairs what it can) returned a partial object
    missing required keys, and a forced call came back as None. Every method and schema now
    raises LangChain's OutputParserException saying to raise max_tokens (with include_raw=True:
    parsing_error, parsed None), streamed too; complete answers parse as before (tests above)."""
    from langchain_core.exceptions import OutputParserException

    if schema is None and method != "json_mode":
        pytest.skip("only json_mode takes no schema")
    tools = [add] if method == "json_schema" and schema is Forecast else None
    cut = "cut off at max_tokens .*raise max_tokens"
    structured = chat.with_structured_output(schema, method=method, max_tokens=3, seed=1)
    with pytest.raises(OutputParserException, match=cut):
        structured.invoke("Describe it.")
    with pytest.raises(OutputParserException, match=cut):
        list(structured.stream("Describe it."))
    out = chat.with_structured_output(schema, method=method, include_raw=True, tools=tools,
                                      max_tokens=3, seed=1).invoke("Describe it.")
    assert out["raw"].response_metadata["finish_reason"] == "length"
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputParserException)
    assert "cut off at max_tokens (3 tokens" in str(out["parsing_error"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_a_whole_answer_that_ends_at_max_tokens_parses(chat, method):
    """An answer whose last token closes its JSON (or its call) and lands exactly on max_tokens
    finishes "length" (its stop token never came) yet is whole: it parses, streamed too, as
    without the limit; only a cut answer is refused."""
    from langchain_braid import TOKEN_IDS_KEY

    schema = Forecast
    full = chat.with_structured_output(schema, method=method, include_raw=True, seed=1, max_tokens=256,
                                       ).invoke("Describe it.")
    assert full["raw"].response_metadata["finish_reason"] == "stop" and full["parsing_error"] is None
    n = len(full["raw"].response_metadata[TOKEN_IDS_KEY]) - 1  # all but the stop token
    at = chat.with_structured_output(schema, method=method, include_raw=True, seed=1, max_tokens=n)
    out = at.invoke("Describe it.")
    assert out["raw"].response_metadata["finish_reason"] == "length"
    assert (out["parsed"], out["parsing_error"]) == (full["parsed"], None)
    streamed = list(chat.with_structured_output(schema, method=method, seed=1, max_tokens=n).stream("Describe it."))
    assert streamed[-1] == full["parsed"]


def test_structured_output_with_tools_answers_with_a_call_or_the_schema(chat):
    """ChatOpenAI's with_structured_output(schema, tools=[...]) lets the model call a tool or
    answer in the schema (parsed is None after a call); tools was refused as an unexpected
    argument."""
    answers = []
    for seed in range(1, 8):  # the random model seldom leaves a call, unless sampled hot
        out = chat.with_structured_output(Forecast, tools=[add], include_raw=True, strict=True,
                                          seed=seed, temperature=2.0, max_tokens=256,
                                          ).invoke("Forecast please")
        assert out["parsing_error"] is None and out["raw"].response_metadata["finish_reason"] == "stop"
        if out["raw"].tool_calls:
            assert out["parsed"] is None
            check_args(out["raw"].tool_calls[0]["name"], out["raw"].tool_calls[0]["args"])
            answers.append("call")
        else:
            assert isinstance(out["parsed"], Forecast)
            answers.append("schema")
    assert set(answers) == {"call", "schema"}, answers
    with pytest.raises(TypeError, match='tools= needs method="json_schema"'):
        chat.with_structured_output(Forecast, method="function_calling", tools=[add])


def test_json_mode_answers_with_an_object(chat):
    raw = chat.with_structured_output(None, method="json_mode", include_raw=True, seed=2,
                                      max_tokens=12).invoke("JSON please")["raw"]
    assert raw.content.startswith("{") and raw.usage_metadata["output_tokens"] <= 12


def test_json_that_does_not_fit_the_schema_is_an_output_parser_error(chat, monkeypatch):
    """json_mode constrains the answer to some JSON object: one the pydantic schema does not take
    raises OutputParserException (as PydanticOutputParser and ChatOpenAI's json_mode do, and as
    retrying and fixing parsers catch), not pydantic's ValidationError; include_raw hands it over
    as the parsing error."""
    from tests.integration_tests.test_chat_models import _scripted

    class Person(BaseModel):
        name: str
        age: int

    _scripted(chat, '{"foo": 1}', monkeypatch)
    with pytest.raises(OutputParserException, match="does not fit Person") as caught:
        chat.with_structured_output(Person, method="json_mode").invoke("A person as JSON")
    assert caught.value.llm_output == '{"foo": 1}'
    out = chat.with_structured_output(Person, method="json_mode", include_raw=True).invoke("A person as JSON")
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputParserException)
    _scripted(chat, '{"name": "Ada", "age": 36}', monkeypatch)
    assert chat.with_structured_output(Person, method="json_mode").invoke("A person") == Person(name="Ada", age=36)


class Node(BaseModel):
    v: int
    kids: list[Node] = []


def test_a_model_that_nests_itself_is_constrained_all_the_way_down(chat):
    """LangChain's schema inlining leaves a self-reference as {} (any JSON): children came out as
    anything and failed to parse after a "stop". The json_schema method takes pydantic's own
    schema ($defs and $ref kept)."""
    runtime = chat.llm.engine.grammar()
    bound = chat.with_structured_output(Node, method="json_schema").first
    _, _, params, _, _, _ = chat._prepare([HumanMessage("A tree")], None, bound.kwargs)
    matcher = runtime.matcher(params.guided)
    assert matcher.accept_string('{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3, "kids": []}]}]}')
    assert matcher.is_completed()
    assert not runtime.matcher(params.guided).accept_string('{"v": 1, "kids": [true')
    structured = chat.with_structured_output(Node, method="json_schema", include_raw=True, max_tokens=80,
                                             temperature=1.0)
    for seed in range(4):
        out = structured.invoke("A tree", seed=seed)
        assert isinstance(out["parsed"], Node) or "cut off" in str(out["parsing_error"]), (seed, out)


@pytest.mark.parametrize("strict", [True, False])
def test_json_mode_refuses_strict(chat, strict):
    """json_mode constrains the answer to some JSON object, no schema: ``strict`` has nothing to
    act on there and was accepted silently; ChatOpenAI refuses it too. None is the default."""
    with pytest.raises(ValueError, match=r"strict=.*method='json_mode'.*method='json_schema'"):
        chat.with_structured_output(None, method="json_mode", strict=strict)
    assert chat.with_structured_output(None, method="json_mode", strict=None) is not None


def test_response_format_text_is_no_constraint(chat):
    """OpenAI's default response_format, {"type": "text"}, is free text: the same answer as with
    no format (it was refused as an unknown format); an unknown type still names the choices."""
    plain = chat.invoke("Say something", seed=3, max_tokens=16)
    text = chat.bind(response_format={"type": "text"}).invoke("Say something", seed=3, max_tokens=16)
    assert text.content == plain.content and text.content
    with pytest.raises(ValueError, match="'text'"):
        chat.bind(response_format={"type": "xml"}).invoke("Say something", max_tokens=4)


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_tools_with_a_response_format_answer_with_calls_or_the_schema(chat, choice):
    """create_agent(model, tools, response_format=Schema) binds the tools and an OpenAI-style
    response_format together; the format was ignored whenever tools were bound, so a final
    answer came back as free text the agent could not parse."""
    fmt = {"type": "json_schema", "json_schema": {"name": "Forecast", "schema": Forecast.model_json_schema()}}
    bound = chat.bind_tools([add], tool_choice=choice, response_format=fmt)
    for seed in (1, 2, 3):
        msg = bound.invoke("What is 2 plus 3?", seed=seed, max_tokens=256)
        assert msg.response_metadata["finish_reason"] == "stop" and not msg.invalid_tool_calls
        if msg.tool_calls:
            assert choice == "auto" and msg.content == ""
            check_args(msg.tool_calls[0]["name"], msg.tool_calls[0]["args"])
        else:
            Forecast.model_validate_json(msg.content)


def test_create_agent_with_tools_and_a_response_format_returns_the_structured_response(chat):
    from langchain.agents import create_agent

    agent = create_agent(chat.model_copy(update={"seed": 4}), tools=[add], response_format=Forecast)
    out = agent.invoke({"messages": [HumanMessage("What is 2 plus 3?")]}, {"recursion_limit": 12})
    assert isinstance(out["structured_response"], Forecast)


def test_agent_loop_runs_end_to_end_with_streaming(chat):
    bound = chat.bind_tools([add])
    messages = [HumanMessage("What is 2 plus 3?")]
    call_msg = None
    for chunk in chat.bind_tools([add], tool_choice="add").stream(messages, seed=11):
        call_msg = chunk if call_msg is None else call_msg + chunk
    (call,) = call_msg.tool_calls
    result = add.invoke(call["args"])
    assert result == call["args"]["a"] + call["args"]["b"]
    messages += [call_msg, ToolMessage(str(result), tool_call_id=call["id"])]
    answer = None
    for chunk in bound.stream(messages, seed=12, max_tokens=16):
        answer = chunk if answer is None else answer + chunk
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["input_token_details"]["cache_read"] > 0  # the call was reused
    for c in answer.tool_calls:
        check_args(c["name"], c["args"])


def test_parse_text_that_is_not_a_valid_call_goes_to_invalid_tool_calls():
    text = ('Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
            '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call><tool_call>\n{"name": "add"')
    content, calls, invalid = parse_tool_calls(text, ["add"])
    assert content == "Sure."
    assert [(c["name"], c["args"]) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert [i["name"] for i in invalid] == ["nope", None]
    assert "no bound tool" in invalid[0]["error"] and "cut off" in invalid[1]["error"]


def test_stream_parser_matches_the_whole_parse_for_any_split():
    text = 'Hi <tool_call>\n{"name": "add", "arguments": {"a": {"x": 1}, "b": 2}}\n</tool_call> bye'
    for step in (1, 2, 3, 7):
        parser = ToolCallStreamParser(["add"])
        content, args, names = "", "", []
        for i in range(0, len(text), step):
            c, chunks = parser.feed(text[i:i + step])
            content += c
            args += "".join(ch["args"] for ch in chunks)
            names += [ch["name"] for ch in chunks if ch["name"]]
        tail, more = parser.finish()
        content += tail
        assert names == ["add"] and args == '{"a": {"x": 1}, "b": 2}', step
        assert content == "Hi bye" == parse_tool_calls(text, ["add"])[0]


def test_a_streamed_call_cut_off_is_invalid_not_run_with_partial_arguments():
    from langchain_core.messages import AIMessageChunk

    for cut in ('{"a": 1, "b', '{"a": 1, "b": "x\\\\', '{"a": [1, 2', '{"a": 1', ''):
        parser = ToolCallStreamParser(["add"])
        _, chunks = parser.feed('<tool_call>\n{"name": "add", "arguments": ' + cut)
        _, tail = parser.finish()
        merged = sum((AIMessageChunk(content="", tool_call_chunks=[c]) for c in chunks + tail),
                     AIMessageChunk(content=""))
        assert merged.tool_calls == [], cut
        assert [c["name"] for c in merged.invalid_tool_calls] == ["add"], cut
    parser = ToolCallStreamParser(["add"])  # a complete call stays valid
    _, chunks = parser.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    _, tail = parser.finish()
    merged = sum((AIMessageChunk(content="", tool_call_chunks=[c]) for c in chunks + tail),
                 AIMessageChunk(content=""))
    assert [c["args"] for c in merged.tool_calls] == [{"a": 1, "b": 2}]


def test_a_message_chunk_holds_one_tool_call_chunk_per_call(chat):
    """LangChain parses each message chunk's tool-call chunks on their own (``+`` merges them by
    index across chunks): a chunk that held a call's header and, at a cut, its unrepairable tail
    apart claimed a valid call with no arguments. Cut at every length from inside the header to
    past it, no chunk holds two pieces of one call, the last chunk claims no valid call where the
    call was cut, and the merged stream classifies the call as invoke does. (LangChain's beta v3
    stream protocol, langchain-core 1.8, finalizes a call whose arguments come in a later chunk
    than its name as a call with no arguments, whatever they are: its own, for any provider.)"""
    bound = chat.bind_tools([add], tool_choice="add", temperature=0)  # the same tokens each time
    for max_tokens in range(8, 26, 3):
        whole = bound.invoke("Add 2 and 3", max_tokens=max_tokens)
        chunks = list(bound.stream("Add 2 and 3", max_tokens=max_tokens))
        for chunk in chunks:
            indices = [c["index"] for c in chunk.tool_call_chunks]
            assert len(indices) == len(set(indices)), (max_tokens, chunk.tool_call_chunks)
        merged = sum(chunks[1:], chunks[0])
        assert (merged.tool_calls, len(merged.invalid_tool_calls)) == (
            whole.tool_calls, len(whole.invalid_tool_calls)), max_tokens
        if whole.invalid_tool_calls:  # cut off: the last chunk runs no tool
            assert whole.tool_calls == [] and chunks[-1].tool_calls == [], max_tokens


def _streamed(text, names, step):
    """The message LangChain merges from the stream parser's chunks of ``text`` fed ``step``
    characters at a time: its content, valid calls and invalid calls."""
    from langchain_core.messages import AIMessageChunk

    parser = ToolCallStreamParser(names)
    content, chunks = "", []
    for i in range(0, len(text), step):
        c, more = parser.feed(text[i:i + step])
        content, chunks = content + c, chunks + more
    c, more = parser.finish()
    merged = sum((AIMessageChunk(content="", tool_call_chunks=[ch]) for ch in chunks + more),
                 AIMessageChunk(content=""))
    return content + c, merged.tool_calls, merged.invalid_tool_calls


_HEAD = '<tool_call>\n{"name": "add", "arguments": '


@pytest.mark.parametrize("cut", ["", "{", '{"na', '{"name": "ad', '{"name": "add"', '{"name": "add", "argu',
                                 '{"name": "add", "arguments": '])
def test_a_call_cut_off_inside_its_header_is_invalid_streamed_or_whole(cut):
    """Cut off before its arguments begin (max_tokens), a call runs no tool: neither a call
    named "" from the stream nor one with the header's fields repaired into arguments."""
    text = "Sure. <tool_call>\n" + cut
    _, calls, invalid = parse_tool_calls(text, ["add"])
    assert calls == [] and len(invalid) == 1 and "cut off" in invalid[0]["error"]
    for step in (1, 3, len(text)):
        content, calls, invalid = _streamed(text, ["add"], step)
        assert (content, calls, len(invalid)) == ("Sure.", [], 1), (cut, step)


def test_a_call_cut_off_after_its_name_keeps_the_name_whole_as_streamed():
    _, calls, invalid = parse_tool_calls(_HEAD + '{"a": 1', ["add"])
    assert calls == [] and [(i["name"], i["args"]) for i in invalid] == [("add", '{"a": 1')]  # the arguments text
    assert [i["name"] for i in _streamed(_HEAD + '{"a": 1', ["add"], 2)[2]] == ["add"]


@pytest.mark.parametrize("value", ["</tool_call>", 'a \\" </tool_call> b', "<tool_call>x</tool_call>", "}\\n</tool_call"])
def test_the_closing_tag_inside_a_string_argument_is_text(value):
    """A string argument may hold the closing tag (code, markup, docs as text): the call ends at
    the tag after its JSON, whole or streamed at any split."""
    text = f'Hi <tool_call>\n{{"name": "add", "arguments": {{"s": "{value}", "b": 2}}}}\n</tool_call> bye'
    expected = {"s": json.loads(f'"{value}"'), "b": 2}
    content, calls, invalid = parse_tool_calls(text, ["add"])
    assert (content, [(c["name"], c["args"]) for c in calls], invalid) == ("Hi bye", [("add", expected)], [])
    for step in (1, 2, 5, len(text)):
        content, calls, invalid = _streamed(text, ["add"], step)
        assert (content, [(c["name"], c["args"]) for c in calls], invalid) == (
            "Hi bye", [("add", expected)], []), step


@pytest.mark.parametrize(("text", "content"), [
    ("I will check.\n" + CALL + "\nThen I will answer.", "I will check.\nThen I will answer."),
    ("Hi " + CALL + " bye", "Hi bye"),
    ("A" + CALL + "B", "AB"),
    ("A  " + CALL + "B", "A B"),
    ("First.\n" + CALL + "\n" + CALL + "\n\nLast.", "First.\nLast."),
    (CALL + "\nAfter.", "After."),
    ("Before.\n" + CALL, "Before."),
])
def test_the_text_on_both_sides_of_a_call_stays_apart(text, content):
    """The whitespace around a call goes with it, and the pieces of text it stood between were
    glued ("I will check.Then I will answer."): they keep one separator, a newline where one was
    cut, whole and streamed at any split."""
    assert parse_tool_calls(text, ["add"])[0] == content
    for step in (1, 2, 7, len(text)):
        assert _streamed(text, ["add"], step)[0] == content, step


def test_a_call_cut_off_in_a_string_holding_the_closing_tag_is_invalid():
    text = _HEAD + '{"s": "x</tool_call>y'
    _, calls, invalid = parse_tool_calls(text, ["add"])
    assert calls == [] and len(invalid) == 1 and "cut off" in invalid[0]["error"]
    for step in (1, 4, len(text)):
        _, calls, invalid = _streamed(text, ["add"], step)
        assert (calls, len(invalid)) == ([], 1), step


@pytest.mark.parametrize("body", ['{"arguments": {"a": 1}, "name": "add"}', '{"name": "nope", "arguments": {"a": 1}}',
                                  '{"name": "add", "arguments": [1]}', 'not json'])
def test_the_stream_parser_judges_closed_calls_as_the_whole_parse_does(body):
    """Calls the grammar would not write (keys in another order, a name no tool has, arguments
    that are no object, no JSON) come out of the stream as parse_tool_calls reads them."""
    text = f"<tool_call>\n{body}\n</tool_call>"
    _, calls, invalid = parse_tool_calls(text, ["add"])
    for step in (1, 3, len(text)):
        _, s_calls, s_invalid = _streamed(text, ["add"], step)
        assert [(c["name"], c["args"]) for c in s_calls] == [(c["name"], c["args"]) for c in calls], step
        assert len(s_invalid) == len(invalid), step


def test_the_stream_parser_agrees_with_the_whole_parse_on_random_text():
    """Property: for text pieced together at random from tags, headers, JSON fragments, escapes
    and cut-off tags, the message merged from the streamed chunks (fed 1, 2 or 5 characters at
    a time) has the whole parse's content, valid calls and count of invalid ones."""
    import random

    pieces = ['<tool_call>', '</tool_call>', '\n', ' ', '{"name": "add", "arguments": ', '{"name": "nope", '
              '"arguments": ', '{"a": ', '1', '"s', '\\"', '\\\\', '"', '}', '}}', ']', '[', 'Hi', ',', '"b": 2',
              '</tool_ca', '<tool_']
    rng = random.Random(0)
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        content, calls, invalid = parse_tool_calls(text, ["add"])
        for step in (1, 2, 5):
            s_content, s_calls, s_invalid = _streamed(text, ["add"], step)
            assert (s_content, [(c["name"], c["args"]) for c in s_calls], len(s_invalid)) == (
                content, [(c["name"], c["args"]) for c in calls], len(invalid)), (text, step)


@pytest.mark.parametrize("text", [" hi there \n", "\n\nx  ", "plain", " a <tool_ca"])
def test_an_answer_without_a_call_keeps_its_text_as_generated(text):
    """With tools bound, an answer with no call was stripped: its carried ids then decoded to
    text the next prompt did not hold, and the whole answer was prefilled again."""
    assert parse_tool_calls(text, ["add"])[0] == text
    for step in (1, 3, len(text)):
        assert _streamed(text, ["add"], step)[0] == text, step


def test_with_tools_bound_a_plain_answer_is_reused_whole_next_turn(tiny_model):
    """An agent's next turn reads the last answer from the cache, all but its final token."""
    from langchain_braid import TOKEN_IDS_KEY

    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=12)
    bound = chat.bind_tools([add], tool_choice="none")
    history = [HumanMessage("Weather in Paris?")]
    for question in ("And London?", "And Rome?"):
        answer = bound.invoke(history)
        ids = answer.response_metadata[TOKEN_IDS_KEY]
        assert answer.content == chat.tokenizer.decode(ids, skip_special_tokens=True)
        nxt = bound.invoke(history + [answer, HumanMessage(question)], max_tokens=1)
        used = answer.usage_metadata
        assert nxt.usage_metadata["input_token_details"]["cache_read"] == used["input_tokens"] + len(ids) - 1
        history += [answer, HumanMessage(question)]


def test_tools_bound_to_a_template_that_ignores_them_warn(tiny_model, tiny_llama, monkeypatch):
    """TinyLlama's and ERNIE-4.5's templates write no tools and no calls: bound tools never
    reached the model, silently. ChatBraid says so, once per model (not once per call path, as
    Python's default filter would); Qwen3's template renders them."""
    import warnings

    from langchain_braid import chat_models

    monkeypatch.setattr(chat_models, "_WARNED_TOOLS", set())
    llama = ChatBraid(model=tiny_llama, device="cpu", temperature=0, max_tokens=4).bind_tools([add])
    with pytest.warns(UserWarning, match="chat template .* ignores the bound tools"):
        llama.invoke("Add 2 and 3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(llama.stream("Add 2 and 3"))  # the same model again, another call path
        ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=4).bind_tools([add]).invoke("Add 2 and 3")
        ChatBraid(model=str(tiny_llama), device="cpu", temperature=0, max_tokens=4).invoke("Add 2 and 3")


def test_the_profile_says_tool_calling_only_where_the_template_writes_tools(tiny_model, tiny_llama):
    """profile["tool_calling"] is what the loaded engine's chat template does with tools: True
    for Qwen3's, False for TinyLlama's (which ignores them), before and after a model's engine
    loads; a profile the caller gave is left alone."""
    fresh = {"max_num_seqs": 3}  # an engine of its own, not loaded by another test
    llama = ChatBraid(model=str(tiny_llama), device="cpu", max_tokens=2, engine_kwargs=fresh)
    assert llama.profile["tool_calling"] is True  # the engine not loaded: not known yet
    llama.invoke("hi")
    assert llama.profile["tool_calling"] is False
    loaded = ChatBraid(model=str(tiny_llama), device="cpu", engine_kwargs=fresh)
    assert loaded.profile["tool_calling"] is False
    qwen = ChatBraid(model=tiny_model, device="cpu", max_tokens=2)
    qwen.invoke("hi")
    assert qwen.profile["tool_calling"] is True
    given = ChatBraid(model=str(tiny_llama), device="cpu", profile={"tool_calling": True})
    given.invoke("hi", max_tokens=1)
    assert given.profile == {"tool_calling": True}
