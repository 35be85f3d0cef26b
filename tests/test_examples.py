"""The examples run offline on a tiny checkpoint (smoke tests with value checks)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model", "tiny", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_generate_example_reuses_the_first_turn():
    out = run("generate.py", "--max-tokens", "6")
    reused = [int(n) for n in re.findall(r"\((\d+) reused from the cache\)", out)]
    assert reused[0] == 0 and reused[1] > 0


def test_rag_app_reads_the_shared_prefix_from_the_cache():
    out = run("rag_app.py", "--max-tokens", "4")
    rows = re.findall(r"^.{52} +(\d+) +(\d+)  ", out, flags=re.M)
    assert len(rows) == 8
    assert int(rows[0][1]) == 0
    assert all(int(read) >= 0.8 * int(total) for total, read in rows[1:])
