"""A terminal chat: live streaming, thinking dimmed, per-turn stats, /reset and /stats.

    python examples/chat.py --model tiny              # offline, tiny random model (words are noise)
    python examples/chat.py --model Qwen/Qwen3-0.6B   # real use
    echo "hello" | python examples/chat.py --model tiny   # reads lines from a pipe too
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from langchain_core.messages import AIMessageChunk, BaseMessage, HumanMessage, SystemMessage

from braid_engine import ChatTemplateError, InvalidRequestError, ModelNotFoundError
from braid_engine.testing import make_tiny_checkpoint
from langchain_braid import ChatBraid

DIM, RESET = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


def turn(chat: ChatBraid, history: list[BaseMessage]) -> AIMessageChunk:
    """Stream one answer to the terminal; return the whole message (with usage)."""
    full: AIMessageChunk | None = None
    t0 = time.perf_counter()
    first = None
    for chunk in chat.stream(history):
        first = first or time.perf_counter()
        reasoning = chunk.additional_kwargs.get("reasoning_content", "")
        if reasoning:
            print(f"{DIM}{reasoning}{RESET}", end="", flush=True)
        if chunk.content:
            print(chunk.content, end="", flush=True)
        full = chunk if full is None else full + chunk
    elapsed = time.perf_counter() - t0
    u = full.usage_metadata or {}
    out_tokens = u.get("output_tokens", 0)
    decode = elapsed - ((first or t0) - t0)
    print(f"\n{DIM}[{u.get('input_tokens', 0)} in, {u.get('input_token_details', {}).get('cache_read', 0)} "
          f"cached, {out_tokens} out; first token {((first or t0) - t0) * 1000:.0f} ms, "
          f"{out_tokens / decode if decode > 0 else 0:.1f} tokens/s]{RESET}")
    return full


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="'tiny', a local directory or a hub id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--system", default="You are a helpful assistant.")
    ap.add_argument("--no-think", action="store_true", help="Qwen3: answer without thinking")
    args = ap.parse_args()
    model = args.model
    if model == "tiny":
        scratch = tempfile.TemporaryDirectory(prefix="braid-tiny-")  # removed when main returns
        model = str(make_tiny_checkpoint(scratch.name, arch="qwen3"))
        args.max_tokens = min(args.max_tokens, 24)
    chat = ChatBraid(model=model, device=args.device, max_tokens=args.max_tokens, temperature=0.7,
                     seed=0, enable_thinking=False if args.no_think else None)
    history: list[BaseMessage] = [SystemMessage(args.system)]
    interactive = sys.stdin.isatty()
    print("Type a message; /reset starts over, /stats shows the engine's cache, Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = history[:1]
            print("(new conversation)")
            continue
        if line.strip() == "/stats":
            print(chat.llm.stats())
            continue
        history.append(HumanMessage(line))
        try:
            history.append(turn(chat, history))
        except ModelNotFoundError as e:
            sys.exit(f"{e}\nNo network and no local copy? Try --model tiny (a tiny random checkpoint).")
        except (InvalidRequestError, ChatTemplateError) as e:  # the history outgrew the context, …: this turn only
            history.pop()
            print(f"{e}\n(the message was dropped; /reset starts a new conversation)")


if __name__ == "__main__":
    main()
