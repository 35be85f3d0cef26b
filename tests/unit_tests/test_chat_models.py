"""Standard LangChain unit tests, plus construction and option handling (no weights loaded)."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_braid import ChatBraid
from langchain_braid import chat_models as cm
from tests.tiny import BraidCapabilities, tiny_qwen3


class TestChatBraidUnit(BraidCapabilities, ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatBraid]:
        return ChatBraid

    @property
    def chat_model_params(self) -> dict:
        return {"model": tiny_qwen3(), "device": "cpu"}


def test_construction_loads_nothing(tiny_model: str) -> None:
    before = dict(cm._ENGINES)
    chat = ChatBraid(model_name=tiny_model, device="cpu", engine_kwargs={"max_model_len": 512})
    assert chat.model == tiny_model
    assert cm._ENGINES == before
    assert chat.profile["max_input_tokens"] == 512
    assert chat.profile["tool_calling"] is True and chat.profile["reasoning_output"] is True


def test_profile_context_limit_is_the_one_the_pool_allows(tiny_model: str) -> None:
    """A pool of 24 pages of 16 tokens holds a 368-token context (one page is kept spare), but
    the profile said 4096 (max_position_embeddings) and a 400-token prompt was refused. With
    num_pages fixed the limit is known before anything loads."""
    before = dict(cm._ENGINES)
    chat = ChatBraid(model=tiny_model, device="cpu", engine_kwargs={"num_pages": 24})
    assert chat.profile["max_input_tokens"] == 23 * 16
    small = ChatBraid(model=tiny_model, device="cpu", engine_kwargs={"num_pages": 24, "page_size": 4})
    assert small.profile["max_input_tokens"] == 23 * 4
    capped = ChatBraid(model=tiny_model, device="cpu", engine_kwargs={"num_pages": 400})
    assert capped.profile["max_input_tokens"] == 4096  # the model's own limit still caps it
    assert cm._ENGINES == before


def test_identifying_and_ls_params(tiny_model: str) -> None:
    chat = ChatBraid(model=tiny_model, temperature=0.2, max_tokens=7, stop=["x"], seed=3)
    assert chat._llm_type == "braid-chat"
    assert chat._identifying_params["seed"] == 3
    ls = chat._get_ls_params()
    assert ls == {"ls_provider": "braid", "ls_model_type": "chat", "ls_model_name": tiny_model,
                  "ls_temperature": 0.2, "ls_max_tokens": 7, "ls_stop": ["x"]}


def test_token_counting_uses_the_checkpoint_tokenizer(tiny_model: str) -> None:
    from braid_engine.loader import load_tokenizer, resolve_model_path

    chat = ChatBraid(model=tiny_model)
    tok = load_tokenizer(resolve_model_path(tiny_model))
    assert chat.get_token_ids("The quick brown fox") == tok("The quick brown fox")["input_ids"]
    messages = [HumanMessage("hello there"), HumanMessage("again")]
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hello there"}, {"role": "user", "content": "again"}],
        tokenize=False, add_generation_prompt=True)  # as a call sends it
    expected = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert chat.get_num_tokens_from_messages(messages) == expected


def test_unknown_call_option_is_a_clear_error(tiny_model: str) -> None:
    chat = ChatBraid(model=tiny_model, device="cpu", max_tokens=2)
    with pytest.raises(TypeError, match="unknown call options \\['logit_bias'\\]"):
        chat.invoke("hi", logit_bias={1: 5.0})


def test_call_options_of_the_wrong_kind_are_clear_errors(tiny_model: str) -> None:
    """chat_template_kwargs="x" failed with a bare "'str' object is not a mapping";
    enable_prefix_caching="no" (and enable_thinking="no") passed as true; tool_choice="any"
    without tools was dropped silently, the answer free text. Each is refused, naming the
    option, before anything loads."""
    kwargs = {"max_num_seqs": 13}  # an engine of this test's own: it must not load
    chat = ChatBraid(model=tiny_model, device="cpu", max_tokens=2, engine_kwargs=kwargs)
    with pytest.raises(TypeError, match="chat_template_kwargs must be a dict of template variables, got 'x'"):
        chat.invoke("hi", chat_template_kwargs="x")
    with pytest.raises(TypeError, match="enable_prefix_caching must be True or False, got 'no'"):
        chat.invoke("hi", enable_prefix_caching="no")
    with pytest.raises(TypeError, match="enable_thinking must be True, False or None, got 'no'"):
        chat.bind(enable_thinking="no").invoke("hi")
    for choice in ("any", "required", {"type": "any"}, {"type": "function", "function": {"name": "f"}}):
        with pytest.raises(ValueError, match="tool_choice=.* no tools are bound"):
            chat.invoke("hi", tool_choice=choice)
    with pytest.raises(ValueError, match="tool_choice='any' .* no tools are bound"):
        chat.bind_tools([], tool_choice="any")
    assert not any(key[3] == '{"max_num_seqs": 13}' for key in cm._ENGINES)
    for choice in ("auto", "none", None, False):  # nothing to force: as without tool_choice
        assert chat.invoke("hi", tool_choice=choice).usage_metadata["output_tokens"] >= 1
    chat.llm.shutdown()


def test_unknown_constructor_argument_is_an_error_not_ignored(tiny_model: str) -> None:
    """ChatBraid(min_p=0.1) or a misspelt max_new_tokens=... was silently dropped: the model
    ran without it. Options the model does not have are refused, as they are per call."""
    from pydantic import ValidationError

    for bad in ({"min_p": 0.1}, {"max_new_tokens": 5}, {"model_kwargs": {"top_k": 3}}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ChatBraid(model=tiny_model, **bad)
    assert ChatBraid(model=tiny_model, max_tokens=5, callbacks=None, tags=["x"]).max_tokens == 5


def test_trim_messages_keeps_what_fits_the_prompt(tiny_model: str) -> None:
    """Counts are of the prompt a call sends, generation prompt included (it was left out, so a
    history trimmed to the budget overflowed it by those tokens). strategy="first" counts each
    leading run as it is sent: exact. strategy="last" with include_system counts the system
    message apart and the rest reversed, each with a generation prompt: it keeps what fits,
    with a few tokens to spare."""
    from langchain_core.messages import AIMessage, SystemMessage, trim_messages

    chat = ChatBraid(model=tiny_model)
    count = chat.get_num_tokens_from_messages
    messages = [SystemMessage("You are a helpful assistant."), HumanMessage("Question 0?"),
                AIMessage("It is 0."), HumanMessage("Question 1: what is 1 plus 1?")]
    rendered = chat.tokenizer.apply_chat_template(
        [{"role": m.type.replace("human", "user").replace("ai", "assistant"), "content": m.content}
         for m in messages], tokenize=False, add_generation_prompt=True)
    assert count(messages) == len(chat.get_token_ids(rendered))
    for n in range(1, len(messages) + 1):
        budget = count(messages[:n])
        assert trim_messages(messages, max_tokens=budget, token_counter=chat, strategy="first") == messages[:n]
        assert trim_messages(messages, max_tokens=budget - 1, token_counter=chat,
                             strategy="first") == messages[:n - 1]
    kept = messages[:1] + messages[2:]
    for budget in range(count(messages[:1]), count(messages) + 1):
        trimmed = trim_messages(messages, max_tokens=budget, token_counter=chat, strategy="last",
                                include_system=True)
        assert trimmed[0] == messages[0] and count(trimmed) <= budget
        if budget >= count(kept) + 12:
            assert trimmed[-2:] == kept[-2:]
