"""The plot reads what benchmarks/decode.py prints (checked on a recorded H100 log)."""

from pathlib import Path

from benchmarks.plot_decode import parse

ROOT = Path(__file__).resolve().parents[1]


def test_plot_parses_a_recorded_decode_log():
    card, weights, bandwidth, rows = parse((ROOT / "docs/data/decode-h100-2026-11-27-run1.txt").read_text())
    assert card == "NVIDIA H100 80GB HBM3"
    assert (weights, bandwidth) == (1.19e9, 2.94e12)
    assert [r[0] for r in rows] == [1, 8, 32, 128]
    assert rows[0] == (1, 504.3, 15.9, 421.3)
    assert [r[3] for r in rows[1:]] == [None, None, None]
