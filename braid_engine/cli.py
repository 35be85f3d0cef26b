"""The ``braid`` command: chat, generate, bench, check, info.

MODEL is a local checkpoint directory, a hub id, or ``tiny`` (a tiny random checkpoint made on
the spot: the machinery runs offline, the words are noise).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from importlib import metadata

from braid_engine.errors import (
    BraidError,
    ChatTemplateError,
    InvalidRequestError,
    KVCacheFullError,
    ModelNotFoundError,
)


def _model_path(args: argparse.Namespace) -> str:
    if args.model == "tiny":
        from braid_engine.testing import make_tiny_checkpoint

        # removed when main returns (every run used to leave ~540 KB in /tmp); the engine keeps
        # what it loaded
        scratch = args.scratch.enter_context(tempfile.TemporaryDirectory(prefix="braid-tiny-"))
        return str(make_tiny_checkpoint(scratch, arch="qwen3"))
    return args.model


class _OptionError(Exception):
    """An option the engine refused (``--device``, ``--dtype``): the user's to fix, as a bad model."""


def _llm(args: argparse.Namespace):
    from braid_engine import LLM

    try:
        return LLM(_model_path(args), device=args.device, dtype=args.dtype)
    except ValueError as e:  # (the engine's settings it checks before loading are ValueErrors)
        raise _OptionError(str(e)) from e


def _at_least(low: int):
    """An argparse type: an int ≥ ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an int ≥ {low}, got {value}")
        return value
    parse.__name__ = "int"  # what argparse names in its 'invalid int value' message
    return parse


def _params(args: argparse.Namespace, model: dict | None = None):
    """The flags' SamplingParams; the settings not given are the model's (``LLM.sampling_defaults``),
    with ``model`` None SamplingParams' own (to check the flags before the model loads)."""
    from braid_engine import SamplingParams

    given = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
                                           "frequency_penalty") if getattr(args, k) is not None}
    return SamplingParams(**{**(model or {}), **given}, max_tokens=args.max_tokens, seed=args.seed)


def _template_kwargs(args: argparse.Namespace) -> dict:
    """``--no-think``: the template's enable_thinking=False (Qwen3 answers without a reasoning
    block, which its template would drop from the history, and with it that turn's reuse)."""
    return {"enable_thinking": False} if args.no_think else {}


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _llm(args)
    use_template = not args.raw and bool(getattr(llm.tokenizer, "chat_template", None))
    prompt = (llm.apply_chat_template([{"role": "user", "content": args.prompt}], **_template_kwargs(args))
              if use_template else args.prompt)
    last = None
    for delta in llm.stream(prompt, _params(args, llm.sampling_defaults)):
        print(delta.text, end="", flush=True)
        last = delta
    print(file=sys.stderr)
    print(f"[finish: {last.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _params(args)  # a bad flag is refused before the model loads, not at the first message
    llm = _llm(args)
    params = _params(args, llm.sampling_defaults)
    if not getattr(llm.tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{args.model} has no chat template (a base model?): braid chat needs one; "
                                "use `braid generate --raw MODEL PROMPT` to continue a plain prompt.")
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    start = len(messages)
    interactive = sys.stdin.isatty()
    print("Type a message; /reset starts over, /stats shows the cache, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line == "/reset":
            del messages[start:]
            print("(new conversation)", file=sys.stderr)
            continue
        if line == "/stats":
            print(llm.stats())
            continue
        messages.append({"role": "user", "content": line})
        t0 = time.perf_counter()
        text, n_out, cached, first = "", 0, 0, None
        try:
            ids = llm.apply_chat_template(messages, **_template_kwargs(args))
            for delta in llm.stream(ids, params):
                first = first or time.perf_counter()
                print(delta.text, end="", flush=True)
                text += delta.text
                n_out += len(delta.token_ids)
                cached = delta.num_cached_tokens
        except (InvalidRequestError, ChatTemplateError, KVCacheFullError) as e:
            # a turn the engine refuses (the history outgrew max_model_len, a message it cannot
            # render) ends that turn, not the session
            messages.pop()
            print(f"braid: {e}\n(the message was dropped; /reset starts a new conversation)", file=sys.stderr)
            continue
        # the rate of the tokens after the first (whose time is the first token's)
        elapsed = time.perf_counter() - (first or t0)
        rate = f"{(n_out - 1) / elapsed:.1f} tokens/s" if n_out > 1 and elapsed > 0 else "one token"
        print(f"\n[{len(ids)} in, {cached} cached, {n_out} out; first token "
              f"{((first or t0) - t0) * 1e3:.0f} ms; {rate}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": text})


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from braid_engine import SamplingParams

    llm = _llm(args)
    # ids the model can embed (a tokenizer may count tokens past its embedding rows)
    vocab = min(len(llm.tokenizer), llm.model_config.vocab_size)
    if args.prompt_tokens + args.new_tokens > llm.config.max_model_len:
        print(f"braid: --prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed max_model_len "
              f"{llm.config.max_model_len}: the decode would be cut short and its rate overstated; lower them.",
              file=sys.stderr)
        return 2
    room = llm.config.num_pages * llm.config.page_size
    over = [b for b in args.batch if b * (args.prompt_tokens + args.new_tokens) > room]
    if over:
        print(f"braid: --batch {over[0]} × ({args.prompt_tokens} + {args.new_tokens}) tokens exceeds the KV pool "
              f"({room} tokens): requests would wait or be preempted and the rate would mislead; lower them.",
              file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    print(f"{llm.model_config.architecture} on {llm.config.device} ({llm.config.dtype}), "
          f"{llm.config.attention_backend} attention")
    print(f"{'batch':>5} {'prefill ms':>11} {'decode tok/s':>13}")
    for batch in args.batch:
        prompts = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen).tolist()
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, enable_prefix_caching=False)
        many = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True,
                              enable_prefix_caching=False)
        llm.generate(prompts, many)  # warm-up
        t0 = time.perf_counter()
        llm.generate(prompts, one)
        t1 = time.perf_counter()
        # decode: from every request's first token (the prefill's) to the end of them all (the
        # difference of two whole runs' times went negative where the decode was short)
        with llm.engine.together():
            streams = [iter(llm.engine.add_request(p, many)) for p in prompts]
        for s in streams:
            next(s)
        t2 = time.perf_counter()
        for s in streams:
            for _ in s:
                pass
        decode = time.perf_counter() - t2
        print(f"{batch:>5} {(t1 - t0) * 1e3:>11.1f} {batch * (args.new_tokens - 1) / decode:>13.1f}")
    print("For comparisons with transformers on the same card, run benchmarks/decode.py.")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from braid_engine.compat import check_checkpoint
    from braid_engine.config import resolve_device, resolve_dtype
    from braid_engine.loader import load_config, resolve_model_path

    path = resolve_model_path(_model_path(args))
    try:  # the options are checked as a run would check them, though the report needs neither
        resolve_dtype(args.dtype, resolve_device(args.device), load_config(path).torch_dtype)
    except ValueError as e:
        raise _OptionError(str(e)) from e
    print(check_checkpoint(path).format())
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    for dist in ("langchain-braid", "torch", "transformers", "safetensors", "langchain-core",
                 "triton", "flashinfer-python", "xgrammar"):
        print(f"{dist:<18} {version(dist)}")
    cuda = torch.cuda.is_available()
    print(f"{'device':<18} {torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)'}")
    try:
        import flashinfer  # noqa: F401

        flashinfer_ok = cuda
    except ImportError:
        flashinfer_ok = False
    print(f"{'attention':<18} torch{', flashinfer' if flashinfer_ok else ''} "
          f"(auto picks {'flashinfer' if flashinfer_ok else 'torch'})")
    from braid_engine.kernels import fused_kernels_available

    print(f"{'fused kernels':<18} {'available' if fused_kernels_available(torch.device('cuda' if cuda else 'cpu')) else 'off (need CUDA and triton)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``braid`` command line; returns the exit status.

    Example:
        >>> main(["generate", "tiny", "Hello", "--max-tokens", "8"])
    """
    parser = argparse.ArgumentParser(prog="braid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_model(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("model", help="a local checkpoint directory, a hub id, or 'tiny'")
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        return p

    def sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
        p.add_argument("--no-think", action="store_true",
                       help="answer without a reasoning block (the chat template's enable_thinking=False)")
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        model = " (default: the model's generation_config.json, else %(off)s)"
        p.add_argument("--temperature", type=float, help="0 is greedy" + model % {"off": "1"})
        p.add_argument("--top-p", type=float, help="nucleus mass" + model % {"off": "1, off"})
        p.add_argument("--top-k", type=int, help="most likely tokens to sample among" + model % {"off": "-1, off"})
        p.add_argument("--repetition-penalty", type=float,
                       help="> 0; divides the positive logits of tokens already seen" + model % {"off": "1, off"})
        p.add_argument("--presence-penalty", type=float,
                       help="-2 to 2; subtracted once from each token the answer holds (default 0, off)")
        p.add_argument("--frequency-penalty", type=float,
                       help="-2 to 2; subtracted from a token per time the answer holds it (default 0, off)")
        p.add_argument("--seed", type=int, default=None)

    chat = with_model("chat", "chat in the terminal (streaming, per-turn stats)")
    chat.add_argument("--system", default="You are a helpful assistant.")
    sampling(chat, 512)
    gen = with_model("generate", "stream one answer to a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    sampling(gen, 256)
    bench = with_model("bench", "prefill time and decode tokens/s of the engine")
    bench.add_argument("--batch", type=_at_least(1), nargs="+", default=[1, 8])
    bench.add_argument("--prompt-tokens", type=_at_least(1), default=128)
    # decode tokens/s counts the tokens after the first (that one is the prefill's)
    bench.add_argument("--new-tokens", type=_at_least(2), default=64)
    with_model("check", "score a checkpoint's layers for the fused GPU kernels")
    sub.add_parser("info", help="versions, device and available backends")
    args = parser.parse_args(argv)
    commands = {"chat": cmd_chat, "generate": cmd_generate, "bench": cmd_bench, "check": cmd_check,
                "info": cmd_info}
    try:
        with contextlib.ExitStack() as args.scratch:  # what a command made for its run (tiny)
            return commands[args.command](args)
    except (BraidError, _OptionError) as e:
        print(f"braid: {e}", file=sys.stderr)
        if isinstance(e, ModelNotFoundError):
            print("braid: without a network or a local copy, try MODEL=tiny (a tiny random checkpoint).",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a killed pipe stage does
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141


if __name__ == "__main__":
    sys.exit(main())
