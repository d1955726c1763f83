"""Every causal-LM architecture in the installed transformers' registry, built at a tiny size from its
config with random weights (nothing is downloaded: HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# Passed to each config's constructor where the config has the field (or an alias of it), so that it
# derives the rest (head_dim from hidden_size and heads, ...) itself.
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=128, max_position_embeddings=64, head_dim=16, rotary_dim=8,
    # mixture of experts
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4,
    n_shared_experts=1, shared_expert_intermediate_size=32, topk_group=1, n_group=1, first_k_dense_replace=1,
    # latent attention (DeepSeek)
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    # state-space and linear-attention layers (their reference kernels pad to the chunk size)
    mamba_chunk_size=8, chunk_size=8, mamba_d_state=16, state_size=16, mamba_n_heads=8,
    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=4, linear_num_value_heads=4,
    # encoder-decoder families used as decoders, and the GPT-2 spellings
    d_model=64, ffn_dim=128, encoder_ffn_dim=128, decoder_ffn_dim=128, decoder_layers=2, decoder_attention_heads=4,
    encoder_layers=2, encoder_attention_heads=4, num_layers=2, num_heads=4, n_layer=2, n_head=4, n_embd=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0,
    # a plain forward without a cache: some hybrid models' cache fails on a first forward in this release
    use_cache=False,
)
MAX_PARAMS = 3_000_000  # a config whose other sizes stay large (image towers, huge vocabularies) is skipped
BATCH, SEQ = 2, 8


def architectures() -> dict[str, str]:
    """model type -> causal-LM class name."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(arch: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return _tiny(CONFIG_MAPPING[arch])


def _sizes(config) -> dict:
    """The TINY fields this config has, and its sub-configs (a multimodal model's text and vision
    towers) as tiny dicts of their own."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    sizes = {k: v for k, v in TINY.items() if k in known}
    if "kv_lora_rank" in known:  # latent attention expands keys to every head: no grouped-query heads
        sizes["num_key_value_heads"] = TINY["num_attention_heads"]
    for key, sub in vars(config).items():
        if key.endswith("_config") and hasattr(sub, "to_dict"):
            sizes[key] = {**sub.to_dict(), **_sizes(sub)}
    return sizes


def _tiny(config_class):
    default = config_class()
    try:
        return config_class(**_sizes(default))
    except Exception:  # a validator refuses the combination: set the fields one by one
        _shrink(default)
        return default


def _shrink(config):
    for k, v in TINY.items():
        if hasattr(config, k):
            try:
                setattr(config, k, v)
            except Exception:
                pass
    for key, sub in vars(config).items():
        if key.endswith("_config") and hasattr(sub, "to_dict"):
            _shrink(sub)


def build(arch: str):
    """(model, config) with seeded random weights; raises when the tiny config does not build."""
    import transformers

    config = tiny_config(arch)
    model_class = getattr(transformers, architectures()[arch])
    if not isinstance(config, model_class.config_class):  # a text-only class registered for a multimodal config
        config = config.get_text_config()
    with torch.device("meta"):  # count first: a config that stays huge must not allocate gigabytes
        size = sum(p.numel() for p in model_class(config).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"the tiny config still has {size:,} parameters")
    torch.manual_seed(0)
    return model_class(config), config


def token_ids(config) -> torch.Tensor:
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 128
    return torch.randint(3, min(vocab, 128), (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
