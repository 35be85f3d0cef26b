"""Generate from a model: `python examples/generate.py --model tiny` runs offline on a tiny
random checkpoint (the machinery is real, the words are noise); `--model Qwen/Qwen3-0.6B` for real use."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from braid_engine import LLM, BraidError, ModelNotFoundError, SamplingParams
from braid_engine.testing import make_tiny_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", help="'tiny', a local directory or a hub id")
    ap.add_argument("--prompt", default="Tell me a story about a robot who learns to paint.")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model = args.model
    if model == "tiny":
        scratch = tempfile.TemporaryDirectory(prefix="braid-tiny-")  # removed when main returns
        model = make_tiny_checkpoint(scratch.name, arch="qwen3")
    try:
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        llm = LLM(model)
    except ModelNotFoundError as e:
        sys.exit(f"{e}\nNo network and no local copy? Try --model tiny (a tiny random checkpoint).")
    except BraidError as e:  # a bad option or input: the message says what to do
        sys.exit(str(e))
    messages = [{"role": "user", "content": args.prompt}]
    for turn in range(2):
        t0 = time.perf_counter()
        out = llm.chat(messages, params)[0]
        dt = time.perf_counter() - t0
        print(f"turn {turn + 1}: {out.text!r}")
        print(f"  prompt {len(out.prompt_token_ids)} tokens ({out.num_cached_tokens} reused from "
              f"the cache), {len(out.token_ids)} generated in {dt * 1000:.0f} ms, finish={out.finish_reason}")
        messages += [{"role": "assistant", "content": out.text}, {"role": "user", "content": "And then?"}]
    print("stats:", llm.stats())


if __name__ == "__main__":
    main()
