"""ChatBraid on a tiny random Qwen3: conversation memory served from retained KV, streaming,
reasoning, async, thread pins. Greedy decoding everywhere, so outputs have exact references."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from braid_engine import RequestOutput
from langchain_braid import TOKEN_IDS_KEY, ChatBraid, chat_models
from langchain_braid._messages import render

_fresh = itertools.count()


def _system() -> SystemMessage:
    """A long, unique system prompt (a RAG context): unique so no earlier test warmed it."""
    doc = "Paged attention stores keys and values in fixed-size pages. " * 6
    return SystemMessage(f"Context {next(_fresh)}: {doc}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture
def chat(tiny_model: str) -> ChatBraid:
    return ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=12)


def _prompt_ids(chat: ChatBraid, messages: list[BaseMessage], **template: Any) -> list[int]:
    return render(chat.tokenizer, messages, template_kwargs=template).token_ids(chat.tokenizer)


def test_five_turns_reuse_the_kv_of_every_answer(chat: ChatBraid) -> None:
    uncached = chat.model_copy(update={"enable_prefix_caching": False})
    questions = ["Hello! How are you today?", "What is the weather like in Paris?",
                 "Tell me a story about a robot.", "Numbers: 1 2 3?", "Thank you."]
    system = _system()
    thread: list[BaseMessage] = [system]
    reference: list[BaseMessage] = [system]
    previous: tuple[list[int], list[int]] | None = None  # last turn's prompt and answer ids
    chat.llm.engine.clear_cache()  # turn 1 then shares nothing with earlier tests
    for turn, question in enumerate(questions, 1):
        thread.append(HumanMessage(question))
        reference.append(HumanMessage(question))
        prompt = _prompt_ids(chat, thread)
        answer = chat.invoke(thread)
        plain = uncached.invoke(reference)
        assert (answer.content, answer.response_metadata[TOKEN_IDS_KEY]) == (
            plain.content, plain.response_metadata[TOKEN_IDS_KEY])
        usage = answer.usage_metadata
        assert usage["input_tokens"] == len(prompt) == plain.usage_metadata["input_tokens"]
        assert plain.usage_metadata["input_token_details"]["cache_read"] == 0
        if previous is None:
            assert usage["input_token_details"]["cache_read"] == 0
        else:
            # the whole last prompt and answer, except the final token whose KV was never computed
            expected = len(previous[0]) + len(previous[1]) - 1
            assert prompt[:expected + 1] == previous[0] + previous[1]
            assert usage["input_token_details"]["cache_read"] == expected
            assert expected >= 0.8 * usage["input_tokens"], turn
        previous = (prompt, answer.response_metadata[TOKEN_IDS_KEY])
        thread.append(answer)
        reference.append(plain)


def test_edited_history_reuses_the_longest_common_prefix(chat: ChatBraid) -> None:
    thread = [_system(), HumanMessage("Hello!")]
    first_prompt = _prompt_ids(chat, thread)
    answer = chat.invoke(thread)
    cached = first_prompt + answer.response_metadata[TOKEN_IDS_KEY][:-1]
    edited = answer.model_copy(update={"content": "An edited answer."})
    thread += [edited, HumanMessage("And then?")]
    prompt = _prompt_ids(chat, thread)
    second = chat.invoke(thread)
    expected = _common_prefix(cached, prompt)
    assert len(first_prompt) <= expected < len(cached)
    assert second.usage_metadata["input_token_details"]["cache_read"] == expected


def test_without_thinking_reuse_ends_after_the_assistant_header(chat: ChatBraid) -> None:
    quiet = chat.model_copy(update={"enable_thinking": False})
    thread = [_system(), HumanMessage("Hello!")]
    first_prompt = _prompt_ids(quiet, thread, enable_thinking=False)
    answer = quiet.invoke(thread)
    thread += [answer, HumanMessage("And then?")]
    second = quiet.invoke(thread)
    text = render(quiet.tokenizer, thread[:2], template_kwargs={"enable_thinking": False}).text
    header_end = text.rindex("<think>")  # the empty think block is dropped from earlier turns
    expected = len(quiet.get_token_ids(text[:header_end]))
    assert expected < len(first_prompt)
    assert second.usage_metadata["input_token_details"]["cache_read"] == expected


def test_pinned_thread_survives_cache_clearing(chat: ChatBraid) -> None:
    thread = [_system(), HumanMessage("Hello!")]
    thread.append(chat.invoke(thread))
    pinned = chat.pin_thread("t-1", thread)
    thread.append(HumanMessage("Still there?"))
    prompt = _prompt_ids(chat, thread)
    assert pinned == _common_prefix(prompt, prompt[:pinned])
    chat.llm.engine.clear_cache()
    assert chat.invoke(thread).usage_metadata["input_token_details"]["cache_read"] == pinned
    assert chat.release_thread("t-1") is True
    assert chat.release_thread("t-1") is False
    chat.llm.engine.clear_cache()
    assert chat.invoke(thread).usage_metadata["input_token_details"]["cache_read"] == 0


def test_a_pinned_agent_thread_is_rendered_with_its_tools(chat: ChatBraid) -> None:
    """An agent's prompts carry its tools (the template appends them to the system turn); a pin
    rendered without them kept only the system prompt's text resident, none of the history."""

    def lookup(term: str) -> str:
        """Look a term up."""
        return term

    agent = chat.bind_tools([lookup])
    thread = [_system(), HumanMessage("Hello!")]
    thread.append(agent.invoke(thread))
    pinned = chat.pin_thread("t-tools", thread, tools=[lookup])
    thread.append(HumanMessage("Still there?"))
    chat.llm.engine.clear_cache()
    assert agent.invoke(thread).usage_metadata["input_token_details"]["cache_read"] == pinned > 100
    assert chat.release_thread("t-tools") is True


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def test_stream_matches_invoke_and_calls_back_per_chunk(chat: ChatBraid) -> None:
    messages = [_system(), HumanMessage("Tell me a story")]
    reference = chat.model_copy(update={"enable_prefix_caching": False}).invoke(messages)
    handler = _Tokens()
    chunks = list(chat.stream(messages, config={"callbacks": [handler]}))
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert full.content == reference.content
    assert full.response_metadata[TOKEN_IDS_KEY] == reference.response_metadata[TOKEN_IDS_KEY]
    assert full.usage_metadata["output_tokens"] == reference.usage_metadata["output_tokens"]
    assert handler.tokens == [c.content for c in chunks]
    assert len(chunks) == reference.usage_metadata["output_tokens"]  # a chunk per token
    assert chunks[-1].chunk_position == "last"
    assert all(c.usage_metadata is None for c in chunks[:-1])


async def test_astream_leaves_the_event_loop_free(chat: ChatBraid) -> None:
    messages = [_system(), HumanMessage("Tell me a story")]
    reference = await chat.model_copy(update={"enable_prefix_caching": False}).ainvoke(messages)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    text, seen = "", []
    async for chunk in chat.astream(messages):
        text += chunk.content
        seen.append(ticks)
    done.set()
    await task
    assert text == reference.content
    assert seen[-1] > seen[0]  # the loop ran other work while tokens were being generated


def _schema(title: str) -> dict[str, Any]:
    """A schema no earlier request compiled (grammars are cached by schema)."""
    return {"title": title, "type": "object", "required": ["n"],
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.mark.parametrize("method", ["ainvoke", "astream"])
async def test_async_calls_set_up_and_compile_grammars_off_the_event_loop(
        tiny_model: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first guided request builds the grammar runtime (xgrammar's tokenizer info: ~1.1 s
    for a 150k-token vocabulary) and each new schema compiles (10-20 ms); both ran on the event
    loop's thread, stalling every other task on it. They, the rendering and the submission now
    run on a worker thread."""
    from braid_engine.engine.engine import LLMEngine
    from braid_engine.grammar import GrammarRuntime

    threads: dict[str, set[int]] = {"runtime": set(), "compile": set(), "add_request": set()}

    def recorded(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads[name].add(threading.get_ident())
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(GrammarRuntime, "__init__", recorded("runtime", GrammarRuntime.__init__))
    monkeypatch.setattr(GrammarRuntime, "compile", recorded("compile", GrammarRuntime.compile))
    monkeypatch.setattr(LLMEngine, "add_request", recorded("add_request", LLMEngine.add_request))
    # an engine of this test's own, so its first guided request builds the runtime
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=12,
                     engine_kwargs={"max_num_seqs": 3 if method == "ainvoke" else 5})
    structured = chat.with_structured_output(_schema(f"Loop{method}"))
    if method == "ainvoke":
        out = await structured.ainvoke("A number?")
    else:
        out = [part async for part in structured.astream("A number?")][-1]
    assert set(out) == {"n"} and 0 <= out["n"] <= 9
    loop_thread = threading.get_ident()
    assert all(len(seen) == 1 and loop_thread not in seen for seen in threads.values()), threads
    chat.llm.shutdown()


def _held_submissions(engine: Any, monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[threading.Event, threading.Event, list[Any]]:
    """The engine's ``add_request`` held on the submitting thread: (set once a submission waits,
    set to let it go on, the streams queued since)."""
    entered, release = threading.Event(), threading.Event()
    streams: list[Any] = []
    add_request = engine.add_request

    def slow_add_request(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(30)
        streams.append(add_request(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(engine, "add_request", slow_add_request)
    return entered, release, streams


async def _cancel_while_submitted(chat: ChatBraid, entered: threading.Event) -> None:
    """An ainvoke cancelled once its submission waits (``_held_submissions``)."""
    # (greedy, this prompt runs the whole 400 tokens: an abort is what stops it early)
    task = asyncio.create_task(chat.ainvoke([HumanMessage("Tell me a long story")], max_tokens=400))
    while not entered.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_async_call_cancelled_while_it_is_submitted_aborts_its_request(
        chat: ChatBraid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Submission runs on a worker thread, which a cancelled task cannot stop: the request it
    queues is aborted once it is queued, so nobody's tokens are generated for nothing."""
    engine = chat.llm.engine
    entered, release, streams = _held_submissions(engine, monkeypatch)
    aborted: list[str] = []
    abort = engine.abort

    def recording_abort(request_id: str) -> None:
        aborted.append(request_id)
        abort(request_id)

    monkeypatch.setattr(engine, "abort", recording_abort)
    await _cancel_while_submitted(chat, entered)
    release.set()
    for _ in range(2000):
        if aborted:
            break
        await asyncio.sleep(0.005)
    assert aborted == [streams[0].request_id]
    out = await asyncio.wait_for(streams[0].aresult(), 30)
    assert out.finish_reason == "abort" and len(out.token_ids) < 400


def test_a_call_cancelled_while_it_is_submitted_is_aborted_after_its_event_loop_closed(
        chat: ChatBraid, monkeypatch: pytest.MonkeyPatch) -> None:
    """``asyncio.run(wait_for(chat.ainvoke(...), t))`` timing out while the call waits for the
    submitting thread (busy with other calls' grammars): the loop is closed before the request is
    queued. The abort was a callback on that loop, which never ran, and an ainvoke's request
    (which hands nothing to the loop until it ends) ran to its max_tokens for nobody. The call and
    its submission now meet on the submitting side: whichever comes second aborts it."""
    import time

    engine = chat.llm.engine
    entered, release, streams = _held_submissions(engine, monkeypatch)
    finished: dict[str, str] = {}
    finish = engine._finish

    def recording_finish(seq: Any, reason: str) -> None:
        finished[seq.request_id] = reason
        finish(seq, reason)

    monkeypatch.setattr(engine, "_finish", recording_finish)
    asyncio.run(_cancel_while_submitted(chat, entered))  # its loop is closed when it returns
    release.set()
    deadline = time.monotonic() + 30
    while not (streams and streams[0].request_id in finished) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert finished.get(streams[0].request_id) == "abort"
    assert chat.llm.stats()["running"] == 0


def test_token_count_is_the_prompt_a_call_sends(chat: ChatBraid) -> None:
    """get_num_tokens_from_messages summed each message as rendered between two user turns: it
    left out the generation prompt (47 counted, 52 sent), a reasoning block the template keeps
    after the last question, the grouping of tool results and the system turn that tools join.
    It is now the call's input_tokens, with tools or without."""
    from langchain_core.messages import ToolMessage

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    calls = [{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"},
             {"name": "add", "args": {"a": 3, "b": 4}, "id": "c2"}]
    first = chat.invoke([HumanMessage("Hi")])
    threads = [
        [_system(), HumanMessage("Question 0?"), AIMessage("It is 0."), HumanMessage("Question 1?")],
        [HumanMessage("Hi"), first, HumanMessage("Again?")],  # an answer's ids are spliced in
        [HumanMessage("Add"), AIMessage("", tool_calls=calls), ToolMessage("3", tool_call_id="c1"),
         ToolMessage("7", tool_call_id="c2")],
        [HumanMessage("Add"), AIMessage("", tool_calls=calls[:1],
                                        additional_kwargs={"reasoning_content": "I should add."}),
         ToolMessage("3", tool_call_id="c1")],
    ]
    for thread in threads:
        for tools in (None, [add]):
            model = chat.bind_tools(tools) if tools else chat
            sent = model.invoke(thread, max_tokens=1).usage_metadata["input_tokens"]
            assert chat.get_num_tokens_from_messages(thread, tools=tools) == sent, (thread, tools)


def test_batch_from_threads_equals_one_by_one(chat: ChatBraid) -> None:
    prompts = [[_system(), HumanMessage(q)] for q in ("Hi", "Hey", "Hello there", "Yo")]
    alone = [chat.invoke(p).response_metadata[TOKEN_IDS_KEY] for p in prompts]
    together = chat.batch(prompts, config={"max_concurrency": 4})
    assert [m.response_metadata[TOKEN_IDS_KEY] for m in together] == alone


def _scripted(chat: ChatBraid, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the engine 'generate' ``text`` token by token (a random model never thinks)."""
    engine = chat._engine()
    tok = engine.llm.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]

    class Stream:
        def __init__(self, prompt: list[int]) -> None:
            self.prompt = prompt

        def __iter__(self):
            for i, t in enumerate(ids):
                last = i == len(ids) - 1
                yield RequestOutput("r", self.prompt, [t], tok.decode([t], skip_special_tokens=True),
                                    "stop" if last else None, 3)

        def result(self) -> RequestOutput:
            return RequestOutput("r", self.prompt, list(ids), text, "stop", 3)

    monkeypatch.setattr(engine.llm.engine, "add_request", lambda prompt, params, **kw: Stream(prompt))


def test_reasoning_goes_to_reasoning_content_and_v1_blocks(chat: ChatBraid, monkeypatch) -> None:
    _scripted(chat, "<think>\nThe user greets me.\n</think>\n\nHello!", monkeypatch)
    message = chat.invoke("Hi")
    assert message.content == "Hello!"
    assert message.additional_kwargs["reasoning_content"] == "The user greets me."
    assert message.usage_metadata["output_token_details"]["reasoning"] == len(
        chat.get_token_ids("<think>\nThe user greets me.\n</think>"))
    v1 = chat.model_copy(update={"output_version": "v1"}).invoke("Hi")
    assert [(b["type"], b.get("reasoning") or b.get("text")) for b in v1.content] == [
        ("reasoning", "The user greets me."), ("text", "Hello!")]

    chunks = list(chat.stream("Hi"))
    kinds = [("r" if c.additional_kwargs.get("reasoning_content") else "") + ("a" if c.content else "")
             for c in chunks]
    kinds = [k for k in kinds if k]  # tags and held-back newlines stream as empty chunks
    first_answer = kinds.index("a")
    assert set(kinds[:first_answer]) == {"r"} and set(kinds[first_answer:]) == {"a"}
    full = chunks[0]
    for c in chunks[1:]:
        full += c
    assert (full.content, full.additional_kwargs["reasoning_content"]) == (
        "Hello!", "The user greets me.")


def test_a_v1_answer_streamed_with_text_around_a_call_renders_as_invoked(
        chat: ChatBraid, monkeypatch: pytest.MonkeyPatch) -> None:
    """With output_version="v1" LangChain turns each streamed chunk into content blocks, so an
    answer's text before and after a call comes back as two text blocks: pieces of one text, the
    separator already in the second. They were joined with a newline, so a streamed agent's next
    turn showed the model text it never wrote (and not the invoked message's: the two modes then
    generated differently); they are read as LangChain's ``.text`` reads them."""
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    v1 = chat.model_copy(update={"output_version": "v1"})
    _scripted(v1, 'Sure, let me check.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
                  "</tool_call>\nDone.", monkeypatch)
    bound = v1.bind_tools([add])
    whole = bound.invoke("Add 2 and 3")
    streamed = None
    for chunk in bound.stream("Add 2 and 3"):
        streamed = chunk if streamed is None else streamed + chunk
    assert [c["args"] for c in streamed.tool_calls] == [c["args"] for c in whole.tool_calls] == [{"a": 2, "b": 3}]
    assert streamed.text == whole.text == "Sure, let me check.\nDone."
    question = HumanMessage("Add 2 and 3")
    assert v1.get_num_tokens_from_messages([question, streamed], tools=[add]) == \
        v1.get_num_tokens_from_messages([question, whole], tools=[add])
    assert render(v1.tokenizer, [question, streamed]).text == render(v1.tokenizer, [question, whole]).text


def _opening_think(tiny_model: str, tmp_path: Any) -> str:
    """The tiny checkpoint with a template whose generation prompt opens ``<think>`` (as
    Qwen3's thinking-only models do): the answer starts inside the block."""
    import shutil

    path = tmp_path / "think"
    shutil.copytree(tiny_model, path)
    template = path / "chat_template.jinja"
    text, end = template.read_text().rstrip(), "{% endif -%}\n{%- endif -%}"
    assert text.endswith(end)
    template.write_text(text[: -len(end)] + "{% else %}<think>\n" + end)
    return str(path)


@pytest.mark.parametrize("opened_by", ["prompt", "answer"])
def test_a_reasoning_block_never_closed_counts_every_output_token(
        tiny_model: str, tmp_path: Any, opened_by: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """usage's output_token_details.reasoning counted up to ``</think>`` and was missing when
    the block never closed (cut off, or a model that ends its turn thinking), though every
    output token was then reasoning; it was so whether the prompt or the answer opened it."""
    model = _opening_think(tiny_model, tmp_path) if opened_by == "prompt" else tiny_model
    chat = ChatBraid(model=model, device="cpu", temperature=0, max_tokens=12)
    thought = "The user greets me, so I"
    _scripted(chat, thought if opened_by == "prompt" else f"<think>\n{thought}", monkeypatch)
    message = chat.invoke("Hi")
    full = None
    for chunk in chat.stream("Hi"):
        full = chunk if full is None else full + chunk
    for out in (message, full):
        assert (out.content, out.additional_kwargs["reasoning_content"]) == ("", thought)
        usage = out.usage_metadata
        assert usage["output_token_details"] == {"reasoning": usage["output_tokens"]}
        assert usage["output_tokens"] == len(out.response_metadata[TOKEN_IDS_KEY]) > 5


def test_returned_message_carries_generated_ids(chat: ChatBraid) -> None:
    message = chat.invoke([_system(), HumanMessage("Hi")])
    ids = message.response_metadata[TOKEN_IDS_KEY]
    assert len(ids) == message.usage_metadata["output_tokens"]
    assert chat.tokenizer.decode(ids, skip_special_tokens=True) == message.content
    assert isinstance(message, AIMessage) and message.response_metadata["model_name"] == chat.model


def test_a_shut_down_engine_is_loaded_again_on_next_use(tiny_model: str) -> None:
    """Shutting the shared engine down (to free its memory) does not leave every ChatBraid of
    that model failing with EngineClosedError ("create a new LLM", which ChatBraid could not,
    as the registry kept handing out the closed engine): the next call loads a fresh one."""
    kwargs = {"page_size": 8}  # an engine of this test's own
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=5, engine_kwargs=kwargs)
    first = chat.invoke("Hello")
    old = chat.llm
    old.shutdown()
    again = chat.invoke("Hello")
    assert chat.llm is not old
    assert again.response_metadata[TOKEN_IDS_KEY] == first.response_metadata[TOKEN_IDS_KEY]
    other = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=5, engine_kwargs=kwargs)
    assert other.llm is chat.llm
    chat.llm.shutdown()


async def test_an_async_call_whose_engine_is_reloaded_while_it_is_submitted_is_answered(
        tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An async call took the loaded engine, then handed its submission to that engine's
    submitting thread. Had another thread shut the engine down and loaded its successor in
    between, that thread had gone with the old engine, and the call failed with a RuntimeError
    ("cannot schedule new futures after shutdown"). The submitting thread now belongs to the
    model's key and outlives reloads; the call is answered by the successor."""
    kwargs = {"page_size": 6}  # an engine of this test's own
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=5, engine_kwargs=kwargs)
    first = chat.invoke("Hello")
    old = chat.llm
    reloaded: list[Any] = []

    class Submission(chat_models._Submission):  # made between taking the engine and submitting
        def __init__(self) -> None:
            super().__init__()
            if not reloaded:
                old.shutdown()
                other = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=5,
                                  engine_kwargs=kwargs)
                done = threading.Thread(target=lambda: reloaded.append(other.invoke("Hi")))
                done.start()
                done.join(60)

    monkeypatch.setattr(chat_models, "_Submission", Submission)
    again = await chat.ainvoke("Hello")
    assert reloaded and chat.llm is not old
    assert again.response_metadata[TOKEN_IDS_KEY] == first.response_metadata[TOKEN_IDS_KEY]
    chat.llm.shutdown()


async def test_an_async_call_does_not_wait_on_the_event_loop_while_another_engine_loads(chat: ChatBraid) -> None:
    """Loading an engine holds the registry's lock for seconds. An async call on a loaded engine
    took that lock on the event loop to find its submitting thread, so it stalled the loop
    until the other load ended; it must not touch that lock on the loop."""
    await chat.ainvoke("Hello")  # loaded
    released = threading.Event()
    chat_models._REGISTRY_LOCK.acquire()  # as a load of another model would
    timer = threading.Timer(5, lambda: (released.set(), chat_models._REGISTRY_LOCK.release()))
    timer.start()
    try:
        message = await chat.ainvoke("Hello")
        assert not released.is_set()  # answered while the lock was still held
        assert message.usage_metadata["output_tokens"] > 0
    finally:
        timer.join()


def test_token_counts_do_not_wait_for_an_engine_to_load(tiny_model: str, tmp_path) -> None:
    """Counting tokens reads only the tokenizer and config.json of a model whose engine is not
    loaded. Those reads took the registry's lock, which a load holds for seconds (any model's,
    this one's reload too), so a count waited for the whole load."""
    import shutil

    from tests.threads import within

    path = str(shutil.copytree(tiny_model, tmp_path / "copy"))  # a model nothing has read yet
    chat = ChatBraid(model=path, device="cpu")
    with chat_models._REGISTRY_LOCK:  # as a load would
        counted = within(lambda: chat.get_num_tokens_from_messages([HumanMessage("Hello there")]), 10,
                         "waited for the load")
    assert isinstance(counted, int) and counted > 2
    assert counted == len(chat.llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], tokenize=True, add_generation_prompt=True)["input_ids"])
    chat.llm.shutdown()


def test_a_shut_down_engine_is_let_go_before_the_next_one_loads(
        tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry held the shut-down engine (its weights and KV pool) while the next call
    loaded its successor, so both engines' memory was held at once. It is now dropped (and
    collected) first."""
    import gc
    import weakref

    kwargs = {"page_size": 4}  # an engine of this test's own
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=5, engine_kwargs=kwargs)
    first = chat.invoke("Hello")
    kv_cache = weakref.ref(chat.llm.engine.runner.backend.kv_cache)
    chat.llm.shutdown()
    gc.collect()
    old_alive_at_load = []
    load = chat_models.LLM

    def recording_load(*args: Any, **kwargs: Any) -> Any:
        old_alive_at_load.append(kv_cache() is not None)
        return load(*args, **kwargs)

    monkeypatch.setattr(chat_models, "LLM", recording_load)
    again = chat.invoke("Hello")
    assert old_alive_at_load == [False]
    assert again.response_metadata[TOKEN_IDS_KEY] == first.response_metadata[TOKEN_IDS_KEY]
    chat.llm.shutdown()


def test_the_tokenizer_read_while_a_shut_down_engine_is_let_go_is_still_there(
        tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry drops a shut-down engine before loading its successor (it only replaced it
    before). ``tokenizer`` asked whether the key was there, then read it: an engine dropped in
    between made it a KeyError (get_num_tokens, get_token_ids on another thread)."""
    kwargs = {"page_size": 2}  # an engine of this test's own
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=3, engine_kwargs=kwargs)
    chat.invoke("Hello")
    key = chat_models._engine_key(chat.model, "cpu", chat.dtype, kwargs)
    chat.llm.shutdown()
    looked, dropped, read = threading.Event(), threading.Event(), threading.Event()
    reader: list[threading.Thread] = []

    class Registry(dict):  # the reader stops between its look-up and its read, until the drop
        def _hold(self) -> None:
            if reader and threading.current_thread() is reader[0]:
                looked.set()
                dropped.wait(10)

        def __contains__(self, k: object) -> bool:
            found = super().__contains__(k)
            self._hold()
            return found

        def get(self, k: Any, default: Any = None) -> Any:
            found = super().get(k, default)
            self._hold()
            return found

        def pop(self, *args: Any) -> Any:
            out = super().pop(*args)
            dropped.set()
            return out

    registry = Registry(chat_models._ENGINES)
    del chat_models._ENGINES[key]  # (the registry restored after the test holds no closed engine)
    monkeypatch.setattr(chat_models, "_ENGINES", registry)
    load = chat_models.LLM

    def held_load(*args: Any, **kw: Any) -> Any:
        read.wait(2)  # the reader goes on meanwhile (it may wait for this load instead)
        return load(*args, **kw)

    monkeypatch.setattr(chat_models, "LLM", held_load)
    got: list[Any] = []

    def read_tokenizer() -> None:
        try:
            got.append(chat.tokenizer)
        except Exception as e:  # noqa: BLE001 - the error is what the test looks at
            got.append(e)
        read.set()

    reader.append(threading.Thread(target=read_tokenizer, daemon=True))
    reader[0].start()
    assert looked.wait(10)
    again = chat.invoke("Hello")  # drops the shut-down engine and loads the next
    reader[0].join(30)
    assert got and not isinstance(got[0], Exception), got
    assert got[0].encode("Hello") == chat.llm.tokenizer.encode("Hello")
    assert again.content is not None
    chat.llm.shutdown()


def test_profile_context_limit_is_the_engine_s_once_it_is_loaded(tiny_model: str) -> None:
    """A pool sized from memory (kv_cache_memory, or a GPU's free memory) fixes the context only
    when the engine loads: the profile said max_position_embeddings even after that, so a
    prompt the profile allowed was refused (PromptTooLongError). It now reads the engine's."""
    from braid_engine import PromptTooLongError

    kwargs = {"kv_cache_memory": 20 * 16 * 1024}  # 20 pages of 16 tokens of 1 KiB each
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=2, engine_kwargs=kwargs)
    assert chat.profile["max_input_tokens"] == 4096  # not known before the pool is sized
    chat.invoke("Hi")
    limit = chat.llm.config.max_model_len
    assert limit == 19 * 16 and chat.profile["max_input_tokens"] == limit
    assert ChatBraid(model=tiny_model, device="cpu", engine_kwargs=kwargs).profile["max_input_tokens"] == limit
    with pytest.raises(PromptTooLongError):
        chat.invoke("word " * limit)
    own = ChatBraid(model=tiny_model, device="cpu", max_tokens=2, engine_kwargs=kwargs,
                    profile={"max_input_tokens": 100})
    own.invoke("Hi")
    assert own.profile == {"max_input_tokens": 100}  # one given by the caller is left alone
    chat.llm.shutdown()


def test_template_variables_chat_braid_sets_itself_are_refused_by_name(tiny_model: str) -> None:
    """Found by review: chat_template_kwargs={"add_generation_prompt": False} (or "messages")
    was a bare TypeError ("got multiple values") from deep inside rendering."""
    from braid_engine import ChatTemplateError

    chat = ChatBraid(model=tiny_model, device="cpu", max_tokens=2)
    with pytest.raises(ChatTemplateError, match=r"\['add_generation_prompt'\] are set by the engine"):
        chat.invoke("hi", chat_template_kwargs={"add_generation_prompt": False})
    with pytest.raises(ChatTemplateError, match=r"\['messages'\]"):
        ChatBraid(model=tiny_model, device="cpu", chat_template_kwargs={"messages": []}).invoke("hi")
    assert chat.invoke("hi").content is not None


def test_langchain_integration_details_found_by_review(tiny_model: str, tiny_llama) -> None:
    """Found by review: LangChain's cache keyed two models that differ only in template or engine
    settings alike (one got the other's answer); a call's chat_template_kwargs enable_thinking lost
    to the model's enable_thinking field; model_copy to another model kept the first model's
    profile; get_num_tokens_from_messages([]) raised; ChatOpenAI's stream_usage was refused."""
    a = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=4)
    b = a.model_copy(update={"chat_template_kwargs": {"enable_thinking": False}})
    assert a._get_llm_string() != b._get_llm_string()
    assert a._get_llm_string() != a.model_copy(update={"engine_kwargs": {"max_model_len": 64}})._get_llm_string()
    thinking = ChatBraid(model=tiny_model, device="cpu", max_tokens=1, enable_thinking=True)
    off = ChatBraid(model=tiny_model, device="cpu", max_tokens=1, enable_thinking=False).invoke("hi")
    on = thinking.invoke("hi")
    assert on.usage_metadata["input_tokens"] != off.usage_metadata["input_tokens"]
    by_call = thinking.invoke("hi", chat_template_kwargs={"enable_thinking": False})
    assert by_call.usage_metadata["input_tokens"] == off.usage_metadata["input_tokens"]
    assert thinking.invoke("hi", chat_template_kwargs={"enable_thinking": False},
                           enable_thinking=True).usage_metadata["input_tokens"] == on.usage_metadata["input_tokens"]
    llama = a.model_copy(update={"model": str(tiny_llama)})
    assert llama.profile["reasoning_output"] is False and a.profile["reasoning_output"] is True
    given = ChatBraid(model=tiny_model, device="cpu", profile={"max_input_tokens": 7})
    assert given.model_copy(update={"model": str(tiny_llama)}).profile == {"max_input_tokens": 7}
    assert a.get_num_tokens_from_messages([]) == 0
    assert ChatBraid(model=tiny_model, device="cpu", max_tokens=2, stream_usage=True).invoke(
        "hi", stream_usage=False).content is not None


def test_a_cut_off_call_holds_its_arguments_text_as_its_args() -> None:
    """LangChain's invalid calls hold the arguments as text; a cut-off call held the whole
    <tool_call> body (name header included), unlike the stream's."""
    from langchain_braid._tools import parse_tool_calls

    _, calls, invalid = parse_tool_calls('<tool_call>\n{"name": "g", "arguments": {"s": "ab', ["g"])
    assert calls == [] and invalid[0]["name"] == "g" and invalid[0]["args"] == '{"s": "ab'
    assert invalid[0]["error"] == "the call was cut off before </tool_call>"


def test_sampling_settings_not_given_are_the_checkpoints(tmp_path, monkeypatch):
    """A setting neither the call nor the model's fields give is the checkpoint's
    generation_config.json one (Qwen3's 0.6 / 0.95 / 20), as through vLLM's server; where the
    checkpoint has none, 0.7 / 1 / -1. The call's win over the fields, the fields over the file."""
    from braid_engine.engine.engine import LLMEngine
    from braid_engine.testing import make_tiny_checkpoint

    seen: list[Any] = []
    add_request = LLMEngine.add_request

    def recorded(self, prompt, params, *args, **kwargs):
        seen.append((params.temperature, params.top_p, params.top_k, params.min_p))
        return add_request(self, prompt, params, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", recorded)
    qwen3 = str(make_tiny_checkpoint(tmp_path / "qwen3", generation_config={
        "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    plain = str(make_tiny_checkpoint(tmp_path / "plain"))
    hi = [HumanMessage("hi")]
    ChatBraid(model=qwen3, device="cpu", max_tokens=2).invoke(hi)
    ChatBraid(model=qwen3, device="cpu", max_tokens=2, temperature=0).invoke(hi)
    ChatBraid(model=qwen3, device="cpu", max_tokens=2, top_p=0.5).invoke(hi, top_k=3, min_p=0.1)
    list(ChatBraid(model=qwen3, device="cpu", max_tokens=2).stream(hi, temperature=None))
    ChatBraid(model=plain, device="cpu", max_tokens=2).invoke(hi)
    assert seen == [(0.6, 0.95, 20, 0.0), (0.0, 0.95, 20, 0.0), (0.6, 0.5, 3, 0.1), (0.6, 0.95, 20, 0.0),
                    (0.7, 1.0, -1, 0.0)]


def test_penalties_reach_the_engine_from_calls_fields_and_the_checkpoint(tmp_path, monkeypatch):
    """presence, frequency and repetition penalties as the other sampling settings: the call's,
    else the field's, else generation_config.json's, else off; a bad one is a typed error."""
    from braid_engine import InvalidSamplingParamsError
    from braid_engine.engine.engine import LLMEngine
    from braid_engine.testing import make_tiny_checkpoint

    seen: list[Any] = []
    add_request = LLMEngine.add_request

    def recorded(self, prompt, params, *args, **kwargs):
        seen.append((params.presence_penalty, params.frequency_penalty, params.repetition_penalty))
        return add_request(self, prompt, params, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", recorded)
    penalized = str(make_tiny_checkpoint(tmp_path / "penalized", generation_config={"repetition_penalty": 1.1}))
    plain = str(make_tiny_checkpoint(tmp_path / "plain"))
    hi = [HumanMessage("hi")]
    ChatBraid(model=penalized, device="cpu", max_tokens=2).invoke(hi)
    ChatBraid(model=penalized, device="cpu", max_tokens=2, presence_penalty=0.5).invoke(hi, repetition_penalty=1.0)
    list(ChatBraid(model=plain, device="cpu", max_tokens=2, frequency_penalty=0.2).stream(hi, frequency_penalty=0.3))
    ChatBraid(model=plain, device="cpu", max_tokens=2).invoke(hi)
    assert seen == [(0.0, 0.0, 1.1), (0.5, 0.0, 1.0), (0.0, 0.3, 1.0), (0.0, 0.0, 1.0)]
    with pytest.raises(InvalidSamplingParamsError, match="presence_penalty"):
        ChatBraid(model=plain, device="cpu", max_tokens=2).invoke(hi, presence_penalty=5)
    # greedy: a strong penalty changes the answer's tokens
    chat = ChatBraid(model=plain, device="cpu", max_tokens=24, temperature=0)
    free = chat.invoke(hi).response_metadata[TOKEN_IDS_KEY]
    assert chat.invoke(hi, repetition_penalty=2.0).response_metadata[TOKEN_IDS_KEY] != free


def test_logprobs_in_response_metadata_as_chatopenai_gives_them(tiny_model):
    """logprobs / top_logprobs (fields or per call): OpenAI's form in response_metadata, one entry
    per generated token (the reasoning's too), the engine's values; a stream's chunks carry their
    tokens' and merge into the whole answer's; off: no "logprobs" key."""
    from braid_engine import SamplingParams

    # every prompt computed afresh (a cached one's logits may differ in float32's last places)
    fresh = dict(device="cpu", max_tokens=10, temperature=0, enable_prefix_caching=False)
    chat = ChatBraid(model=tiny_model, **fresh)
    msg = chat.invoke("hi", logprobs=True, top_logprobs=2)
    ids = msg.response_metadata[TOKEN_IDS_KEY]
    content = msg.response_metadata["logprobs"]["content"]
    assert len(content) == len(ids) == 10
    llm = chat._engine().llm
    prompt = render(llm.tokenizer, [HumanMessage("hi")]).token_ids(llm.tokenizer)
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, logprobs=2, enable_prefix_caching=False))[0]
    assert ref.token_ids == ids
    for entry, tok, want in zip(content, ids, ref.logprobs):
        assert entry["token"] == llm.tokenizer.decode([tok]) and entry["bytes"] == list(entry["token"].encode())
        assert entry["logprob"] == want[tok]
        top = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
        assert [(t["token"], t["logprob"]) for t in entry["top_logprobs"]] == \
            [(llm.tokenizer.decode([t]), v) for t, v in top]
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the drawn is the likeliest
    streamed = None
    for chunk in ChatBraid(model=tiny_model, logprobs=True, top_logprobs=2, **fresh).stream("hi"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.response_metadata["logprobs"]["content"] == content
    assert "logprobs" not in chat.invoke("hi").response_metadata
    only = chat.invoke("hi", logprobs=True).response_metadata["logprobs"]["content"]
    assert [e["top_logprobs"] for e in only] == [[]] * 10
    assert len(chat.invoke("hi", top_logprobs=1).response_metadata["logprobs"]["content"][0]["top_logprobs"]) == 1
    with pytest.raises(TypeError, match="logprobs must be True, False or None"):
        chat.invoke("hi", logprobs="yes")
    with pytest.raises(ValueError, match="top_logprobs must be an int from 0 to 20"):
        chat.invoke("hi", top_logprobs=25)


def test_sampled_logprobs_list_the_most_likely_whether_or_not_drawn_and_bytes_join_into_text(tiny_model):
    """A sampled answer's tokens are often not the likeliest: each position's top_logprobs are
    still the k most likely (the engine's, ties by lower id), the drawn token only where it is
    one of them. A character split over tokens has its UTF-8 bytes spread over their entries, as
    OpenAI gives them: joined, the bytes are the text."""
    from braid_engine import SamplingParams

    sampling = dict(temperature=1.0, top_p=1.0, top_k=-1, seed=3, max_tokens=12)
    chat = ChatBraid(model=tiny_model, device="cpu", enable_prefix_caching=False, **sampling)
    msg = chat.invoke("hi", top_logprobs=2)
    ids, content = msg.response_metadata[TOKEN_IDS_KEY], msg.response_metadata["logprobs"]["content"]
    llm = chat._engine().llm
    prompt = render(llm.tokenizer, [HumanMessage("hi")]).token_ids(llm.tokenizer)
    ref = llm.generate(prompt, SamplingParams(**sampling, logprobs=20, enable_prefix_caching=False))[0]
    assert ref.token_ids == ids and len(content) == len(ids)
    drawn_not_top = 0
    for entry, tok, want in zip(content, ids, ref.logprobs, strict=True):
        top = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
        assert entry["logprob"] == want[tok]
        assert [(t["token"], t["logprob"]) for t in entry["top_logprobs"]] == \
            [(llm.tokenizer.decode([t]), v) for t, v in top]
        drawn_not_top += tok not in dict(top)
    assert drawn_not_top > 0
    text = "日本 héllo"
    split = llm.tokenizer.encode(text, add_special_tokens=False)
    entries = chat_models.openai_logprobs([{t: -1.0} for t in split], 1, llm.tokenizer)["content"]
    assert any(e["token"] == "\ufffd" for e in entries)  # some tokens hold part of a character
    assert bytes(b for e in entries for b in e["bytes"]) == text.encode()
    assert [e["top_logprobs"][0]["bytes"] for e in entries] == [e["bytes"] for e in entries]
