from braid_engine.models.layers import CausalLM


class Ernie4_5ForCausalLM(CausalLM):
    """ERNIE-4.5 dense: interleaved-pair RoPE computed in float32; optional biases."""

    interleaved_rope = True
