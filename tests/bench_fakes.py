"""Shared helpers for the bench / CLI tests: tiny models on disk and fake registered methods.

Fake methods are registered into a private copy of the registry (``fresh_registry``), so they
never leak into other tests that use the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from accelerando.bench import methods as registry
from accelerando.bench.methods import DiffusionOutput, LLMOutput, MethodEntry


def fresh_registry(monkeypatch):
    # import (and so register) the real families first: a family module first imported while the
    # fake registry is in place would register into it and be lost for every later test
    registry._load_families()
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_loaded", True)     # do not import the real families


class FakeClock:
    """Time moves only when a fake method says it ran for a while."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for c in [chr(i) for i in range(32, 127)] + ["\n", "\t"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # characters
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")


def make_llm(seed=0, hidden=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=112, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def make_llm_dir(path: Path, seed=0, hidden=32, layers=2) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    make_llm(seed, hidden, layers).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def make_unet(seed=0):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def make_unet_dir(path: Path, seed=0) -> Path:
    make_unet(seed).save_pretrained(path)
    (path / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    return path


def fake_make_schedule(name, num_train_timesteps=1000):
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return SimpleNamespace(name=name, alphas_cumprod=torch.cumprod(1 - betas, 0))


# ----------------------------------------------------------------------------- fake methods

def greedy_reference(model, input_ids, attention_mask, n):
    """An independent greedy loop (full recompute, no cache): the 'lossless' fake method."""
    ids, mask = input_ids, attention_mask
    for _ in range(n):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def register_fake_llm(clock: FakeClock | None = None, base_s=2.0, fast_s=0.5):
    def tick(s):
        if clock is not None:
            clock.advance(s)

    def build_generate(setup):
        def call():
            tick(base_s)
            with torch.no_grad():
                seq = setup.target.generate(setup.input_ids, attention_mask=setup.attention_mask,
                                            max_new_tokens=setup.max_new_tokens, do_sample=False,
                                            pad_token_id=setup.tokenizer.pad_token_id)
            return LLMOutput(seq, {"target_calls": setup.max_new_tokens})
        return call

    def build_exact(setup, k=4):
        def call():
            tick(fast_s)
            seq = greedy_reference(setup.target, setup.input_ids, setup.attention_mask, setup.max_new_tokens)
            return LLMOutput(seq, {"target_calls": setup.max_new_tokens // k, "accepted_tokens": 3,
                                  "acceptance_histogram": [1, 2], "rate": 0.5})
        return call

    def build_lossy(setup):
        base = build_generate(setup)

        def call():
            out = base()
            seq = out.sequences.clone()
            seq[:, -1] = (seq[:, -1] + 1) % 100 + 2          # never the pad id
            return LLMOutput(seq, {"target_calls": 1})
        return call

    def build_broken(setup):
        def call():
            raise RuntimeError("this method is broken")
        return call

    registry.register(MethodEntry("fake-generate", "llm", build_generate, lossless=True, is_baseline=True))
    registry.register(MethodEntry("fake-exact", "llm", build_exact, lossless=True, default_knobs={"k": 4}))
    registry.register(MethodEntry("fake-lossy", "llm", build_lossy, lossless=False))
    registry.register(MethodEntry("fake-broken", "llm", build_broken, lossless=True))


def _fake_sampler(setup, shift=0.0, calls_per_step=1):
    x = setup.x_T.clone()
    nfe = 0
    for i in range(setup.steps):
        for _ in range(calls_per_step):
            eps = setup.eps_fn(x, torch.full((x.shape[0],), 999 - i * (1000 // setup.steps)))
            nfe += 1
        x = x - 0.01 * eps
    return DiffusionOutput(x + shift, nfe, {"steps": setup.steps})


def register_fake_diffusion():
    registry.register(MethodEntry("fake-ddim", "diffusion",
                                  lambda s: (lambda: _fake_sampler(s)), lossless=False, is_baseline=True))
    registry.register(MethodEntry("fake-shifted", "diffusion",
                                  lambda s, shift=0.25: (lambda: _fake_sampler(s, shift=shift)),
                                  lossless=False, default_knobs={"shift": 0.25}))
