"""An agent with two tools whose tokens and tool calls stream as they are generated.

A LangGraph graph (model → tools → model) streams with `stream_mode="messages"`: thinking is
shown apart from the answer, tool-call arguments appear as the model writes them, and each
model turn reports how much of its prompt came from the cache.

    python examples/agent_streaming.py --model tiny              # offline, tiny random model
    python examples/agent_streaming.py --model Qwen/Qwen3-0.6B   # a real agent
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Annotated, Literal, TypedDict

from langchain_core.messages import AIMessageChunk, AnyMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from braid_engine import BraidError, ModelNotFoundError
from braid_engine.testing import make_tiny_checkpoint
from langchain_braid import ChatBraid

DIM, RESET = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


@tool
def get_weather(city: Literal["Paris", "Oslo", "Tokyo"]) -> str:
    """Current weather in a city."""
    return {"Paris": "sunny, 21 °C", "Oslo": "snow, -3 °C", "Tokyo": "cloudy, 12 °C"}[city]


@tool
def convert_temperature(celsius: float) -> float:
    """Convert a temperature from Celsius to Fahrenheit."""
    return round(celsius * 9 / 5 + 32, 1)


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build_graph(chat: ChatBraid, first_call: str):
    tools = [get_weather, convert_temperature]

    def agent(state: State) -> dict:
        # until a tool has answered, `first_call` may force a call (a random model never chooses one)
        answered = any(isinstance(m, ToolMessage) for m in state["messages"])
        model = chat.bind_tools(tools, tool_choice="auto" if answered else first_call)
        return {"messages": [model.invoke(state["messages"])]}

    def route(state: State) -> str:
        return "tools" if state["messages"][-1].tool_calls else END

    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tools", END])
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=InMemorySaver())


def run_turn(graph, question: str, thread: str) -> list[dict]:
    """Stream one user turn; returns per-model-call usage."""
    usage = []
    config = {"configurable": {"thread_id": thread}, "recursion_limit": 8}
    print(f"\nuser: {question}")
    for chunk, _meta in graph.stream({"messages": [HumanMessage(question)]}, config, stream_mode="messages"):
        if isinstance(chunk, AIMessageChunk):
            reasoning = chunk.additional_kwargs.get("reasoning_content", "")
            if reasoning:
                print(f"{DIM}{reasoning}{RESET}", end="", flush=True)
            if chunk.content:
                print(chunk.content, end="", flush=True)
            for tc in chunk.tool_call_chunks:
                print(f"{DIM}[call {tc['name']}]{RESET} " if tc.get("name") else tc.get("args") or "",
                      end="", flush=True)
            if chunk.usage_metadata:
                usage.append(chunk.usage_metadata)
                u = chunk.usage_metadata
                print(f"\n{DIM}[model: {u['input_tokens']} in, "
                      f"{u['input_token_details']['cache_read']} cached, {u['output_tokens']} out]{RESET}")
        elif isinstance(chunk, ToolMessage):
            print(f"{DIM}[{chunk.name} → {chunk.content}]{RESET}")
    return usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', a local directory or a hub id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=256)
    args = ap.parse_args()
    model, first_call = args.model, "auto"
    if model == "tiny":
        scratch = tempfile.TemporaryDirectory(prefix="braid-tiny-")  # removed when main returns
        model = str(make_tiny_checkpoint(scratch.name, arch="qwen3"))
        first_call, args.max_tokens = "get_weather", min(args.max_tokens, 64)
    chat = ChatBraid(model=model, device=args.device, temperature=0.6, seed=0, max_tokens=args.max_tokens)
    graph = build_graph(chat, first_call)
    try:
        run_turn(graph, "What is the weather in Paris, in Fahrenheit?", "demo")
        run_turn(graph, "And in Oslo?", "demo")
    except ModelNotFoundError as e:
        sys.exit(f"{e}\nNo network and no local copy? Try --model tiny (a tiny random checkpoint).")
    except BraidError as e:  # a bad option or input: the message says what to do
        sys.exit(str(e))


if __name__ == "__main__":
    main()
