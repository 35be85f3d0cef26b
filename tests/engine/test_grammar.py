"""Grammar-constrained decoding: outputs match their constraint under greedy and sampled
decoding, in batches, streamed, and after cached prefixes."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from braid_engine import (
    GrammarUnavailableError,
    GuidedDecoding,
    InvalidGrammarError,
    InvalidSamplingParamsError,
    SamplingParams,
)
from braid_engine.grammar import GrammarRuntime

SCHEMA = {"type": "object",
          "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
                         "days": {"type": "integer", "minimum": 0, "maximum": 99},
                         "unit": {"enum": ["celsius", "fahrenheit"]},
                         "ok": {"type": "boolean"}},
          "required": ["city", "days", "unit", "ok"]}


def check(value: dict) -> None:
    assert list(value) == ["city", "days", "unit", "ok"]
    assert isinstance(value["city"], str) and 1 <= len(value["city"]) <= 8
    assert type(value["days"]) is int and 0 <= value["days"] <= 99
    assert value["unit"] in ("celsius", "fahrenheit")
    assert type(value["ok"]) is bool


def guided(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=200, guided=GuidedDecoding(json_schema=SCHEMA), **kw)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_schema_output_validates_and_finishes_with_stop(qwen3_llm, temperature):
    ids = qwen3_llm.encode("The weather in Paris is")
    for seed in range(3):
        out = qwen3_llm.engine.add_request(ids, guided(temperature=temperature, seed=seed)).result()
        check(json.loads(out.text))
        assert out.finish_reason == "stop"
        assert max(out.token_ids) < len(qwen3_llm.tokenizer)  # padding rows are never sampled


def test_batched_requests_each_keep_their_own_constraint(qwen3_llm):
    engine = qwen3_llm.engine
    ids = qwen3_llm.encode("Hello! How are you today?")
    streams = [engine.add_request(ids, guided(temperature=0.7, seed=s)) for s in range(3)]
    streams.append(engine.add_request(ids, SamplingParams(temperature=0.7, seed=9, max_tokens=40,
                                                          guided=GuidedDecoding(json_object=True))))
    free = engine.add_request(ids, SamplingParams(temperature=0.7, seed=1, max_tokens=12))
    outs = [s.result() for s in streams]
    for out in outs[:3]:
        check(json.loads(out.text))
    assert outs[3].text.startswith("{")  # an object, whose random keys max_tokens may cut
    assert free.result().token_ids == qwen3_llm.engine.add_request(
        ids, SamplingParams(temperature=0.7, seed=1, max_tokens=12)).result().token_ids


def test_streamed_deltas_spell_the_valid_output(qwen3_llm):
    stream = qwen3_llm.engine.add_request(qwen3_llm.encode("Numbers:"), guided(temperature=0.7, seed=4))
    deltas = list(stream)
    assert len(deltas) > 5 and deltas[-1].finish_reason == "stop"
    check(json.loads("".join(d.text for d in deltas)))


def test_grammar_keeps_the_prefix_cache_exact(qwen3_llm):
    engine = qwen3_llm.engine
    prefix = qwen3_llm.encode("Retrieval augmented generation puts documents in the prompt. " * 3)
    engine.add_request(prefix, SamplingParams(temperature=0, max_tokens=1)).result()
    prompt = prefix + qwen3_llm.encode(" JSON:")
    cached = engine.add_request(prompt, guided(temperature=0.7, seed=5)).result()
    fresh = engine.add_request(prompt, guided(temperature=0.7, seed=5,
                                              enable_prefix_caching=False)).result()
    assert cached.num_cached_tokens >= len(prefix) - 16 and fresh.num_cached_tokens == 0
    assert cached.token_ids == fresh.token_ids
    check(json.loads(cached.text))


def test_structural_tag_forces_a_tagged_call(qwen3_llm):
    tag = {"type": "structural_tag", "format": {
        "type": "tags_with_separator", "separator": "\n", "at_least_one": True,
        "stop_after_first": True,
        "tags": [{"type": "tag", "begin": '<tool_call>\n{"name": "w", "arguments": ',
                  "content": {"type": "json_schema", "json_schema": SCHEMA},
                  "end": "}\n</tool_call>"}]}}
    out = qwen3_llm.engine.add_request(qwen3_llm.encode("Call:"), SamplingParams(
        temperature=0.7, seed=3, max_tokens=200, guided=GuidedDecoding(structural_tag=tag))).result()
    assert out.finish_reason == "stop"
    assert out.text.startswith("<tool_call>\n") and out.text.endswith("\n</tool_call>")
    call = json.loads(out.text[len("<tool_call>\n"):-len("\n</tool_call>")])
    assert call["name"] == "w"
    check(call["arguments"])


def test_stop_strings_still_end_a_constrained_request(qwen3_llm):
    out = qwen3_llm.engine.add_request(qwen3_llm.encode("x"), guided(temperature=0, stop=['"days"'])).result()
    assert out.finish_reason == "stop" and out.text.startswith('{"city": ') and '"days"' not in out.text


def test_masks_cover_the_model_vocab_and_forbid_padding_rows(qwen3_llm):
    runtime = qwen3_llm.engine.grammar()
    matcher = runtime.matcher(GuidedDecoding(json_object=True))
    logits = torch.zeros(2, qwen3_llm.model_config.vocab_size)
    runtime.apply(logits, runtime.fill([matcher]), [1])
    assert torch.isinf(logits[1, len(qwen3_llm.tokenizer):]).all()
    assert not torch.isinf(logits[0]).any()  # rows without a constraint are untouched
    allowed = torch.nonzero(~torch.isinf(logits[1])).flatten().tolist()
    assert allowed and all(qwen3_llm.tokenizer.decode([t]).startswith("{") for t in allowed)


def test_errors_are_typed_and_say_what_to_do(qwen3_llm, monkeypatch):
    with pytest.raises(InvalidGrammarError, match="exactly one"):
        GuidedDecoding()
    with pytest.raises(InvalidGrammarError, match="exactly one"):
        GuidedDecoding(json_object=True, json_schema={})
    with pytest.raises(InvalidSamplingParamsError, match="GuidedDecoding"):
        SamplingParams(guided={"json_object": True})
    with pytest.raises(InvalidGrammarError, match="not valid JSON.*dict"):  # was a bare JSONDecodeError
        GuidedDecoding(json_schema="{'type': 'object'}")
    with pytest.raises(InvalidGrammarError, match="must be JSON data.*sets as lists"):  # a bare TypeError
        GuidedDecoding(json_schema={"enum": {1, 2}})
    bad = GuidedDecoding(json_schema={"type": "object", "properties": {"a": {"type": "nope"}}})
    with pytest.raises(InvalidGrammarError, match="could not be compiled"):
        qwen3_llm.engine.add_request([1, 2], SamplingParams(guided=bad))
    monkeypatch.setitem(sys.modules, "xgrammar", None)
    with pytest.raises(GrammarUnavailableError, match=r"langchain-braid\[grammar\]"):
        GrammarRuntime(qwen3_llm.tokenizer, 448, [0])


@pytest.mark.parametrize("submit", ["grammar", "generate"])
def test_requests_keep_decoding_while_the_grammar_runtime_is_built(tiny_qwen3, monkeypatch, submit):
    """The first guided request builds the grammar runtime (the tokenizer's tables: ~1 s for a
    150k vocabulary); the engine's loop must not wait on it: it held the lock the loop takes
    each step, so every running stream stalled until it was built."""
    import threading

    from braid_engine import LLM
    from braid_engine.engine import engine as engine_module

    started, release = threading.Event(), threading.Event()
    real = engine_module.GrammarRuntime

    def slow(*args, **kwargs):
        started.set()
        if not release.wait(10):  # (then the loop waited on it: the test fails below)
            raise TimeoutError("the test never let the grammar runtime be built")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "GrammarRuntime", slow)
    llm = LLM(str(tiny_qwen3), device="cpu", dtype="float32")
    try:
        stream = llm.engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        deltas = iter(stream)
        first = next(deltas)  # the request is running
        # built for its own sake, or by a batch of guided requests (generate queues a batch
        # under the lock the loop takes: their grammars must be set up before it)
        schema = GuidedDecoding(json_schema={"type": "object", "properties": {"n": {"type": "integer"}}})
        target = llm.engine.grammar if submit == "grammar" else (
            lambda: llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=8, guided=schema)))
        building = threading.Thread(target=target)
        building.start()
        assert started.wait(30)
        # while the runtime is being built, the running request finishes on its own
        rest = [delta.token_ids for delta in deltas]
        assert len(first.token_ids) + sum(map(len, rest)) == 40
        assert building.is_alive()  # and the runtime is still being built
        release.set()
        building.join(30)
        assert isinstance(llm.engine.grammar(), real)
    finally:
        release.set()
        llm.shutdown()


def _matcher(llm, schema):
    return llm.engine.grammar().matcher(GuidedDecoding(json_schema=schema))


def test_schemas_differing_in_property_order_get_their_own_grammar(qwen3_llm):
    """The grammar writes properties in the schema's order (reasoning before an answer matters
    to what a model writes); the cache named schemas by their sorted JSON, so the second order
    got the first one's grammar."""
    props = {"reasoning": {"type": "boolean"}, "answer": {"type": "integer"}}
    first = {"type": "object", "properties": props, "required": list(props)}
    second = {"type": "object", "properties": dict(reversed(props.items())), "required": list(props)}
    assert _matcher(qwen3_llm, first).accept_string('{"reasoning": true, "answer": 3}')
    assert _matcher(qwen3_llm, second).accept_string('{"answer": 3, "reasoning": true}')
    assert not _matcher(qwen3_llm, second).accept_string('{"reasoning": true')


@pytest.mark.parametrize(("schema", "where"), [
    ({"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 5}}}, "multipleOf at #/properties/a"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains at #"),
    ({"not": {"type": "string"}}, "not at #"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf .with more than one schema. at #"),
    ({"type": "object", "$defs": {"x": {"if": {"type": "string"}, "then": {"minLength": 2}}},
      "properties": {"x": {"$ref": "#/$defs/x"}}}, "if, then at #/[$]defs/x"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired at #"),
])
def test_keywords_no_grammar_enforces_are_refused_by_name_and_place(qwen3_llm, schema, where):
    """xgrammar leaves these keywords unenforced (a warning in a log at most): a request that
    ended "stop" broke its schema ([0, 0] for uniqueItems, 4.2 for multipleOf: 5, any JSON value
    for allOf). Refused when the request is made, and the engine serves on, no page held."""
    with pytest.raises(InvalidGrammarError, match=f"uses {where}.*cannot enforce"):
        qwen3_llm.engine.add_request([1, 2], SamplingParams(guided=GuidedDecoding(json_schema=schema)))
    out = qwen3_llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    qwen3_llm.engine.clear_cache()
    assert qwen3_llm.stats()["pages_used"] == 0
    # a property named after a keyword is a name, not the keyword
    assert _matcher(qwen3_llm, {"type": "object", "properties": {"not": {"type": "integer"}}, "required": ["not"]})


def test_what_the_grammar_would_let_through_is_made_enforceable(qwen3_llm):
    """A required property missing from properties was not required at all ({} passed); it now
    takes the schema extra properties take. An enum of strings with length bounds let the values
    past them through; it keeps the ones that fit."""
    required = {"type": "object", "required": ["a"], "additionalProperties": {"type": "integer"}}
    m = _matcher(qwen3_llm, required)
    assert m.accept_string("{") and not m.accept_string("}")
    assert _matcher(qwen3_llm, required).accept_string('{"a": 4}')
    assert not _matcher(qwen3_llm, required).accept_string('{"a": "x"')
    with pytest.raises(InvalidGrammarError, match=r"requires \['a'\].*additionalProperties is false"):
        _matcher(qwen3_llm, {**required, "additionalProperties": False})
    short = {"type": "string", "enum": ["ab", "abcdefg"], "maxLength": 3}
    assert _matcher(qwen3_llm, short).accept_string('"ab"')
    assert not _matcher(qwen3_llm, short).accept_string('"abc')
    with pytest.raises(InvalidGrammarError, match="no value of its enum fits"):
        _matcher(qwen3_llm, {"type": "string", "enum": ["abcdefg"], "maxLength": 3})


def test_a_schema_nothing_satisfies_fails_its_request_with_a_grammar_error(qwen3_llm):
    """{"$ref": "#"} compiles to a rule that only names itself: no token starts it. The request
    sampled a token the grammar then refused and failed as an engine fault ("report the error");
    it fails with InvalidGrammarError, and the engine serves on, no page held. (xgrammar 0.2.8
    compiles the schema and the first mask allows nothing; 0.2.9 refuses it as it compiles, so
    add_request raises.)"""
    params = SamplingParams(guided=GuidedDecoding(json_schema={"$ref": "#"}))
    try:
        stream = qwen3_llm.engine.add_request([1, 2], params)
    except InvalidGrammarError as e:
        assert "could not be compiled" in str(e)
    else:
        with pytest.raises(InvalidGrammarError, match="allows no next token.*fix the schema"):
            stream.result()
    out = qwen3_llm.generate([[1, 2]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    qwen3_llm.engine.clear_cache()
    assert qwen3_llm.stats()["pages_used"] == 0


def test_the_compiled_grammars_kept_are_the_latest(qwen3_llm, monkeypatch):
    """A schema a request (each its own enum) was compiled and kept forever: +418 MiB for 2,000
    schemas at a 406-token vocabulary. The runtime keeps the latest COMPILED_KEPT."""
    from braid_engine import grammar as grammar_module

    runtime = qwen3_llm.engine.grammar()
    monkeypatch.setattr(grammar_module, "COMPILED_KEPT", 3)
    schemas = [GuidedDecoding(json_schema={"enum": [f"v{i}"]}) for i in range(5)]
    for g in schemas:
        runtime.compile(g)
    runtime.compile(schemas[2])  # used again: kept
    runtime.compile(GuidedDecoding(json_schema={"enum": ["w"]}))
    assert list(runtime._compiled) == [schemas[4].key(), schemas[2].key(), GuidedDecoding(
        json_schema={"enum": ["w"]}).key()]
