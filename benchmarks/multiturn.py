"""Time to first token per turn of a long conversation: prefix cache on vs off vs transformers.

Each turn re-sends the whole history (system prompt, every question and answer) plus a new
question, as LangChain memory does. With the cache on, the engine prefills only the new
tokens; transformers (and the cache-off engine) re-encode everything. Two more transformers
baselines keep their own KV across turns, as a PyTorch user serving one chat would: a
`StaticCache` fed only the tokens it has not seen (the last answer and the new question),
eagerly and with the forward under `torch.compile` (CUDA graphs on a GPU; each shape is
compiled before the timed turns). "Bandwidth": the bytes a cached turn must move (weights, the
history's KV read, the new KV written) over its time, against the measured copy bandwidth.

    python benchmarks/multiturn.py                                   # tiny model, CPU
    python benchmarks/multiturn.py --shape qwen3-0.6b --device cuda --system-tokens 8000
"""

from __future__ import annotations

import statistics

import torch
from transformers import AutoModelForCausalLM, StaticCache

from benchmarks.common import (
    build_model,
    card,
    copy_bandwidth,
    kv_kwargs,
    model_arguments,
    now,
    weight_and_kv_bytes,
)
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


class KeptCache:
    """transformers with one ``StaticCache`` kept across the turns of a chat: each turn feeds
    only the tokens the cache has not seen."""

    def __init__(self, model, device: torch.device, max_len: int, compiled: bool) -> None:
        self.device, self.seen = device, 0
        self.name = "hf kept+compiled ms" if compiled else "hf kept ms"
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)

        def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            out = model(ids, past_key_values=self.cache, cache_position=pos, use_cache=True, logits_to_keep=1)
            return out.logits[0, -1].argmax()

        mode = "reduce-overhead" if device.type == "cuda" else None
        self.forward = torch.compile(forward, mode=mode, fullgraph=True) if compiled else forward

    @torch.inference_mode()
    def ttft(self, prompt: list[int]) -> float:
        ids = torch.tensor([prompt[self.seen:]], device=self.device)
        pos = torch.arange(self.seen, len(prompt), device=self.device)
        t0 = now(self.device)
        int(self.forward(ids, pos))
        self.seen = len(prompt)
        return now(self.device) - t0

    @torch.inference_mode()
    def reset(self) -> None:
        self.cache.reset()
        self.seen = 0


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile baseline")
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
    turn_tokens = args.answer_tokens + args.question_tokens
    max_len = len(prompt) + args.turns * turn_tokens + 8
    kept = [KeptCache(hf, device, max_len, compiled=False)]
    if not args.no_compiled:
        kept.append(KeptCache(hf, device, max_len, compiled=True))
    for k in list(kept):  # warm (and compile) every shape the timed turns use: the first turn's, a later one's
        warm_prompt = tokens(len(prompt))
        try:
            for _ in range(3):
                k.ttft(warm_prompt)
                warm_prompt = warm_prompt + tokens(turn_tokens)
        except Exception as e:  # a baseline that cannot compile here is reported, not fatal
            print(f"transformers kept-cache baseline dropped ({type(e).__name__}: {str(e)[:200]})")
            kept.remove(k)
            continue
        k.reset()
    weights, kv_per_token = weight_and_kv_bytes(hf)
    bw = copy_bandwidth(device)
    rows = []
    for turn in range(1, args.turns + 1):
        if len(prompt) + args.answer_tokens >= cached.config.max_model_len:
            break
        t_plain, _ = engine_ttft(plain, prompt, device)
        t_hf = hf_ttft(hf, prompt, device)
        t_kept = [k.ttft(prompt) for k in kept]
        t_cached, reused = engine_ttft(cached, prompt, device)
        answer = cached.generate([prompt], answer_params)[0]
        moved = weights + len(prompt) * kv_per_token  # history read + new KV written
        rows.append((turn, len(prompt), reused, t_cached, t_plain, t_hf, t_kept, moved / t_cached / bw))
        prompt = prompt + answer.token_ids + tokens(args.question_tokens)

    print(f"card: {card(device)}; dtype {dtype}; model {args.shape if args.model == 'tiny' else args.model}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    kept_names = [k.name for k in kept]
    print(f"{'turn':>4} {'history':>8} {'reused':>7} {'cache on ms':>12} {'cache off ms':>13} "
          f"{'transformers ms':>16} " + " ".join(f"{n:>20}" for n in kept_names)
          + f" {'hf / on':>8} {'best hf kept / on':>18} {'bandwidth':>10}")
    for turn, n, reused, on, off, ref, kept_t, frac in rows:
        print(f"{turn:>4} {n:>8} {reused:>7} {on * 1e3:>12.2f} {off * 1e3:>13.2f} {ref * 1e3:>16.2f} "
              + " ".join(f"{t * 1e3:>20.2f}" for t in kept_t)
              + f" {ref / on:>7.1f}x {min(kept_t) / on:>17.1f}x {frac:>9.0%}")
    later = rows[1:] or rows
    print(f"median from turn 2: cache on {statistics.median(r[3] for r in later) * 1e3:.2f} ms, "
          f"off {statistics.median(r[4] for r in later) * 1e3:.2f} ms, transformers "
          f"{statistics.median(r[5] for r in later) * 1e3:.2f} ms, "
          + ", ".join(f"{name[:-3]} {statistics.median(r[6][i] for r in later) * 1e3:.2f} ms"
                      for i, name in enumerate(kept_names)))
    cached.shutdown()
    plain.shutdown()


if __name__ == "__main__":
    main()
