from braid_engine.models.layers import CausalLM


class LlamaForCausalLM(CausalLM):
    """Llama / TinyLlama: the plain pre-norm decoder with rotate-half RoPE."""
