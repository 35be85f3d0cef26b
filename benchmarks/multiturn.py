"""Time to first token per turn of a long conversation: prefix cache on vs off vs transformers.

Each turn re-sends the whole history (system prompt, every question and answer) plus a new
question, as LangChain memory does. With the cache on, the engine prefills only the new
tokens; transformers (and the cache-off engine) re-encode everything.

    python benchmarks/multiturn.py                                   # tiny model, CPU
    python benchmarks/multiturn.py --shape qwen3-0.6b --device cuda --system-tokens 8000
"""

from __future__ import annotations

import statistics

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import build_model, card, kv_kwargs, model_arguments, now
from braid_engine import LLM, SamplingParams


def engine_ttft(llm: LLM, prompt: list[int], device: torch.device) -> tuple[float, int]:
    """Seconds to the first token, and prompt tokens reused from the cache."""
    t0 = now(device)
    first = next(iter(llm.stream(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))))
    return now(device) - t0, first.num_cached_tokens


@torch.inference_mode()
def hf_ttft(model, prompt: list[int], device: torch.device) -> float:
    t0 = now(device)
    logits = model(torch.tensor([prompt], device=device)).logits[0, -1]
    int(logits.argmax())
    return now(device) - t0


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=32)
    args = ap.parse_args()
    kv = kv_kwargs(args)

    path = build_model(args.shape, args.model)
    cached = LLM(path, device=args.device, dtype=args.dtype, **kv)
    device, dtype = cached.config.device, cached.config.dtype
    plain = LLM(path, device=args.device, dtype=args.dtype, **kv, enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = len(cached.tokenizer)
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    prompt = tokens(args.system_tokens + args.question_tokens)
    answer_params = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    warm = tokens(64)
    for fn in (lambda: engine_ttft(cached, warm, device), lambda: engine_ttft(plain, warm, device),
               lambda: hf_ttft(hf, warm, device)):
        fn()
    rows = []
    for turn in range(1, args.turns + 1):
        if len(prompt) + args.answer_tokens >= cached.config.max_model_len:
            break
        t_plain, _ = engine_ttft(plain, prompt, device)
        t_hf = hf_ttft(hf, prompt, device)
        t_cached, reused = engine_ttft(cached, prompt, device)
        answer = cached.generate([prompt], answer_params)[0]
        rows.append((turn, len(prompt), reused, t_cached, t_plain, t_hf))
        prompt = prompt + answer.token_ids + tokens(args.question_tokens)

    print(f"card: {card(device)}; dtype {dtype}; model {args.shape if args.model == 'tiny' else args.model}")
    print(f"{'turn':>4} {'history':>8} {'reused':>7} {'cache on ms':>12} {'cache off ms':>13} "
          f"{'transformers ms':>16} {'hf / on':>8}")
    for turn, n, reused, on, off, ref in rows:
        print(f"{turn:>4} {n:>8} {reused:>7} {on * 1e3:>12.2f} {off * 1e3:>13.2f} {ref * 1e3:>16.2f} "
              f"{ref / on:>7.1f}x")
    later = rows[1:] or rows
    print(f"median from turn 2: cache on {statistics.median(r[3] for r in later) * 1e3:.2f} ms, "
          f"off {statistics.median(r[4] for r in later) * 1e3:.2f} ms, transformers "
          f"{statistics.median(r[5] for r in later) * 1e3:.2f} ms")
    cached.shutdown()
    plain.shutdown()


if __name__ == "__main__":
    main()
