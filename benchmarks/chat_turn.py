"""A LangChain conversation turn by turn, as an app sends it: the whole history (a long system
prompt, every question, every answer) through `ChatBraid.stream`. Per turn: the host's time to
turn the messages into prompt ids — ChatBraid remembering the pieces that come back unchanged,
ChatBraid without that memory, and what a transformers user runs each turn
(`apply_chat_template(..., tokenize=True)` over the whole history) — and ChatBraid's time to its
first streamed chunk (prompt, engine, first token).

    python -m benchmarks.chat_turn                                         # tiny model, CPU
    python -m benchmarks.chat_turn --shape qwen3-0.6b --device cuda --dtype bfloat16
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path

from langchain_core.messages import HumanMessage, SystemMessage

import langchain_braid._messages as messages_module
from benchmarks.common import build_model, card, kv_kwargs, model_arguments
from braid_engine.testing import make_tiny_checkpoint
from langchain_braid import ChatBraid
from langchain_braid._messages import to_template_dict

WORDS = ("the quick brown fox jumps over a lazy dog while rules of the house ask every answer to be "
         "short kind and exact about apples pears plums orders refunds and shipping").split()


def _prepare_ms(chat: ChatBraid, msgs: list, remember: bool) -> float:
    """Milliseconds ChatBraid takes to turn ``msgs`` into prompt ids; without its memo of
    earlier turns' pieces when not ``remember`` (the memo is set aside, then put back)."""
    saved = messages_module._Memo.limit, messages_module._MEMOS
    if not remember:
        messages_module._Memo.limit, messages_module._MEMOS = 0, type(saved[1])()
    try:
        t0 = time.perf_counter()
        chat._prepare(msgs, None, {})
        return (time.perf_counter() - t0) * 1e3
    finally:
        messages_module._Memo.limit, messages_module._MEMOS = saved


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-chars", type=int, default=32000)
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.shape == "tiny" and args.model == "tiny":  # the tiny tokenizer spends ~3 tokens a word
        path = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="braid-tiny-")), max_position_embeddings=65536)
    else:
        path = build_model(args.shape, args.model)
    chat = ChatBraid(model=str(path), device=args.device, dtype=args.dtype, temperature=0,
                     max_tokens=args.answer_tokens, engine_kwargs=kv_kwargs(args))
    tok = chat.tokenizer
    rng = random.Random(0)

    def text(chars: int) -> str:
        out = []
        while sum(map(len, out)) + len(out) < chars:
            out.append(rng.choice(WORDS))
        return " ".join(out)

    msgs = [SystemMessage(text(args.system_chars))]
    chat.invoke([*msgs, HumanMessage("warm up")])
    print(f"card: {card(chat.llm.config.device)}; system prompt {args.system_chars} characters, "
          f"{len(tok(msgs[0].content)['input_ids'])} tokens")
    print(f"{'turn':>4} {'prompt tokens':>13} {'braid prep ms':>14} {'no memo ms':>11} {'hf template ms':>15}"
          f" {'hf / braid':>10} {'first chunk ms':>15}")
    rows = []
    for turn in range(1, args.turns + 1):
        msgs.append(HumanMessage(text(200)))
        t0 = time.perf_counter()
        hf_ids = tok.apply_chat_template([to_template_dict(m) for m in msgs], tokenize=True,
                                         add_generation_prompt=True)["input_ids"]
        hf = (time.perf_counter() - t0) * 1e3
        ours = _prepare_ms(chat, msgs, remember=True)  # with what the turns before left in the memo
        plain = _prepare_ms(chat, msgs, remember=False)
        t0 = time.perf_counter()
        stream = chat.stream(msgs)
        answer = next(stream)
        first = (time.perf_counter() - t0) * 1e3
        for chunk in stream:
            answer += chunk
        msgs.append(answer.to_message() if hasattr(answer, "to_message") else answer)
        rows.append((ours, plain, hf, first))
        print(f"{turn:>4} {len(hf_ids):>13} {ours:>14.2f} {plain:>11.2f} {hf:>15.2f} {hf / ours:>9.1f}x {first:>15.2f}")
    later = rows[1:] or rows
    print(f"median from turn 2: braid prepare {statistics.median(r[0] for r in later):.2f} ms (no memo "
          f"{statistics.median(r[1] for r in later):.2f}), transformers apply_chat_template "
          f"{statistics.median(r[2] for r in later):.2f} ms, ChatBraid first chunk "
          f"{statistics.median(r[3] for r in later):.2f} ms")


if __name__ == "__main__":
    main()
