"""Tiny random checkpoints in Hugging Face format, for tests, docs and offline demos.

The weights are random, so the words they produce are noise, but every file is real: a
config.json, safetensors weights (single file or sharded), and a byte-level BPE tokenizer
with a chat template shaped like the architecture's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A conversation is a list of turns.
Each turn has a role: system, user, assistant or tool. The assistant answers the user.
Paged attention stores keys and values in fixed-size pages. A radix tree finds shared prefixes.
Hello! How are you today? I am fine, thank you. What is the weather like in Paris?
It is sunny and 21 degrees. Tell me a story about a robot who learns to paint.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026 3.14159 -7 1e-6.
JSON: {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}} [1, 2, 3] true false null
def add(a, b):\n    return a + b\n
Unicode: café, naïve, Zürich, 東京, 你好, Привет, 😀 🚀 ✓ — “quotes” and ‘apostrophes’.
Retrieval augmented generation puts documents in the prompt; many questions share one context.
The cache keeps every answer, so the next turn only pays for its new tokens.
"""

_QWEN3_TEMPLATE = r"""
{%- set ns = namespace(last_query=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- if tools -%}
<|im_start|>system
{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}Tools you may call, one signature per line inside <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

To call a tool, reply with a JSON object inside <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages and messages[0].role == 'system' -%}
<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
{%- if not loop.first %}<|im_start|>system
{{ m.content }}<|im_end|>
{% endif -%}
{%- elif m.role == 'user' -%}
<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' -%}
{%- set content = m.content if m.content is string else '' -%}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\n') -%}
{%- endif -%}
<|im_start|>assistant
{% if loop.index0 > ns.last_query %}<think>
{{ reasoning }}
</think>

{% endif %}{{ content }}
{%- for tc in (m.tool_calls or []) -%}
{%- set f = tc.function if tc.function is defined else tc -%}
{% if loop.first and content %}{{ '\n' }}{% endif %}<tool_call>
{"name": "{{ f.name }}", "arguments": {{ f.arguments if f.arguments is string else f.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}
<tool_response>
{{ m.content }}
</tool_response>
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif -%}
{%- endif -%}
"""

_LLAMA_TEMPLATE = r"""{{ bos_token }}
{%- for m in messages -%}
<|{{ m.role }}|>
{{ m.content }}{{ eos_token }}
{% endfor -%}
{%- if add_generation_prompt %}<|assistant|>
{% endif -%}"""

_ERNIE_TEMPLATE = r"""{{ bos_token }}
{%- for m in messages -%}
{%- if m.role == 'system' -%}{{ m.content }}
{% elif m.role == 'user' -%}User: {{ m.content }}
{% elif m.role == 'assistant' -%}Assistant: {{ m.content }}{{ eos_token }}
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}Assistant: {% endif -%}"""

_ARCHS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3",
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=4096,
        tie_word_embeddings=True, attention_bias=False, hidden_act="silu",
        special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        plain_added=["<think>", "</think>", "<tool_call>", "</tool_call>",
                     "<tool_response>", "</tool_response>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=_QWEN3_TEMPLATE,
    ),
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
        special=["<unk>", "<s>", "</s>"], plain_added=[],
        bos="<s>", eos="</s>", pad="</s>", template=_LLAMA_TEMPLATE,
    ),
    "ernie4_5": dict(
        architectures=["Ernie4_5ForCausalLM"], model_type="ernie4_5",
        hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=2048,
        tie_word_embeddings=True, use_bias=False, hidden_act="silu",
        special=["<unk>", "<|begin_of_sentence|>", "<|end_of_sentence|>", "<|PAD|>"],
        plain_added=[],
        bos="<|begin_of_sentence|>", eos="<|end_of_sentence|>", pad="<|PAD|>",
        template=_ERNIE_TEMPLATE,
    ),
}

SUPPORTED_TINY_ARCHS = tuple(_ARCHS)


def build_tokenizer(arch: str = "qwen3", vocab_size: int = 400):
    """A real byte-level BPE tokenizer trained on a small built-in corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = _ARCHS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=spec["special"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
        pad_token=spec["pad"], unk_token="<unk>" if "<unk>" in spec["special"] else None,
        clean_up_tokenization_spaces=False,
    )
    if spec["plain_added"]:
        fast.add_tokens(spec["plain_added"], special_tokens=False)
    fast.chat_template = spec["template"].strip("\n")
    return fast


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "qwen3",
    *,
    seed: int = 0,
    k_norm_max: float | None = None,
    init_std: float = 0.3,
    max_shard_size: str | int | None = None,
    chat_template: bool = True,
    generation_config: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random model in Hugging Face format to ``path`` and return the path.

    ``arch`` is one of ``qwen3``, ``llama``, ``ernie4_5``. ``config_overrides`` replace
    config.json fields (e.g. ``num_key_value_heads=1``). ``k_norm_max`` scales Qwen3's
    k_norm weights so their largest entry equals it (real Qwen3-0.6B reaches 96.5).
    ``max_shard_size`` (e.g. ``"20KB"``) writes sharded safetensors with an index.
    ``generation_config`` adds fields to generation_config.json (e.g. Qwen3's sampling settings
    ``{"temperature": 0.6, "top_p": 0.95, "top_k": 20}``).

    Example:
        >>> path = make_tiny_checkpoint("/tmp/tiny-qwen3", arch="qwen3")
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in _ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {SUPPORTED_TINY_ARCHS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = dict(_ARCHS[arch])
    tokenizer = build_tokenizer(arch)
    if not chat_template:
        tokenizer.chat_template = None
    cfg_fields = {k: v for k, v in spec.items()
                  if k not in ("special", "plain_added", "bos", "eos", "pad", "template")}
    cfg_fields.update(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=init_std,
    )
    cfg_fields.update(config_overrides)
    model_type = cfg_fields.pop("model_type")
    cfg_fields.pop("architectures")
    config = AutoConfig.for_model(model_type, **cfg_fields)
    config.architectures = list(spec["architectures"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * init_std)
            if k_norm_max is not None and name.endswith("k_norm.weight"):
                p.mul_(k_norm_max / p.abs().max())
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    if generation_config:
        gen_path = path / "generation_config.json"
        gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), **generation_config}, indent=2))
    return path


def forward_logits(llm, token_ids: list[int], page_size: int = 4, seed: int = 0) -> torch.Tensor:
    """Logits [len, vocab] of one prompt through ``llm``'s model and its attention backend's
    class, over a scratch paged KV cache whose pages are shuffled (so paging is exercised)."""
    from braid_engine.attention.base import BatchLayout
    from braid_engine.engine.kv_cache import allocate_kv_cache

    runner = llm.engine.runner
    cfg = llm.model_config
    n_pages = -(-len(token_ids) // page_size)
    order = torch.randperm(n_pages * 2, generator=torch.Generator().manual_seed(seed))[:n_pages].tolist()
    kv = allocate_kv_cache(cfg, n_pages * 2, page_size, llm.config.dtype, llm.config.device)
    backend = type(runner.backend)(kv, cfg.num_attention_heads, cfg.head_dim, "never")
    slots = [order[p // page_size] * page_size + p % page_size for p in range(len(token_ids))]
    dev = llm.config.device
    backend.plan(BatchLayout([len(token_ids)], [len(token_ids)], [order], page_size,
                             torch.tensor(slots, device=dev)))
    with torch.inference_mode():
        ids = torch.tensor(token_ids, device=dev)
        hidden = runner.model(ids, torch.arange(len(token_ids), device=dev), backend)
        return runner.model.compute_logits(hidden)
