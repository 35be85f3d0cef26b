"""Grammar-constrained decoding: a request's output is forced to match a JSON schema, any JSON
object, or a structural tag (free text until a trigger such as ``<tool_call>``, then a schema).

Each constrained request owns an ``xgrammar`` matcher. Before every forward pass the engine
asks for the masks of the requests about to sample (on a helper thread, so the work overlaps
the forward); after it, disallowed logits are set to -inf and each sampled token advances its
matcher. ``xgrammar`` is optional (``pip install langchain-braid[grammar]``) and imported lazily.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from braid_engine.errors import GrammarUnavailableError, InvalidGrammarError


@dataclass(frozen=True)
class GuidedDecoding:
    """One constraint on a request's output; set exactly one field.

    ``json_schema`` (a dict or JSON string) forces a JSON value valid under the schema;
    ``json_object=True`` forces any JSON object; ``structural_tag`` is an xgrammar structural
    tag (a dict ``{"type": "structural_tag", "format": ...}``), e.g. free text in which every
    ``<tool_call>`` must continue as a valid call. When the constraint is complete the request
    ends with finish reason ``"stop"``.

    Example:
        >>> schema = {"type": "object", "properties": {"city": {"type": "string"}},
        ...           "required": ["city"]}
        >>> SamplingParams(max_tokens=64, guided=GuidedDecoding(json_schema=schema))
    """

    json_schema: dict[str, Any] | str | None = None
    json_object: bool = False
    structural_tag: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        chosen = [self.json_schema is not None, bool(self.json_object),
                  self.structural_tag is not None]
        if sum(chosen) != 1:
            raise InvalidGrammarError(
                "GuidedDecoding: set exactly one of json_schema, json_object=True or "
                f"structural_tag (got {sum(chosen)}).")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise InvalidGrammarError(
                f"GuidedDecoding.json_schema must be a dict or a JSON string, got "
                f"{type(self.json_schema).__name__}; convert pydantic models with "
                "Model.model_json_schema().")
        if isinstance(self.json_schema, str):
            try:
                json.loads(self.json_schema)
            except ValueError as e:
                raise InvalidGrammarError(
                    f"GuidedDecoding.json_schema is not valid JSON ({e}); pass a dict or a JSON "
                    "string (json.dumps(schema)).") from None
        if self.structural_tag is not None and not isinstance(self.structural_tag, dict):
            raise InvalidGrammarError(
                "GuidedDecoding.structural_tag must be a dict such as "
                '{"type": "structural_tag", "format": {...}}.')
        try:
            self.key()
        except (TypeError, ValueError) as e:  # a set, bytes or another object JSON cannot hold
            raise InvalidGrammarError(
                f"GuidedDecoding: the constraint must be JSON data (dicts, lists, strings, numbers), but {e}; "
                "write sets as lists.") from None

    def key(self) -> str:
        """A string naming the constraint (compiled grammars are cached by it). Key order is kept:
        the grammar writes an object's properties in the schema's order."""
        schema = self.json_schema
        if isinstance(schema, str):
            schema = json.loads(schema)
        return json.dumps([schema, self.json_object, self.structural_tag])


# Length-bounded JSON strings (minLength/maxLength, in propertyNames too). xgrammar 0.2.8 writes
# them as ``"\"" NAME{lo, hi} "\""`` with ``NAME ::= [^\"\\\r\n]`` (``"\"" [^\"\\\r\n] "\""``
# for exactly one character): no escapes, and raw U+0000-U+001F but \r \n pass, which no JSON
# parser takes. ``_fix_bounded_strings`` rewrites the grammar xgrammar prints: such a string
# becomes a chain of rules, one per character left, a character being raw (no control
# character, quote or backslash) or one escape, a surrogate pair \ud83d\ude00 being one (a lone
# surrogate escape decodes to no character: refused), so lengths count the characters of the
# decoded string, as JSON Schema does. The strings of a grammar share their chains. A chain
# costs a rule per character to compile, and xgrammar's own repetition of a character that may
# be an escape makes each mask hundreds of times slower; so past ``_CHAIN_MAX`` characters, or
# ``_CHAIN_BUDGET`` chain rules in one grammar, a string keeps xgrammar's repetition with the
# control characters taken out of its class: exact length, but no escapes (as in xgrammar).
_XGR_BOUNDED_CLASS = r'[^\"\\\r\n]'
_JSON_CHAR_CLASS = r'[^\0-\x1f\"\\]'
_HEX = "[0-9A-Fa-f]"
_JSON_ESCAPE = (  # after the backslash: one escape, one character (surrogates only paired)
    rf'([\"\\/bfnrt]) | ("u" [0-9A-Ca-cEFef] {_HEX} {_HEX} {_HEX}) | ("u" [Dd] [0-7] {_HEX} {_HEX})'
    rf' | ("u" [Dd] [89ABab] {_HEX} {_HEX} "\\u" [Dd] [C-Fc-f] {_HEX} {_HEX})')
_CHAIN_MAX = 256
_CHAIN_BUDGET = 512
# a bounded string (its rule's name and bounds, or the single-character form); else a whole
# string literal or character class, so that nothing matches inside one
# (a rule's name: xgrammar keeps a $defs name's "-" and "."; a string of at most one character is
# "\"" NAME "\"" with NAME ::= ("" | (CLASS)))
_NAME = r"[\w.\-]+"
_EBNF_TOKEN = re.compile(r'"\\"" (?:(' + _NAME + r')\{(\d+), (-?\d+)\}|(' + re.escape(_XGR_BOUNDED_CLASS)
                         + r')|(' + _NAME + r')) "\\""|"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]')
_EBNF_RULE = re.compile(r"^(" + _NAME + r")(?:\[[^\]\n]*\])? ::= ", re.M)


class _StringChains:
    """The rules of the bounded strings of one grammar: ``state(need, room)`` is a string body
    (after its opening quote) of at least ``need`` and at most ``need + room`` characters
    (``room=None``: no maximum), closing quote included."""

    def __init__(self, ebnf: str) -> None:
        names = _EBNF_RULE.findall(ebnf)
        self.prefix = "braid_jstr"
        while any(n.startswith(self.prefix) for n in names):
            self.prefix += "_"
        self.rules: dict[tuple[int, int | None], str] = {}

    def _name(self, need: int, room: int | None) -> str:
        return f"{self.prefix}_{need}_{'inf' if room is None else room}"

    def state(self, need: int, room: int | None) -> str | None:
        """The rule name, or None where the chain would pass the limits."""
        if need + (room or 0) > _CHAIN_MAX:
            return None
        keys = [(0, j) for j in range(room + 1)] if room is not None else [(0, None)]
        keys += [(k, room) for k in range(1, need + 1)]
        new = [key for key in keys if key not in self.rules]
        if len(self.rules) + len(new) > _CHAIN_BUDGET:
            return None
        for k, m in new:
            name = self._name(k, m)
            if k:
                after = self._name(k - 1, m)
            elif m is None:
                after = name
            elif m:
                after = self._name(0, m - 1)
            else:
                after = None
            body = [r'("\"")'] if k == 0 else []
            if after is not None:
                body += [f"({_JSON_CHAR_CLASS} {after})", f'("\\\\" {self.prefix}_esc {after})']
            self.rules[(k, m)] = f"{name} ::= {' | '.join(body)}"
        return self._name(need, room)

    def ebnf(self) -> str:
        if not self.rules:
            return ""
        return "\n".join([f"{self.prefix}_esc ::= {_JSON_ESCAPE}", *self.rules.values(), ""])


def _fix_bounded_strings(ebnf: str) -> str:
    """``ebnf`` (as xgrammar prints a JSON-schema grammar) with its length-bounded strings made
    JSON strings of the right length (see above); unchanged if it has none."""
    if _XGR_BOUNDED_CLASS not in ebnf:
        return ebnf
    bounded = set(re.findall(rf"^({_NAME}) ::= \(\({re.escape(_XGR_BOUNDED_CLASS)}\)\)$", ebnf, re.M))
    optional = set(re.findall(rf'^({_NAME}) ::= \("" \| \({re.escape(_XGR_BOUNDED_CLASS)}\)\)$', ebnf, re.M))
    chains = _StringChains(ebnf)

    def rewrite(m: re.Match) -> str:
        if m[5] is not None and m[5] not in optional:
            return m[0]  # a quote, some other rule, a quote
        if m[1] in bounded or m[4] or m[5]:  # a bounded string
            lo, hi = (int(m[2]), int(m[3])) if m[1] else (0, 1) if m[5] else (1, 1)
            state = chains.state(lo, None if hi < 0 else hi - lo)
            if state is not None:
                return f'"\\"" {state}'
            # kept, with the control characters out of its class: here for the one-character
            # form, in NAME's rule (the next case) for the other
            return m[0].replace(_XGR_BOUNDED_CLASS, _JSON_CHAR_CLASS)
        if m[0] == _XGR_BOUNDED_CLASS:
            return _JSON_CHAR_CLASS
        return m[0]  # any other string literal, character class or repetition

    fixed = _EBNF_TOKEN.sub(rewrite, ebnf)
    return fixed.rstrip("\n") + "\n" + chains.ebnf() if chains.rules else fixed


# JSON Schema keywords xgrammar 0.2.8 leaves unenforced (it logs a warning at most): a value the
# grammar lets through would break them, so a schema using them is refused. (uniqueItems is not
# enforced either, but kept: pydantic writes it for sets, and parsing a set takes duplicates.)
_UNENFORCED = ("not", "contains", "minContains", "maxContains", "dependentRequired", "dependentSchemas",
               "dependencies", "if", "then", "else", "multipleOf", "unevaluatedProperties", "unevaluatedItems")
# where the subschemas of a schema the grammar takes sit (those under refused keywords are never reached)
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("additionalProperties", "items", "propertyNames", "additionalItems")


def enforceable_schema(schema: Any, path: str = "#") -> Any:
    """``schema`` as the grammar can enforce it: a required property missing from ``properties``
    gets the schema extra properties take (xgrammar ignored it: ``{}`` passed ``required: ["a"]``),
    an enum of strings keeps the values its length bounds allow; raises InvalidGrammarError,
    naming the place, for a keyword no grammar here enforces (see ``_UNENFORCED``), ``allOf`` with
    more than one schema, or a required property that extra properties cannot be."""
    if isinstance(schema, list):
        return [enforceable_schema(s, f"{path}/{i}") for i, s in enumerate(schema)]
    if not isinstance(schema, dict):
        return schema
    bad = [k for k in _UNENFORCED if k in schema]
    if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        bad.append("allOf (with more than one schema)")
    if bad:
        raise InvalidGrammarError(
            f"the JSON schema uses {', '.join(bad)} at {path}, which guided decoding cannot enforce "
            "(its output could break them); rewrite the schema without them (e.g. merge allOf's "
            "schemas into one), or validate those rules after generation.")
    out = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            value = {name: enforceable_schema(v, f"{path}/{key}/{name}") for name, v in value.items()}
        elif key in _SUBSCHEMA_LISTS or key in _SUBSCHEMAS:
            value = enforceable_schema(value, f"{path}/{key}")
        out[key] = value
    required = out.get("required")
    if isinstance(required, list) and required:
        props = out.get("properties") if isinstance(out.get("properties"), dict) else {}
        missing = [name for name in required if isinstance(name, str) and name not in props]
        if missing:
            extra = out.get("additionalProperties", True)
            if extra is False:
                raise InvalidGrammarError(
                    f"the JSON schema at {path} requires {missing} but allows no property of those "
                    "names (additionalProperties is false); no object satisfies it.")
            out["properties"] = {**props, **{name: extra if isinstance(extra, dict) else {} for name in missing}}
    enum = out.get("enum")
    if isinstance(enum, list) and ("minLength" in out or "maxLength" in out):
        lo, hi = out.get("minLength", 0), out.get("maxLength")
        kept = [v for v in enum if not isinstance(v, str) or lo <= len(v) and (hi is None or len(v) <= hi)]
        if not kept:
            raise InvalidGrammarError(f"the JSON schema at {path}: no value of its enum fits minLength/maxLength.")
        out["enum"] = kept
    return out


def json_schema_grammar(xgr: Any, schema: dict[str, Any] | str) -> Any:
    """xgrammar's grammar for ``schema`` as compact JSON (``", "`` / ``": "`` separators: what
    chat templates' tojson renders back), its length-bounded strings fixed (see above); refused
    where it cannot be enforced (``enforceable_schema``)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    schema = json.dumps(enforceable_schema(schema))
    grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=False, separators=(", ", ": "))
    ebnf = str(grammar)
    fixed = _fix_bounded_strings(ebnf)
    return grammar if fixed == ebnf else xgr.Grammar.from_ebnf(fixed)


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise GrammarUnavailableError(
            "guided decoding (tool calling, structured output) needs the optional xgrammar "
            "package; install it with `pip install 'langchain-braid[grammar]'`.") from e
    return xgrammar


# compiled grammars kept (least recently used go first), and the bytes xgrammar's own cache keeps
COMPILED_KEPT = 256
_XGR_CACHE_BYTES = 512 << 20


class GrammarRuntime:
    """Compiles constraints for one tokenizer and computes token masks for a batch.

    Masks cover the model's vocabulary: ids past the tokenizer's (padding rows) are never
    allowed. Thread-safe: requests compile on the caller's thread, masks run on the engine's.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        xgr = _xgrammar()
        self._xgr = xgr
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_limit_bytes=_XGR_CACHE_BYTES)
        self._compiled: OrderedDict[str, Any] = OrderedDict()  # the latest COMPILED_KEPT, least recent first
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def compile(self, guided: GuidedDecoding) -> Any:
        """The compiled grammar of ``guided`` (cached); raises InvalidGrammarError if invalid."""
        key = guided.key()
        with self._lock:
            hit = self._compiled.get(key)
            if hit is not None:
                self._compiled.move_to_end(key)
        if hit is not None:
            return hit
        try:
            if guided.json_object or guided.json_schema is not None:
                schema = {"type": "object"} if guided.json_object else guided.json_schema
                compiled = self._compiler.compile_grammar(json_schema_grammar(self._xgr, schema))
            else:
                tag = self._compact(guided.structural_tag)
                compiled = self._compiler.compile_structural_tag(tag)
        except InvalidGrammarError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/pydantic errors alike
            raise InvalidGrammarError(
                f"the guided-decoding constraint could not be compiled: {e}; check the JSON "
                "schema (or structural tag) is valid.") from e
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > COMPILED_KEPT:  # a schema per request (its own enum) adds up
                self._compiled.popitem(last=False)
        return compiled

    def _compact(self, node: Any) -> Any:
        """``node`` with each JSON-schema format turned into a grammar format of compact JSON
        (xgrammar's own allows any whitespace, which random or weak models fill forever) whose
        length-bounded strings are fixed (``json_schema_grammar``)."""
        if isinstance(node, list):
            return [self._compact(n) for n in node]
        if not isinstance(node, dict):
            return node
        if node.get("type") == "json_schema" and node.get("style", "json") == "json" \
                and not node.get("excludes") and "json_schema" in node:
            grammar = json_schema_grammar(self._xgr, node["json_schema"])
            return {"type": "grammar", "grammar": str(grammar)}
        return {k: self._compact(v) for k, v in node.items()}

    def matcher(self, guided: GuidedDecoding) -> Any:
        """A fresh matcher (one per request) at the start of ``guided``'s grammar."""
        return self._xgr.GrammarMatcher(self.compile(guided))

    def fill(self, matchers: list[Any]) -> torch.Tensor:
        """Bitmask [len(matchers), ceil(V/32)] of the tokens each matcher allows next."""
        bitmask, failed = self.fill_each(matchers)
        if failed:
            raise next(iter(failed.values()))
        return bitmask

    def fill_each(self, matchers: list[Any]) -> tuple[torch.Tensor, dict[int, Exception]]:
        """``fill``, where a matcher that raises fails alone: the bitmask (its row allowing any
        token) and each failed matcher's index with its error."""
        bitmask = self._xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        failed = {}
        for i, m in enumerate(matchers):
            try:
                m.fill_next_token_bitmask(bitmask, i)
                if not bitmask[i].any():  # a dead end: no token continues the grammar, none ends it
                    raise InvalidGrammarError(
                        "the guided-decoding constraint allows no next token: nothing satisfies the schema "
                        "(e.g. a $ref to itself and nothing else); fix the schema.")
            except Exception as e:  # that request fails, not the step's others
                bitmask[i] = -1
                failed[i] = e
        return bitmask, failed

    def fill_async(self, matchers: list[Any]) -> Future:
        """``fill_each`` on a helper thread, so it runs while the forward pass does."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="braid-grammar")
        return self._pool.submit(self.fill_each, matchers)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Set logits[rows[i]] to -inf wherever bitmask[i] disallows the token (in place)."""
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=bitmask.dtype)
        full[rows] = bitmask
        self._xgr.apply_token_bitmask_inplace(logits, full.to(logits.device),
                                              vocab_size=self.vocab_size, indices=rows)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
