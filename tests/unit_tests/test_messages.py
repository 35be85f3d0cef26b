"""Message conversion, prompt rendering with token-id splicing, and reasoning parsing."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from braid_engine.testing import build_tokenizer
from langchain_braid import TOKEN_IDS_KEY, UnsupportedContentError
from langchain_braid._messages import render, to_template_dict
from langchain_braid._thinking import ReasoningParser, split_reasoning


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("qwen3")


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_roles_names_lists_and_tool_calls() -> None:
    ai = AIMessage(content=[{"type": "reasoning", "reasoning": "hm"}, {"type": "text", "text": "Hi"}],
                   tool_calls=[{"name": "f", "args": {"x": 1}, "id": "c1"}])
    assert to_template_dict(SystemMessage("s")) == {"role": "system", "content": "s"}
    assert to_template_dict(HumanMessage(["a", {"type": "text", "text": "b"}], name="bob")) == {
        "role": "user", "content": "a\nb", "name": "bob"}
    assert to_template_dict(ai) == {
        "role": "assistant", "content": "Hi", "reasoning_content": "hm",
        "tool_calls": [{"type": "function", "id": "c1", "function": {"name": "f", "arguments": {"x": 1}}}]}
    assert to_template_dict(ToolMessage("42", tool_call_id="c1")) == {
        "role": "tool", "content": "42", "tool_call_id": "c1"}


def test_media_is_a_typed_error() -> None:
    image = HumanMessage([{"type": "text", "text": "what is this?"},
                          {"type": "image", "url": "https://example.com/cat.png"}])
    with pytest.raises(UnsupportedContentError, match="text-only"):
        to_template_dict(image)


def test_json_blocks_of_a_tool_result_are_json_text() -> None:
    """A tool may return [{"type": "json", "json": {...}}], one of LangChain's tool-result
    blocks: it was refused as media a text-only model cannot read. It is now the JSON's text."""
    from langchain_core.tools import tool

    @tool
    def lookup(key: str) -> list:
        """Look a key up."""
        return [{"type": "text", "text": "Found:"}, {"type": "json", "json": {"key": key, "n": [1, 2]}}]

    result = lookup.invoke({"name": "lookup", "args": {"key": "é"}, "id": "c1", "type": "tool_call"})
    assert to_template_dict(result) == {
        "role": "tool", "content": 'Found:\n{"key": "é", "n": [1, 2]}', "tool_call_id": "c1",
        "name": "lookup"}


def _thread(tok, answer_ids: list[int], content: str | None = None) -> list:
    text = content if content is not None else tok.decode(answer_ids, skip_special_tokens=True)
    return [SystemMessage("You are a helpful assistant."), HumanMessage("Hello!"),
            AIMessage(text, response_metadata={TOKEN_IDS_KEY: answer_ids}),
            HumanMessage("Tell me a story")]


def test_carried_ids_are_spliced_where_the_text_matches(tok) -> None:
    # ids no fresh tokenization would produce: "Hello" spelt one byte-token at a time, then end of turn
    answer = [tok.convert_tokens_to_ids(c) for c in "Hello"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert _encode(tok, "Hello") != answer[:-1]
    prompt = render(tok, _thread(tok, answer))
    ids = prompt.token_ids(tok)
    assert tok.decode(ids, skip_special_tokens=False) == prompt.text  # text never changes
    head = _encode(tok, prompt.text[: prompt.text.index("Hello<|im_end|>")])
    assert ids[: len(head) + len(answer)] == head + answer


@pytest.mark.parametrize("bad", [[2**40], [-1], ["vocab"], [1.0], ["7"], [True], [72, None],
                                 ["ok", 2**40]])
def test_carried_ids_that_are_no_token_ids_are_not_spliced(tok, bad: list) -> None:
    """Carried ids come back from wherever the history was kept (a checkpointer's JSON, a message
    built by hand): 2**40 made the tokenizer's decode raise a bare OverflowError. Ids out of the
    model's vocabulary, or not ints, are no answer's ids: the message is tokenised from its text.
    The model's vocabulary may pass the tokenizer's (padding rows), and its ids stay carried."""
    vocab = len(tok) + 42
    good = [tok.convert_tokens_to_ids(c) for c in "Hello"]
    ids = [vocab if t == "vocab" else t for t in bad]
    ids = good + ids[1:] if ids[0] == "ok" else ids
    prompt = render(tok, _thread(tok, ids, content="Hello"), vocab_size=vocab)
    assert prompt.spans == []
    assert prompt.token_ids(tok) == _encode(tok, prompt.text)
    for kept in (good, good + [len(tok)]):  # a padding row's id decodes to nothing
        (_, _, spliced), = render(tok, _thread(tok, kept, content="Hello"), vocab_size=vocab).spans
        assert spliced == kept


def test_edited_answer_is_retokenised(tok) -> None:
    answer = [tok.convert_tokens_to_ids(c) for c in "Hello"]
    prompt = render(tok, _thread(tok, answer, content="Hello, edited"))
    assert prompt.spans == []
    assert prompt.token_ids(tok) == _encode(tok, prompt.text)


def test_a_user_echoing_the_answer_is_not_spliced(tok) -> None:
    answer = [tok.convert_tokens_to_ids(c) for c in "Hi"]
    messages = [HumanMessage("Hi"), AIMessage("Hi", response_metadata={TOKEN_IDS_KEY: answer}),
                HumanMessage("again")]
    prompt = render(tok, messages)
    (start, _, _), = prompt.spans
    assert prompt.text[:start].endswith("<|im_start|>assistant\n")


def test_dropped_think_block_ends_reuse_after_the_role_header(tok) -> None:
    generated = "<think>\nhmm\n</think>\n\nHi<|im_end|>"
    ids = _encode(tok, generated)
    ai = AIMessage("Hi", additional_kwargs={"reasoning_content": "hmm"},
                   response_metadata={TOKEN_IDS_KEY: ids})
    earlier = render(tok, [HumanMessage("a"), ai, HumanMessage("b")])
    assert earlier.spans == []  # the template drops reasoning of earlier turns
    in_tool_loop = render(tok, [HumanMessage("a"), ai, ToolMessage("r", tool_call_id="1")])
    assert [s[2] for s in in_tool_loop.spans] == [ids]  # after the last query it is kept verbatim


def _conversation(tok, turns: int, system: str) -> list:
    """A chat whose every answer carries the ids it was generated as (spelt byte by byte, which
    no fresh tokenization produces), as ChatBraid's answers do."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [SystemMessage(system)]
    for t in range(turns):
        messages.append(HumanMessage(f"question {t}: how many {t * 7 % 13} apples?"))
        answer = f"{t} apples"
        ids = [tok.convert_tokens_to_ids(c) for c in answer.replace(" ", "Ġ")] + [end]
        messages.append(AIMessage(answer, response_metadata={TOKEN_IDS_KEY: ids}))
    return messages


def _unremembered(tok, messages) -> tuple[str, list[int]]:
    """render() with nothing remembered: what every turn computed before the memo."""
    import langchain_braid._messages as m

    saved, m._MEMOS = m._MEMOS, m.weakref.WeakKeyDictionary()
    try:
        m._Memo.limit = 0
        prompt = render(tok, messages)
        return prompt.text, prompt.token_ids(tok)
    finally:
        m._Memo.limit, m._MEMOS = 8 << 20, saved


def test_remembered_pieces_give_the_same_prompt_ids(tok) -> None:
    system = "You answer questions about apples. " * 40
    for turns in range(1, 7):
        messages = _conversation(tok, turns, system) + [HumanMessage("and now?")]
        prompt = render(tok, messages)
        ids = prompt.token_ids(tok)
        assert (prompt.text, ids) == _unremembered(tok, messages)
        assert len(prompt.spans) == turns  # every carried answer spliced
        assert tok.decode(ids, skip_special_tokens=False) == prompt.text


def test_a_later_turn_tokenises_and_renders_only_what_is_new(tok, monkeypatch) -> None:
    """A long system prompt and earlier questions come back every turn: the next turn encodes
    only the text after the last answer and renders the template twice (the whole prompt, and
    the messages before its newest answer), not once per answer."""
    import langchain_braid._messages as m

    system = "You answer questions about apples, pears and plums, briefly and kindly. " * 60
    messages = _conversation(tok, 6, system)
    render(tok, messages + [HumanMessage("first")]).token_ids(tok)  # the turn before
    encoded, renders = [], []
    calls = tok.__class__.__call__

    def counting_call(self, text, *args, **kwargs):
        encoded.append(text)
        return calls(self, text, *args, **kwargs)

    render_chat = m.render_chat
    monkeypatch.setattr(tok.__class__, "__call__", counting_call)
    monkeypatch.setattr(m, "render_chat", lambda *a, **k: renders.append(1) or render_chat(*a, **k))
    question = "what about the pears I asked of before?"
    messages = messages + [HumanMessage("first"), AIMessage(
        "6 apples", response_metadata={TOKEN_IDS_KEY: _conversation(tok, 7, system)[-1]
                                       .response_metadata[TOKEN_IDS_KEY]}), HumanMessage(question)]
    render(tok, messages).token_ids(tok)
    assert sum(map(len, encoded)) < len(question) + 100 < len(system)
    assert len(renders) == 2


def test_the_memo_forgets_the_least_recently_used_past_its_limit(monkeypatch) -> None:
    from langchain_braid._messages import _Memo

    monkeypatch.setattr(_Memo, "limit", 30)
    memo = _Memo()
    assert memo.get("a" * 8, lambda: (1, 2)) == (1, 2)  # 10
    assert memo.get("b" * 8, lambda: (3, 4)) == (3, 4)  # 20
    assert memo.get("a" * 8, lambda: (9, 9)) == (1, 2)  # remembered; now the most recent
    memo.get("c" * 8, lambda: (5, 6))  # 30
    memo.get("d" * 8, lambda: (7, 8))  # 40 > 30: "b…" goes, the least recently used
    assert list(memo._items) == ["a" * 8, "c" * 8, "d" * 8]
    assert memo.get("a" * 8, lambda: "recomputed") == (1, 2)
    assert memo.get("b" * 8, lambda: "recomputed") == "recomputed"
    assert memo._size <= 30
    assert memo.get("x" * 40, lambda: (0,)) == (0,) and "x" * 40 not in memo._items  # too large to keep


def test_prefix_keys_follow_the_template_its_arguments_and_each_message() -> None:
    from langchain_braid._messages import _prefix_keys

    dicts = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    keys = _prefix_keys("T", dicts, {})
    assert len(set(keys)) == 3 and keys[:2] == _prefix_keys("T", dicts[:1], {})  # chained
    assert _prefix_keys("T2", dicts, {})[1] != keys[1]  # a user who swaps the template
    assert _prefix_keys("T", dicts, {"enable_thinking": False})[1] != keys[1]
    assert _prefix_keys("T", dicts, {"f": object()}) is None  # not JSON: nothing remembered


@pytest.mark.parametrize("text, opened, expected", [
    ("<think>\nhmm\n</think>\n\nHi", False, ("hmm", "Hi")),
    ("  plain answer\n", False, ("", "  plain answer\n")),
    ("\nhmm\n</think>\n\nHi", True, ("hmm", "Hi")),
    ("<think>\nunfinished\n", False, ("unfinished", "")),
    ("<thin", False, ("", "<thin")),
])
def test_split_reasoning(text: str, opened: bool, expected: tuple[str, str]) -> None:
    assert split_reasoning(text, thinking=opened) == expected


@given(st.lists(st.sampled_from(["<think>", "</think>", "<th", "ink>", "\n", "a", " b", "</", "</thi",
                                 "nk>"]), max_size=12),
       st.lists(st.integers(0, 60), max_size=6))
def test_streamed_reasoning_equals_whole(pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    parser = ReasoningParser()
    reasoning, answer = "", ""
    for a, b in pairwise(bounds):
        r, s = parser.feed(text[a:b])
        reasoning, answer = reasoning + r, answer + s
    r, s = parser.finish()
    assert (reasoning + r, answer + s) == split_reasoning(text)


@pytest.fixture(scope="module")
def llama_tok():
    return build_tokenizer("llama")


_PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<think>", "\n", " ", "  ",
           "user", "system\n", "Hello", " world", "apples,", "ünï", "\t", "x"]


@pytest.mark.parametrize("which", ["tok", "llama_tok"])
@given(st.lists(st.sampled_from(_PIECES), max_size=24))
def test_cutting_before_special_tokens_keeps_the_ids(request, which, pieces: list[str]) -> None:
    """The prompt's text is encoded in pieces cut before each special token: always the ids of
    encoding it whole."""
    import langchain_braid._messages as m

    tokenizer = request.getfixturevalue(which)
    text = "".join(pieces)
    assert list(m._encode(tokenizer, text)) == _encode(tokenizer, text)


def test_a_whole_word_token_is_not_cut_before() -> None:
    """A ``single_word`` special token after a word character is no token when the whole text
    is encoded; cut before, it would start a piece and match."""
    from tokenizers import AddedToken

    import langchain_braid._messages as m

    tokenizer = build_tokenizer("qwen3")
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken("<t>", single_word=True, special=True, normalized=False)]})
    assert m._special_splitter(tokenizer).split("ab<t> c<|im_end|>") == ["ab<t> c", "<|im_end|>"]
    for text in ("ab<t>", "ab<t> c", "a <t> b<|im_start|>x<t>"):
        assert list(m._encode(tokenizer, text)) == _encode(tokenizer, text)


def test_a_token_that_takes_the_space_before_it_is_not_cut_before() -> None:
    from tokenizers import AddedToken

    import langchain_braid._messages as m

    tokenizer = build_tokenizer("qwen3")
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<sep>", lstrip=True, special=True)]})
    splitter = m._special_splitter(tokenizer)
    assert splitter.split("a <|im_start|>b") == ["a ", "<|im_start|>b"]
    assert splitter.split("a <sep>b") == ["a <sep>b"]
    text = "x  <sep>y <|im_end|> z"
    assert list(m._encode(tokenizer, text)) == _encode(tokenizer, text)


def test_a_turn_after_answers_that_are_not_spliced_still_encodes_only_what_is_new(tok, monkeypatch) -> None:
    """Answers the template re-renders (their reasoning dropped) cannot be spliced, so the text
    around them is tokenised afresh, but not the system prompt and earlier questions: each
    message's text is remembered on its own."""
    system = "You answer questions about apples, pears and plums, briefly and kindly. " * 60
    messages = [SystemMessage(system)]
    for t in range(4):
        generated = f"<think>\nturn {t}\n</think>\n\n{t} apples<|im_end|>"
        messages += [HumanMessage(f"question {t}?"), AIMessage(
            f"{t} apples", additional_kwargs={"reasoning_content": f"turn {t}"},
            response_metadata={TOKEN_IDS_KEY: _encode(tok, generated)})]
    first = render(tok, messages + [HumanMessage("first")])
    assert first.spans == []
    assert first.token_ids(tok) == _encode(tok, first.text)
    encoded = []
    calls = tok.__class__.__call__

    def counting_call(self, text, *args, **kwargs):
        encoded.append(text)
        return calls(self, text, *args, **kwargs)

    monkeypatch.setattr(tok.__class__, "__call__", counting_call)
    question = "and the pears?"
    later = render(tok, messages + [HumanMessage("first"), AIMessage("5 apples"), HumanMessage(question)])
    ids = later.token_ids(tok)
    assert sum(map(len, encoded)) < 200 < len(system)
    monkeypatch.undo()
    assert ids == _encode(tok, later.text)
