"""Tiny random models for fast tests (no weights downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from dvp_server.model_store import load_tokenizer, resolve_model
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

TINY_SEED = 1234
TINY_MAX_LEN = 512
LOGIT_SCALE = 20.0
#: A tied head scales the embedding too: 5 keeps max p about 1 % (the input token's
#: own row wins; 20 would make it certain).
TIED_LOGIT_SCALE = 5.0
#: Heads for a tiny model that vLLM's CPU attention accepts (head size 64 / 2 = 32).
VLLM_TINY_HEADS = {"num_heads": 2, "num_kv_heads": 1}


def build_tiny_model(
    path: Path,
    *,
    seed: int = TINY_SEED,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tied: bool = False,
) -> Path:
    """Save a tiny random Llama with the SmolLM2 tokenizer into ``path``.

    Hidden 64, 2 layers, 4 heads (2 kv heads), 512 positions, fp32, weights from
    a fixed torch seed; the vocabulary (49152) and tokenizer (chat template
    included) are SmolLM2's, taken from :func:`resolve_model`'s directory, so
    text prompts, chat prompts and stop strings work. A standard Llama config
    that transformers and vLLM both load. vLLM's CPU attention needs a head
    size of 32 or more: pass ``**VLLM_TINY_HEADS`` (2 heads of 32, 1 kv head).
    ``tied=True``: the output head is the embedding (``tie_word_embeddings``, as
    SmolLM2), scaled by :data:`TIED_LOGIT_SCALE` only, and the checkpoint holds no
    ``lm_head.weight``.

    Returns:
        ``path``.
    """
    tokenizer = load_tokenizer(resolve_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=TINY_MAX_LEN,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # float32, torch's default dtype
    # Random init gives near-uniform logits; scale the output head up so that
    # distributions are peaked like a trained model's (max p ~ 0.1; |S| ~ 10 at
    # min_p = 0.1, ~ 1000 at 1e-3) and pruning bites. Untied: tied embeddings
    # scaled up make every step repeat its input token.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(TIED_LOGIT_SCALE if tied else LOGIT_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path
