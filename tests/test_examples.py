"""The examples run offline on a tiny checkpoint (smoke tests with value checks)."""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str, stdin: str | None = None) -> str:
    """The example's output; it must leave no tiny checkpoint behind (each run left ~540 KB in
    /tmp/braid-tiny-*)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--model", "tiny", *args],
                             capture_output=True, text=True, timeout=300, cwd=ROOT, input=stdin,
                             env={**os.environ, "TMPDIR": scratch})
        assert out.returncode == 0, out.stderr
        assert list(Path(scratch).glob("braid-tiny-*")) == []
    return out.stdout


def test_generate_example_reuses_the_first_turn():
    out = run("generate.py", "--max-tokens", "6")
    reused = [int(n) for n in re.findall(r"\((\d+) reused from the cache\)", out)]
    assert reused[0] == 0 and reused[1] > 0


@pytest.mark.parametrize("retriever", [[], ["--embedding-model", "tiny"]])
def test_rag_app_reads_the_shared_prefix_from_the_cache(retriever):
    out = run("rag_app.py", "--max-tokens", "4", *retriever)
    assert ("InMemoryVectorStore" in out) == bool(retriever)
    rows = re.findall(r"^.{52} +(\d+) +(\d+) +\d+\.\d\d  ", out, flags=re.M)
    assert len(rows) == 8
    assert int(rows[0][1]) == 0
    assert all(int(read) >= 0.8 * int(total) for total, read in rows[1:])


def test_chat_example_streams_turns_and_reuses_the_history():
    out = run("chat.py", "--max-tokens", "8", stdin="hello there\nand again\n/stats\n/reset\nnew\n")
    turns = [tuple(map(int, t)) for t in re.findall(r"\[(\d+) in, (\d+) cached, (\d+) out", out)]
    assert len(turns) == 3
    (in1, cached1, out1), (in2, cached2, _), _ = turns
    assert cached1 == 0 and cached2 == in1 + out1 - 1
    assert "'prefix_hits'" in out and "(new conversation)" in out


def test_agent_streaming_calls_a_tool_and_reuses_the_thread():
    out = run("agent_streaming.py")
    assert re.search(r"\[call get_weather\] \{\"city\": \"(Paris|Oslo|Tokyo)\"\}", out)
    assert re.search(r"\[get_weather → (sunny|snow|cloudy)", out)
    calls = [tuple(map(int, t)) for t in re.findall(r"\[model: (\d+) in, (\d+) cached, (\d+) out\]", out)]
    assert len(calls) >= 3 and calls[0][1] == 0
    assert all(cached > 0 for _, cached, _ in calls[1:])


def test_chat_example_drops_a_turn_the_engine_refuses():
    """Found by review: a message past the context ended the example with a traceback."""
    long = "hello there friend " * 2000
    out = run("chat.py", "--max-tokens", "4", stdin=f"hi\n{long}\nagain\n")
    assert "the message was dropped" in out
    turns = [tuple(map(int, t)) for t in re.findall(r"\[(\d+) in, (\d+) cached, (\d+) out", out)]
    assert len(turns) == 2 and turns[1][1] > 0
