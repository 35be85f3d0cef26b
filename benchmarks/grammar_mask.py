"""Per-token cost of grammar masks on this machine, next to the forward pass they overlap.

Run: ``PYTHONPATH=. python benchmarks/grammar_mask.py [checkpoint]`` (default: a tiny random
Qwen3 written to a temporary directory). Prints µs/token for filling one request's mask and
applying it, and the decode forward time of the same model for comparison.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from braid_engine import LLM, GuidedDecoding, SamplingParams
from braid_engine.testing import make_tiny_checkpoint

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
TOOL_TAG = {"type": "structural_tag", "format": {
    "type": "triggered_tags", "triggers": ["<tool_call>"],
    "tags": [{"type": "tag", "begin": '<tool_call>\n{"name": "f", "arguments": ',
              "content": {"type": "json_schema", "json_schema": SCHEMA},
              "end": "}\n</tool_call>"}]}}
TEXT = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "notes"]}'


def mask_cost(llm: LLM, guided: GuidedDecoding, text: str) -> tuple[float, float, int]:
    """µs/token to fill and to apply one mask, replaying ``text`` token by token."""
    runtime = llm.engine.grammar()
    matcher = runtime.matcher(guided)
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    logits = torch.randn(1, llm.model_config.vocab_size)
    fill = apply = 0.0
    for tok in ids:
        t0 = time.perf_counter()
        mask = runtime.fill([matcher])
        t1 = time.perf_counter()
        runtime.apply(logits, mask, [0])
        t2 = time.perf_counter()
        fill, apply = fill + t1 - t0, apply + t2 - t1
        assert matcher.accept_token(tok), "the replayed text must match the grammar"
    return fill / len(ids) * 1e6, apply / len(ids) * 1e6, len(ids)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else make_tiny_checkpoint(
        Path(tempfile.mkdtemp()) / "qwen3", arch="qwen3")
    llm = LLM(path, device="cpu")
    print(f"vocab {llm.model_config.vocab_size}, {torch.get_num_threads()} torch threads")
    cases = {"json_schema": (GuidedDecoding(json_schema=SCHEMA), TEXT),
             "structural_tag (free text, then a call)":
                 (GuidedDecoding(structural_tag=TOOL_TAG),
                  "Let me look that up.\n<tool_call>\n{\"name\": \"f\", \"arguments\": " + TEXT
                  + "}\n</tool_call>")}
    for name, (guided, text) in cases.items():
        mask_cost(llm, guided, text)  # warm up (compilation, caches)
        fill, apply, n = mask_cost(llm, guided, text)
        print(f"{name:42s} fill {fill:7.1f} µs/token  apply {apply:6.1f} µs/token  ({n} tokens)")
    prompt = llm.encode("The quick brown fox")
    for guided in (None, GuidedDecoding(json_schema=SCHEMA)):
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=guided is None,
                                guided=guided)
        llm.engine.add_request(prompt, params).result()
        t0 = time.perf_counter()
        out = llm.engine.add_request(prompt, params).result()
        per = (time.perf_counter() - t0) / len(out.token_ids) * 1e6
        print(f"end-to-end decode {'guided' if guided else 'free  '}: {per:7.1f} µs/token "
              f"({len(out.token_ids)} tokens)")
    llm.shutdown()


if __name__ == "__main__":
    main()
