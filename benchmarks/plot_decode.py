"""Plot decode tokens/s against batch size from a `benchmarks/decode.py` log: the engine, the
transformers baselines, and the bandwidth floor's ceiling (weights + KV read once per step at
the measured copy bandwidth). Needs matplotlib (`pip install matplotlib`).

    python -m benchmarks.plot_decode docs/data/decode-h100-2026-11-27-run1.txt --out docs/img/decode_h100.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

# Qwen3-0.6B: 2 (K, V) × 28 layers × 8 KV heads × 128 dims × 2 bytes
QWEN3_06B_KV_BYTES_PER_TOKEN = 2 * 28 * 8 * 128 * 2


def parse(log: str) -> tuple[str, float, float, list[tuple[int, float, float, float | None]]]:
    head = re.search(r"card: (.+?); .*weights ([\d.]+) GB; copy bandwidth ([\d.]+) TB/s", log)
    if head is None:
        raise SystemExit("not a benchmarks/decode.py log: no 'card: … weights … copy bandwidth' line")
    rows = []
    for m in re.finditer(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|-)\s", log, flags=re.M):
        rows.append((int(m[1]), float(m[2]), float(m[3]), None if m[4] == "-" else float(m[4])))
    return head[1], float(head[2]) * 1e9, float(head[3]) * 1e12, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("log", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--context", type=float, default=128 + 128 / 2, help="mean tokens of KV per sequence")
    ap.add_argument("--kv-bytes-per-token", type=int, default=QWEN3_06B_KV_BYTES_PER_TOKEN)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    card, weights, bandwidth, rows = parse(args.log.read_text())
    batch = [r[0] for r in rows]
    ceiling = [b / ((weights + b * args.context * args.kv_bytes_per_token) / bandwidth) for b in batch]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(batch, ceiling, "k--", label="bandwidth floor (ceiling)")
    ax.plot(batch, [r[1] for r in rows], "o-", label="braid (CUDA graphs)")
    ax.plot(batch, [r[2] for r in rows], "s-", label="transformers eager")
    compiled = [(r[0], r[3]) for r in rows if r[3] is not None]
    if compiled:
        ax.plot(*zip(*compiled), "^", markersize=9, label="transformers StaticCache + torch.compile")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="decode tokens/s",
           title=f"Qwen3-0.6B shape, bf16 — {card}")
    ax.set_xticks(batch, [str(b) for b in batch])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
