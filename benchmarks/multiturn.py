"""Time to first token per turn of a long conversation: prefix cache on vs off vs transformers.

Each turn re-sends the whole history (system prompt, every question and answer) plus a new
question, as LangChain memory does. With the cache on, the engine prefills only the new
tokens; transformers (and the cache-off engine) re-encode everything. Two more transformers
baselines keep their own KV across turns, as a PyTorch user serving one chat would: a
`StaticCache` fed only the tokens it has not seen (the last answer and the new question),
eagerly and with the forward under `torch.compile` (CUDA graphs on a GPU; each shape is
compiled before the timed turns). The compiled one runs in a child process after the other
columns, on the same prompts, so that a crash inside the compiler drops that column only.
"Bandwidth": the bytes a cached turn must move (weights, the history's KV read, the new KV
written) over its time, against the measured copy bandwidth.

    python benchmarks/multiturn.py                                   # tiny model, CPU
    python benchmarks/multiturn.py --shape qwen3-0.6b --device cuda --system-tokens 8000
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StaticCache

from benchmarks.common import (
    build_model,
    card,
    copy_bandwidth,
    engine_ttft,
    head_dim_of,
    kv_kwargs,
    model_arguments,
    now,
    weight_and_kv_bytes,
)
from braid_engine import LLM, SamplingParams


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
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # Allocate the cache here, not in the first forward: tensors made while dynamo traces
        # are not marked static, so inductor takes every cache write for a mutated input and
        # skips CUDA graphs (keys, values and length of each layer: 84 on Qwen3-0.6B)
        cfg = model.config
        with torch.inference_mode():
            self.cache.early_initialization(1, cfg.num_key_value_heads, head_dim_of(cfg), model.dtype, device)

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
    def warm(self, prompts: list[list[int]]) -> None:
        """Run ``prompts`` as the turns of a chat (compiling each shape), then forget them."""
        for prompt in prompts:
            self.ttft(prompt)
        self.cache.reset()
        self.seen = 0


def compiled_child(spec_file: str) -> None:
    """The child's side: the compiled kept-cache baseline over the turns the spec file lists;
    writes the seconds of each turn, or the error, to the file the spec names."""
    spec = json.loads(Path(spec_file).read_text())
    try:
        device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
        hf = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).to(device).eval()
        kept = KeptCache(hf, device, spec["max_len"], compiled=True)
        kept.warm(spec["warm"])
        result = {"times": [kept.ttft(p) for p in spec["prompts"]]}
    except Exception as e:  # reported by the parent, as a line
        result = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    Path(spec["out"]).write_text(json.dumps(result))


def compiled_in_child(spec: dict, timeout: float) -> list[float] | None:
    """Seconds of each turn of the compiled kept-cache baseline, run in a child process; None
    (and one line saying why) if it fails, dies or runs past ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="braid-multiturn-") as tmp:
        spec_file, out = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_file.write_text(json.dumps({**spec, "out": str(out)}))
        cmd = [sys.executable, "-m", "benchmarks.multiturn", "--compiled-child", str(spec_file)]
        try:
            rc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc, result = None, {}
        else:
            result = json.loads(out.read_text()) if out.exists() else {}
    if rc == 0 and "times" in result:
        return result["times"]
    if rc is None:
        why = f"child killed after {timeout:.0f} s"
    elif "error" in result:
        why = result["error"]
    elif rc < 0:
        why = f"child exited with signal {-rc} ({signal.strsignal(-rc)})"
    else:
        why = f"child exited with code {rc}"
    print(f"transformers kept+compiled baseline dropped: {why}")
    return None


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--no-compiled", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--compiled-timeout", type=float, default=300,
                    help="seconds the torch.compile baseline's child may take, compiling included")
    ap.add_argument("--compiled-child", help=argparse.SUPPRESS)  # spec file: this process is the child
    args = ap.parse_args()
    if args.compiled_child:
        compiled_child(args.compiled_child)
        return
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
    # the kept-cache baselines warm on every shape the timed turns use: the first turn's, and
    # twice a later one's (CUDA graphs are recorded on a shape's second call)
    turn_tokens = args.answer_tokens + args.question_tokens
    warm_turns = [tokens(len(prompt))]
    for _ in range(2):
        warm_turns.append(warm_turns[-1] + tokens(turn_tokens))
    max_len = len(prompt) + args.turns * turn_tokens + 8
    kept = KeptCache(hf, device, max_len, compiled=False)
    kept.warm(warm_turns)
    weights, kv_per_token = weight_and_kv_bytes(hf)
    bw = copy_bandwidth(device)
    rows, prompts, kept_times = [], [], []
    for turn in range(1, args.turns + 1):
        if len(prompt) + args.answer_tokens >= cached.config.max_model_len:
            break
        t_plain, _ = engine_ttft(plain, prompt, device)
        t_hf = hf_ttft(hf, prompt, device)
        kept_times.append(kept.ttft(prompt))
        t_cached, reused = engine_ttft(cached, prompt, device)
        answer = cached.generate([prompt], answer_params)[0]
        moved = weights + len(prompt) * kv_per_token  # history read + new KV written
        rows.append((turn, len(prompt), reused, t_cached, t_plain, t_hf, moved / t_cached / bw))
        prompts.append(prompt)
        prompt = prompt + answer.token_ids + tokens(args.question_tokens)

    # each kept-cache column: its name and the seconds of each turn
    kept_cols = [("hf kept ms", kept_times)]
    print(f"card: {card(device)}; dtype {dtype}; model {args.shape if args.model == 'tiny' else args.model}; "
          f"copy bandwidth {bw / 1e12:.2f} TB/s")
    _table(rows, kept_cols)  # before the child: a run cut short still reports the rest
    if not args.no_compiled:
        spec = dict(path=str(path), device=str(device), dtype=str(dtype).removeprefix("torch."),
                    max_len=max_len, warm=warm_turns, prompts=prompts)
        times = compiled_in_child(spec, args.compiled_timeout)
        if times:
            kept_cols.append(("hf kept+compiled ms", times))
            print("with the compiled kept-cache baseline:")
            _table(rows, kept_cols)
    cached.shutdown()
    plain.shutdown()


def _table(rows: list[tuple], kept_cols: list[tuple[str, list[float]]]) -> None:
    print(f"{'turn':>4} {'history':>8} {'reused':>7} {'cache on ms':>12} {'cache off ms':>13} "
          f"{'transformers ms':>16} " + " ".join(f"{name:>20}" for name, _ in kept_cols)
          + f" {'hf / on':>8} {'best hf kept / on':>18} {'bandwidth':>10}")
    for i, (turn, n, reused, on, off, ref, frac) in enumerate(rows):
        kept_t = [times[i] for _, times in kept_cols]
        print(f"{turn:>4} {n:>8} {reused:>7} {on * 1e3:>12.2f} {off * 1e3:>13.2f} {ref * 1e3:>16.2f} "
              + " ".join(f"{t * 1e3:>20.2f}" for t in kept_t)
              + f" {ref / on:>7.1f}x {min(kept_t) / on:>17.1f}x {frac:>9.0%}")
    later = rows[1:] or rows
    print(f"median from turn 2: cache on {statistics.median(r[3] for r in later) * 1e3:.2f} ms, "
          f"off {statistics.median(r[4] for r in later) * 1e3:.2f} ms, transformers "
          f"{statistics.median(r[5] for r in later) * 1e3:.2f} ms, "
          + ", ".join(f"{name[:-3]} {statistics.median(times[1:] or times) * 1e3:.2f} ms"
                      for name, times in kept_cols))


if __name__ == "__main__":
    main()
