"""LangGraph threads with a checkpointer: tokens stream, and later calls read earlier ones from the KV."""

from __future__ import annotations

from typing import Literal

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph

from langchain_braid import TOKEN_IDS_KEY, ChatBraid
from langchain_braid._messages import render


def test_checkpointed_thread_streams_tokens_and_reuses_kv(tiny_model: str) -> None:
    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=10)

    def call_model(state: MessagesState) -> dict:
        return {"messages": [chat.invoke(state["messages"])]}

    builder = StateGraph(MessagesState)
    builder.add_node("model", call_model)
    builder.add_edge(START, "model")
    graph = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "graph-thread"}}
    system = SystemMessage("You are a graph assistant. " + "Each turn has a role. " * 8)

    def turn(messages: list) -> tuple[str, list[int]]:
        before = graph.get_state(config).values.get("messages", [])
        prompt = render(chat.tokenizer, [*before, *messages]).token_ids(chat.tokenizer)
        streamed = [chunk for chunk, _ in graph.stream({"messages": messages}, config,
                                                       stream_mode="messages")
                    if isinstance(chunk, AIMessageChunk)]
        answer = graph.get_state(config).values["messages"][-1]
        assert len(streamed) == answer.usage_metadata["output_tokens"]  # a chunk per token
        assert "".join(c.content for c in streamed) == answer.content
        return answer, prompt

    chat.llm.engine.clear_cache()  # turn 1 then shares nothing with earlier tests
    first, first_prompt = turn([system, HumanMessage("Hello!")])
    assert first.usage_metadata["input_token_details"]["cache_read"] == 0
    second, second_prompt = turn([HumanMessage("And what next?")])
    generated = first.response_metadata[TOKEN_IDS_KEY]
    expected = len(first_prompt) + len(generated) - 1  # all but the last token's KV was computed
    assert second_prompt[: expected + 1] == first_prompt + generated
    assert second.usage_metadata["input_token_details"]["cache_read"] == expected


def test_an_agent_thread_streams_as_it_invokes_and_reads_each_call_from_the_kv(tiny_model: str) -> None:
    """create_agent with two tools and a checkpointer, over two user turns (a forced call, the
    tool's result, an answer): streamed with stream_mode="messages" on the cache it generates
    the ids an uncached invoke does; each call is one ToolNode runs, its result goes back under
    its id; a call after a tool result reads all of the call before it from the cache, a later
    turn some of the thread; nothing stays held but the cache."""
    @tool
    def add(a: Literal[1, 2, 3], b: Literal[1, 2, 3]) -> int:
        """Add two small integers."""
        return a + b

    @tool
    def weather(city: Literal["Paris", "Oslo"]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    class CallFirst(AgentMiddleware):  # a random model never chooses a tool
        def wrap_model_call(self, request, handler):
            answered = isinstance(request.messages[-1], ToolMessage)
            return handler(request.override(tool_choice="none" if answered else "any",
                                            model_settings={"parallel_tool_calls": False}))

    chat = ChatBraid(model=tiny_model, device="cpu", temperature=0, max_tokens=48)
    uncached = chat.model_copy(update={"enable_prefix_caching": False})

    def thread(model: ChatBraid, stream: bool) -> list:
        agent = create_agent(model, tools=[add, weather], middleware=[CallFirst()],
                             checkpointer=InMemorySaver())
        config = {"configurable": {"thread_id": "agent"}}
        for question in ("What is 2 plus 3?", "And the weather in Paris?"):
            turn = {"messages": [HumanMessage(question)]}
            if stream:
                chunks = [c for c, _ in agent.stream(turn, config, stream_mode="messages")
                          if isinstance(c, AIMessageChunk)]
                assert chunks
            else:
                agent.invoke(turn, config)
        return agent.get_state(config).values["messages"]

    chat.llm.engine.clear_cache()
    streamed, invoked = thread(chat, stream=True), thread(uncached, stream=False)
    answers = [m for m in streamed if isinstance(m, AIMessage)]
    assert [m.response_metadata[TOKEN_IDS_KEY] for m in answers] == [
        m.response_metadata[TOKEN_IDS_KEY] for m in invoked if isinstance(m, AIMessage)]
    assert [type(m).__name__ for m in streamed] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"] * 2
    for call, result in zip(streamed[1::4], streamed[2::4], strict=True):
        ((tc,),) = (call.tool_calls,)
        assert not call.invalid_tool_calls and tc["id"].startswith("call_")
        assert (result.tool_call_id, result.status) == (tc["id"], "success")
        assert result.content == str({"add": add, "weather": weather}[tc["name"]].invoke(tc["args"]))
    reads = [m.usage_metadata["input_token_details"]["cache_read"] for m in answers]
    assert reads[0] == 0 and reads[2] > 0
    for before, after in ((answers[0], reads[1]), (answers[2], reads[3])):
        assert after == before.usage_metadata["input_tokens"] + before.usage_metadata["output_tokens"] - 1
    stats = chat.llm.stats()
    assert stats["running"] == 0 and stats["pages_used"] == stats["pages_cached"] > 0
