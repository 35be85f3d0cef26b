"""A LangGraph thread with a checkpointer: tokens stream, and turn 2 reads turn 1 from the KV."""

from __future__ import annotations

from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
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
