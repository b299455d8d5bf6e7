"""Tiny random-initialised causal LMs of several architectures, shared by the tests/test_llm_* files."""

from __future__ import annotations

import torch

ARCHS = ("llama", "gpt2", "qwen2", "gpt_neox")


def tiny_lm(arch: str = "llama", *, vocab: int = 96, hidden: int = 32, layers: int = 2, seed: int = 0,
            ctx: int = 256, init_std: float | None = None):
    import transformers as tf
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx)
        m = tf.LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=ctx,
                            bos_token_id=1, eos_token_id=2)
        m = tf.GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx)
        m = tf.Qwen2ForCausalLM(cfg)
    elif arch == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                               num_attention_heads=4, max_position_embeddings=ctx)
        m = tf.GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    if init_std is not None:     # sharper logits: random init is near-uniform otherwise
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2:
                    p.normal_(0, init_std)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m.eval()


def noisy_copy(model, noise: float, seed: int = 1):
    """A draft that agrees with ``model`` often but not always: its weights plus Gaussian noise."""
    import copy
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * p.std().clamp_min(1e-3))
    return d

