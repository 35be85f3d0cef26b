"""Length-bounded JSON strings (minLength/maxLength) under grammar-guided decoding: they hold
no raw control characters (xgrammar 0.2.8's own rule for them lets U+0000-U+001F through,
which no JSON parser takes), accept escapes, and count length as JSON Schema does."""

from __future__ import annotations

import json
import random

import pytest

from braid_engine import GuidedDecoding, SamplingParams

BOUNDED = {"type": "string", "minLength": 2, "maxLength": 4}

# JSON string literals (the text between and including the quotes) as a model would write them
ACCEPTED = [
    '"ab"', '"abcd"',                        # ordinary characters at minLength and maxLength
    '"é😀"', '"日本語"',                       # multi-byte characters count as one each
    r'"\n\""', r'"a\\b\/"', r'"\t\r\b\f"',    # escapes count as the one character they mean
    r'"\u00e9\u0000"', r'"x\u001F"',          # \u escapes, control characters included
    r'"\ud83d\ude00x"',                      # a surrogate pair is one character
    '"a\x7fb"',                              # DEL is not a control character to JSON
]
REJECTED = [
    '"a\x00b"', '"a\x1fb"', '"a\nb"', '"a\tb"', '"\x01\x02"',  # raw control characters
    '"abcde"', r'"abc\t\t"', r'"\u00e9\u00e9\u00e9\u00e9\u00e9"',  # one over maxLength
    '"a"', r'"\n"', r'"\ud83d\ude00"', '"😀"',   # one under minLength
    r'"a\x"', r'"a\u12"', r'"a\'"',           # not JSON escapes
    r'"\ud800ab"',                           # a lone surrogate is no character (refused)
]


def loads_strict(text: str):
    """``json.loads`` as strict as JSON itself: no raw control characters, no lone surrogates."""
    value = json.loads(text)  # strict=True is the default: raw control characters raise
    for s in _strings(value):
        s.encode("utf-8")  # a lone surrogate (from an unpaired \\ud800 escape) cannot encode
    return value


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)


def valid(literal: str, lo: int = 2, hi: int = 4) -> bool:
    """The oracle: ``literal`` is a JSON string whose value has lo..hi characters."""
    try:
        value = loads_strict(literal)
    except (ValueError, UnicodeEncodeError):
        return False
    return isinstance(value, str) and lo <= len(value) <= hi


def test_the_oracle_agrees_with_the_lists():
    assert all(valid(s) for s in ACCEPTED)
    assert not any(valid(s) for s in REJECTED)


def accepts(runtime, guided: GuidedDecoding, text: str) -> bool:
    matcher = runtime.matcher(guided)
    return matcher.accept_string(text) and matcher.is_completed()


# where the bounded string sits: (schema with it, document around the literal ``S``)
PLACES = {
    "top level": (BOUNDED, "S"),
    "property": ({"type": "object", "properties": {"a": BOUNDED}, "required": ["a"]},
                 '{"a": S}'),
    "array items": ({"type": "array", "items": BOUNDED, "minItems": 1, "maxItems": 1}, "[S]"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}, BOUNDED],
                     "items": False, "minItems": 2}, "[1, S]"),
    "anyOf": ({"anyOf": [{"type": "integer"}, BOUNDED]}, "S"),
    "oneOf in array": ({"type": "array", "items": {"oneOf": [{"type": "null"}, BOUNDED]},
                        "minItems": 2, "maxItems": 2}, "[null, S]"),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": BOUNDED}, "required": ["a"]}]},
              '{"a": S}'),
    "$defs/$ref": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}},
                    "required": ["a"], "$defs": {"b": BOUNDED}}, '{"a": S}'),
    "additionalProperties": ({"type": "object", "additionalProperties": BOUNDED,
                              "minProperties": 1, "maxProperties": 1}, '{"k": S}'),
    "type list": ({**BOUNDED, "type": ["string", "null"]}, "S"),
    "propertyNames": ({"type": "object", "propertyNames": BOUNDED, "minProperties": 1,
                       "maxProperties": 1, "additionalProperties": {"type": "integer"}},
                      "{S: 1}"),
}


@pytest.mark.parametrize("place", list(PLACES))
def test_bounded_strings_refuse_raw_control_characters_and_count_escapes(qwen3_llm, place):
    runtime = qwen3_llm.engine.grammar()
    schema, doc = PLACES[place]
    guided = GuidedDecoding(json_schema=schema)
    for literal in ACCEPTED:
        assert accepts(runtime, guided, doc.replace("S", literal)), (place, literal)
    for literal in REJECTED:
        assert not accepts(runtime, guided, doc.replace("S", literal)), (place, literal)


def test_bounded_strings_match_json_schema_on_random_strings(qwen3_llm):
    """Random literals mixing ordinary, multi-byte and control characters, escapes and broken
    escapes: the grammar takes exactly those JSON parses into a string of lo..hi characters."""
    runtime = qwen3_llm.engine.grammar()
    pieces = ["a", "Z", " ", "é", "😀", '"', "\\", "\x00", "\x1f", "\n", "\x7f",
              r"\n", r"\"", r"\\", r"\/", r"\u00e9", r"\u001f", r"\ud83d\ude00", r"\ud83d",
              r"\x", "\\u12"]
    rng = random.Random(0)
    for lo, hi in [(0, 3), (2, 5), (4, 4)]:
        guided = GuidedDecoding(json_schema={"type": "string", "minLength": lo, "maxLength": hi})
        for _ in range(150):
            literal = '"' + "".join(rng.choices(pieces, k=rng.randint(0, 7))) + '"'
            assert accepts(runtime, guided, literal) == valid(literal, lo, hi), (lo, hi, literal)


def test_other_bound_shapes(qwen3_llm):
    """Only a minimum, only a maximum, exactly one character (xgrammar writes no rule for it)."""
    runtime = qwen3_llm.engine.grammar()
    at_most = GuidedDecoding(json_schema={"type": "string", "maxLength": 2})
    at_least = GuidedDecoding(json_schema={"type": "string", "minLength": 2})
    one = GuidedDecoding(json_schema={"type": "string", "minLength": 1, "maxLength": 1})
    assert accepts(runtime, at_most, '""') and accepts(runtime, at_most, r'"\n\u00e9"')
    assert not accepts(runtime, at_most, '"\x00"') and not accepts(runtime, at_most, '"abc"')
    assert accepts(runtime, at_least, r'"\n' + "x" * 50 + '"')
    assert not accepts(runtime, at_least, '"ab\x00"') and not accepts(runtime, at_least, '"a"')
    for literal in ['"a"', '"😀"', r'"\n"', r'"\ud83d\ude00"']:
        assert accepts(runtime, one, literal), literal
    for literal in ['""', '"ab"', '"\x00"', '"\x1f"', r'"\n\n"']:
        assert not accepts(runtime, one, literal), literal


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 1},
    {"type": "string", "minLength": 0, "maxLength": 1},
    {"$defs": {"line-item": {"type": "string", "maxLength": 1}}, "$ref": "#/$defs/line-item"},
    {"$defs": {"a b.c": {"type": "string", "maxLength": 1}}, "$ref": "#/$defs/a b.c"},
])
def test_strings_of_at_most_one_character_and_defs_with_other_names(qwen3_llm, schema):
    """xgrammar writes a string of at most one character as '"\"" NAME "\""' with NAME ::= ("" |
    CLASS), and keeps a $defs name's "-" and "." in its rules' names: neither was rewritten, so
    escapes were refused there (the safe side, against the documented rule)."""
    runtime = qwen3_llm.engine.grammar()
    guided = GuidedDecoding(json_schema=schema)
    for literal in ['""', '"a"', r'"\n"', r'"\""', r'"\u00e9"', r'"\ud83d\ude00"']:
        assert accepts(runtime, guided, literal), literal
    for literal in ['"ab"', '"\x00"', r'"\n\n"', r'"\ud800"']:
        assert not accepts(runtime, guided, literal), literal
    longer = {"$defs": {"line-item": {"type": "string", "minLength": 2, "maxLength": 3}}, "$ref": "#/$defs/line-item"}
    assert accepts(runtime, GuidedDecoding(json_schema=longer), r'"a\nb"')
    assert not accepts(runtime, GuidedDecoding(json_schema=longer), '"a\x01"')


def test_long_bounds_refuse_control_characters_without_escapes(qwen3_llm):
    """Past 256 characters (or 512 chain rules in one grammar) a string keeps xgrammar's own
    repetition, whose masks stay fast, with the control characters taken out: exact length,
    no escapes (the documented deviation, on the safe side)."""
    runtime = qwen3_llm.engine.grammar()
    long = GuidedDecoding(json_schema={"type": "string", "minLength": 2, "maxLength": 1000})
    assert accepts(runtime, long, '"' + "é" * 1000 + '"')
    for literal in ['"' + "x" * 1001 + '"', '"x"', '"ab\x00"', '"ab\x1f"', '"a\nb"',
                    r'"a\nb"']:
        assert not accepts(runtime, long, literal), literal[:12]
    # three strings whose chains together pass the budget: the last falls back the same way
    props = {"a": {"type": "string", "minLength": 200, "maxLength": 250},
             "b": {"type": "string", "minLength": 150, "maxLength": 256},
             "c": {"type": "string", "minLength": 100, "maxLength": 240}}
    many = GuidedDecoding(json_schema={"type": "object", "properties": props,
                                       "required": ["a", "b", "c"]})

    def doc(a: str, b: str, c: str) -> str:
        return f'{{"a": "{a}", "b": "{b}", "c": "{c}"}}'

    assert accepts(runtime, many, doc(r"\n" * 250, "x" * 150, "x" * 240))
    assert accepts(runtime, many, doc("x" * 200, r"\t" * 256, "x" * 100))
    assert not accepts(runtime, many, doc(r"\n" * 251, "x" * 150, "x" * 240))
    assert not accepts(runtime, many, doc("x" * 200, "x" * 150, "x" * 241))
    assert not accepts(runtime, many, doc("x" * 200, "x" * 150, "\x00" * 100))
    assert not accepts(runtime, many, doc("x" * 200, "x" * 150, r"\n" * 100))  # no escapes


def test_tool_call_arguments_with_bounded_strings(qwen3_llm):
    """Tool calls pass the arguments' schema inside a structural tag: fixed there too."""
    from langchain_braid._tools import tool_grammar

    runtime = qwen3_llm.engine.grammar()
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "tags": {"type": "array", "items": BOUNDED}},
              "required": ["city", "tags"]}
    tools = [{"type": "function", "function": {"name": "w", "parameters": params}}]

    def call(city: str, tag: str = '"ab"') -> str:
        return f'<tool_call>\n{{"name": "w", "arguments": {{"city": {city}, "tags": [{tag}]}}}}\n</tool_call>'

    for choice, prefix in [("any", ""), ("w", ""), ("auto", "Let me check.\n")]:
        guided = tool_grammar(tools, choice)
        assert accepts(runtime, guided, prefix + call('"Paris"')), choice
        assert accepts(runtime, guided, prefix + call(r'"St\u00e9 \"X\""', r'"\n\n"')), choice
        assert accepts(runtime, guided, prefix + call('"12345678"', '"abcd"')), choice
        for city, tag in [('"Pa\x00is"', '"ab"'), ('"Paris\x1f"', '"ab"'), ('"Par\nis"', '"ab"'),
                          ('"123456789"', '"ab"'), ('"Paris"', '"a\x00"'), ('"Paris"', '"abcde"')]:
            assert not accepts(runtime, guided, prefix + call(city, tag)), (choice, city, tag)


def test_a_structural_tag_with_a_bounded_schema(qwen3_llm):
    runtime = qwen3_llm.engine.grammar()
    tag = {"type": "structural_tag", "format": {
        "type": "tags_with_separator", "separator": "\n", "at_least_one": True,
        "stop_after_first": True,
        "tags": [{"type": "tag", "begin": "<a>", "end": "</a>",
                  "content": {"type": "json_schema", "json_schema": BOUNDED}}]}}
    guided = GuidedDecoding(structural_tag=tag)
    assert accepts(runtime, guided, r'<a>"\u00e9\n"</a>')
    assert not accepts(runtime, guided, '<a>"\x00b"</a>')
    assert not accepts(runtime, guided, '<a>"abcde"</a>')


def test_other_string_keywords_are_unchanged(qwen3_llm):
    """pattern, format, enum and unbounded strings compile as xgrammar makes them."""
    import xgrammar as xgr

    from braid_engine.grammar import json_schema_grammar

    schema = {"type": "object", "properties": {
        "p": {"type": "string", "pattern": "^[a-z]{1,3}$"},
        "d": {"type": "string", "format": "date"},
        "e": {"enum": ["[^\"\\\r\n]", "b"]},  # xgrammar's bounded class as a value
        "s": {"type": "string"}}, "required": ["p", "d", "e", "s"]}
    ours = json_schema_grammar(xgr, schema)
    assert str(ours) == str(xgr.Grammar.from_json_schema(schema, any_whitespace=False,
                                                         separators=(", ", ": ")))
    runtime = qwen3_llm.engine.grammar()
    doc = {"p": "abc", "d": "2024-02-29", "e": "[^\"\\\r\n]", "s": "\n\u00e9 any length"}
    with_bound = GuidedDecoding(json_schema={**schema, "properties": {
        **schema["properties"], "b": {"type": "string", "maxLength": 2}}})
    for guided, extra in [(GuidedDecoding(json_schema=schema), {}), (with_bound, {"b": "\n"})]:
        assert accepts(runtime, guided, json.dumps({**doc, **extra}))
        for key, bad in [("p", "abcd"), ("d", "2024-13-01"), ("e", "c"), ("s", "a\x00")]:
            text = json.dumps({**doc, **extra, key: bad}, ensure_ascii=False)
            if key == "s":
                text = text.replace("\\u0000", "\x00")  # raw, as a model could write it
            assert not accepts(runtime, guided, text), (key, text)


def test_only_bounded_strings_are_rewritten():
    """Everything of xgrammar's grammar but the bounded strings stays as xgrammar wrote it."""
    import xgrammar as xgr

    from braid_engine.grammar import json_schema_grammar

    schema = {"type": "object", "properties": {
        "r": {"type": "string", "pattern": "^[^\"\\\\]x$"},
        "e": {"enum": ["[^\"\\\r\n]", 1]},
        "n": {"type": "array", "items": {"type": "number", "minimum": 0}, "maxItems": 3},
        "b": {"type": "string", "maxLength": 2},
        "k": {"type": "object", "propertyNames": {"minLength": 1}}},
        "required": ["r", "e", "n", "b", "k"]}
    theirs = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False,
                                              separators=(", ", ": "))).splitlines()
    ours = str(json_schema_grammar(xgr, schema)).splitlines()
    bounded = [line.split()[0] for line in theirs if line.endswith(r'(([^\"\\\r\n]))')]
    assert len(bounded) == 2  # b's and k's names
    kept = [line for line in theirs if not any(name in line for name in bounded)]
    assert len(kept) > 20 and set(kept) <= set(ours)
    assert not any("characters{" in line for line in ours)  # both bounded ones are chains


def test_guided_answers_with_max_length_parse_strictly(qwen3_llm):
    """A random model writes bounded strings: every answer that finishes parses (strict
    json.loads: a raw control character is an error) and validates."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "code": {"type": "string", "minLength": 2,
                                                        "maxLength": 3}},
              "required": ["city", "code"]}
    engine = qwen3_llm.engine
    ids = qwen3_llm.encode("The weather in Paris is")
    streams = [engine.add_request(ids, SamplingParams(
        temperature=1.0, seed=seed, max_tokens=64, guided=GuidedDecoding(json_schema=schema)))
        for seed in range(40)]
    outs = [s.result() for s in streams]
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 20
    for out in finished:
        value = loads_strict(out.text)
        assert list(value) == ["city", "code"], out.text
        assert isinstance(value["city"], str) and len(value["city"]) <= 8, out.text
        assert isinstance(value["code"], str) and 2 <= len(value["code"]) <= 3, out.text
