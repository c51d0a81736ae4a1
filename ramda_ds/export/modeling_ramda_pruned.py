"""Per-layer widths for Llama-family and GPT-2 models pruned by ``python -m ramda_ds.export``.

Written next to the weights of a ``--layout per_layer`` export and loaded with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` (``auto_map`` in
config.json). Needs only ``transformers``. ``config.layer_sizes[i]`` holds layer i's
``intermediate_size``, ``num_attention_heads`` and ``num_key_value_heads``; the global fields are
those of the model before pruning. Every layer is the stock transformers layer built at its own
width, so the forward pass is the stock one.
"""

from __future__ import annotations

import copy

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.pytorch_utils import Conv1D


def _check_sizes(cfg, n_layers: int) -> None:
    sizes = getattr(cfg, "layer_sizes", None)
    if not isinstance(sizes, list) or len(sizes) != n_layers:
        raise ValueError(f"layer_sizes must list {n_layers} layers, got {sizes!r}")
    for i, s in enumerate(sizes):
        if min(s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]) < 1 or \
                s["num_attention_heads"] % s["num_key_value_heads"]:
            raise ValueError(f"layer {i}: bad sizes {s} (heads must be a multiple of K/V heads)")


class RamdaPrunedLlamaConfig(LlamaConfig):
    model_type = "ramda_pruned_llama"

    def validate_architecture(self):
        _check_sizes(self, self.num_hidden_layers)


class RamdaPrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = RamdaPrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        for i, s in enumerate(config.layer_sizes):
            layer_cfg = copy.copy(config)  # only to size the modules
            layer_cfg.head_dim = config.head_dim
            for key, value in s.items():
                setattr(layer_cfg, key, value)
            layer = LlamaDecoderLayer(layer_cfg, i)
            layer.self_attn.config = layer.mlp.config = config  # attention backend etc.
            self.model.layers[i] = layer
        self.post_init()


class RamdaPrunedGPT2Config(GPT2Config):
    model_type = "ramda_pruned_gpt2"

    def validate_architecture(self):
        super().validate_architecture()
        _check_sizes(self, self.n_layer)


class RamdaPrunedGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = RamdaPrunedGPT2Config

    def __init__(self, config):
        super().__init__(config)
        hd = config.n_embd // config.n_head
        for block, s in zip(self.transformer.h, config.layer_sizes):
            block.mlp = GPT2MLP(s["intermediate_size"], config)
            a, width = block.attn, s["num_attention_heads"] * hd
            a.num_heads, a.split_size = s["num_attention_heads"], width
            a.c_attn, a.c_proj = Conv1D(3 * width, config.n_embd), Conv1D(config.n_embd, width)
        self.post_init()
