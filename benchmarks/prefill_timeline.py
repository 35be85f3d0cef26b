"""Where a fresh prefill's wall time goes that its kernels do not explain: marks at each phase
of one engine step and at each decoder layer, each stamped twice — the host clock when the
CPU got there, and a CUDA event recorded there (when the GPU got there). No profiler: its own
start-up and per-launch costs hide the thing measured. A diagnostic, not a benchmark (GPU only).

    python -m benchmarks.prefill_timeline --shape qwen3-0.6b --device cuda --dtype bfloat16 --tokens 1024 4096

Reading it: where the GPU's time runs ahead of the host's by little, the GPU waits for the CPU
to launch work (the host is the bottleneck); where the gap grows, the CPU runs ahead and the
GPU is the bottleneck; a jump in both at one phase is a host–device synchronisation.
"""

from __future__ import annotations

import statistics
import time

import torch

import braid_engine.engine.engine as engine_module
from benchmarks.common import build_model, card, kv_kwargs, model_arguments
from braid_engine import LLM, SamplingParams

SHOW_LAYERS = (0, 1, 2, 14, 27)
INNER = 14  # the layer whose modules and calls are marked one by one


class Marks:
    def __init__(self) -> None:
        self.on = False
        self.inner = False  # inside layer INNER
        self.items: list[tuple[str, float, torch.cuda.Event]] = []

    def __call__(self, name: str) -> None:
        if self.on:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.items.append((name, time.perf_counter(), ev))

    def wrap(self, obj, attr: str, name: str, inner: bool = False) -> None:
        fn = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            mark = not inner or self.inner
            if mark:
                self(f"{name} begins")
            out = fn(*args, **kwargs)
            if mark:
                self(f"{name} ends")
            return out

        setattr(obj, attr, wrapper)

    def report(self) -> None:
        torch.cuda.synchronize()
        _, h0, e0 = self.items[0]
        print(f"  {'mark':<28} {'host ms':>8} {'GPU ms':>8} {'GPU behind host':>16}")
        for name, h, ev in self.items:
            layer = name.split()[1] if name.startswith("layer ") else None
            if layer is not None and int(layer) not in SHOW_LAYERS:
                continue
            host, gpu = (h - h0) * 1e3, e0.elapsed_time(ev)
            print(f"  {name:<28} {host:8.3f} {gpu:8.3f} {gpu - host:16.3f}")


def direct(runner, n: int, vocab: int) -> None:
    """The model's forward over n fresh tokens called from this (main) thread while the engine's
    loop thread sleeps: host time to issue it, and time until the GPU is done."""
    import threading

    from braid_engine.attention.base import BatchLayout

    dev, ps = runner.device, runner.page_size
    table = list(range(-(-n // ps)))
    slots = torch.arange(n, device=dev) % ps + torch.tensor(table, device=dev).repeat_interleave(ps)[:n] * ps
    ids = torch.randint(3, vocab, (n,), device=dev)
    pos = torch.arange(n, device=dev)
    issue, total = [], []
    with torch.inference_mode():
        for _ in range(6):
            runner.backend.plan(BatchLayout([n], [n], [table], ps, slots))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            runner.model(ids, pos, runner.backend)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            issue.append(t1 - t0)
            total.append(time.perf_counter() - t0)
    x = torch.zeros(16, device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    launch = (time.perf_counter() - t0) / 1000
    torch.cuda.synchronize()
    print(f"{n} tokens, forward from the main thread (a tiny torch op launches in {launch * 1e6:.1f} µs)"
          f": issue {statistics.median(issue) * 1e3:.2f} ms, "
          f"done {statistics.median(total) * 1e3:.2f} ms; threads: "
          + ", ".join(t.name for t in threading.enumerate()))


def main() -> None:
    ap = model_arguments(__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    args = ap.parse_args()
    path = build_model(args.shape, args.model)
    llm = LLM(path, device=args.device, dtype=args.dtype, enable_prefix_caching=False, **kv_kwargs(args))
    dev = llm.config.device
    if dev.type != "cuda":
        raise SystemExit("prefill_timeline needs a CUDA device")
    print(f"card: {card(dev)}; attention {llm.config.attention_backend}")
    marks = Marks()
    eng, runner = llm.engine, llm.engine.runner
    marks.wrap(eng, "step", "step")
    marks.wrap(eng.scheduler, "schedule", "schedule")
    marks.wrap(runner, "execute", "execute")
    marks.wrap(runner.backend, "plan", "plan")
    marks.wrap(runner.model, "compute_logits", "lm_head")
    marks.wrap(engine_module, "sample", "sample")
    marks.wrap(eng, "_append", "append")
    for i, layer in enumerate(runner.model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: marks(f"layer {i}"))
    inner = runner.model.model.layers[INNER]

    def scope(on: bool):
        def hook(*_):
            marks.inner = on
        return hook

    inner.register_forward_pre_hook(scope(True))
    inner.register_forward_hook(scope(False))
    for name, mod in inner.named_modules():
        if name:
            mod.register_forward_pre_hook(lambda *_, n=name: marks(f"  {n} >"))
            mod.register_forward_hook(lambda *_, n=name: marks(f"  {n} <"))
    import braid_engine.kernels.activation as activation
    import braid_engine.kernels.qk_norm_rope as qk_norm_rope

    marks.wrap(runner.backend, "attend", "  backend.attend", inner=True)
    marks.wrap(qk_norm_rope, "qk_norm_rope_write_kv", "  qk_norm_rope", inner=True)
    marks.wrap(activation, "silu_and_mul", "  silu_and_mul", inner=True)
    gen = torch.Generator().manual_seed(0)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    vocab = len(llm.tokenizer)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    for n in args.tokens:
        for _ in range(2):  # warm: the same shapes
            llm.generate([prompt(n)], one)
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            llm.generate([prompt(n)], one)
            walls.append(time.perf_counter() - t0)
        marks.items.clear()
        marks.on = True
        t0 = time.perf_counter()
        llm.generate([prompt(n)], one)
        marked = time.perf_counter() - t0
        marks.on = False
        direct(runner, n, vocab)
        print(f"{n} tokens: generate median {statistics.median(walls) * 1e3:.2f} ms "
              f"({', '.join(f'{w * 1e3:.1f}' for w in walls)}); with marks {marked * 1e3:.2f} ms")
        marks.report()
    llm.shutdown()


if __name__ == "__main__":
    main()
