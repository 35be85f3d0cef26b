from braid_engine.models.layers import CausalLM


class Qwen3ForCausalLM(CausalLM):
    """Qwen3: per-head RMSNorm on q and k before RoPE; GQA; usually tied embeddings."""

    qk_norm = True
