"""CoreInfer: sentence-level core neurons chosen at prefill, decoding with the MLP restricted to them.

CoreInfer (Wang et al., "CoreInfer: Accelerating Large Language Model Inference with
Semantics-Inspired Adaptive Sparse Activation", 2024). Notation: for token x_i the *token-wise
core neurons* C_alpha(x_i) are the top-alpha fraction of the MLP's intermediate neurons by
activation |a_i| (here a = act(gate x) * (up x), the input of ``down_proj`` in a Llama MLP); the
*sentence-wise core neurons* C^beta(s) are the neurons in C_alpha(x_i) for at least a beta
fraction of the prompt's tokens. They are chosen once, in the pre-filling pass, and fixed while
decoding: each decode step multiplies by the rows / columns of the core neurons only -- a real
smaller matmul (``W_gate[C]``, ``W_up[C]``, ``W_down[:, C]``, gathered once per prompt), not a
mask. With alpha = 1 and beta = 0 every neuron is core and the model is unchanged.

Batches: each row has its own core set (its own sentence); rows are padded to the largest set
with zero weights (a zero column of ``W_down`` adds nothing) and multiplied with ``bmm``.
Left padding is excluded from the statistics (the attention mask is read by a pre-hook).
Runs on transformers' forward (``generate``); the lean engine's compiled step reads the MLP
weights directly, so a CoreInfer model is not an engine model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class CoreInferConfig:
    """``alpha``: token-wise core fraction (0, 1]; ``beta``: sentence-wise frequency threshold
    [0, 1]. The paper's defaults are around alpha = 0.4, beta = 0.2."""

    alpha: float = 0.4
    beta: float = 0.2

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")


class _Shared:
    """State the model's pre-hook writes and every layer's ``CoreMLP`` reads (one per model)."""

    def __init__(self, cfg: CoreInferConfig):
        self.cfg = cfg
        self.mask: torch.Tensor | None = None     # (B, T) of the current forward, None = all valid


def core_neurons(a: torch.Tensor, mask: torch.Tensor | None, cfg: CoreInferConfig) -> list[torch.Tensor]:
    """Per row, the sentence-wise core neurons C^beta (sorted indices) of activations a (B, T, I)."""
    B, T, I = a.shape
    k = max(1, round(cfg.alpha * I))
    top = a.abs().topk(k, dim=-1).indices                                    # (B, T, k)
    hit = torch.zeros(B, T, I, dtype=torch.float32, device=a.device).scatter_(-1, top, 1.0)
    valid = torch.ones(B, T, device=a.device) if mask is None else mask.to(a.device, torch.float32)
    freq = (hit * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)   # (B, I)
    out = []
    for b in range(B):
        idx = (freq[b] >= cfg.beta).nonzero().flatten()
        if idx.numel() == 0:                         # beta above every frequency: keep the most frequent
            idx = freq[b].argmax().reshape(1)
        out.append(idx)
    return out


class CoreMLP(nn.Module):
    """A Llama-family MLP (gate / up / down + act_fn) that runs in full on multi-token passes
    (prefill: chooses the core neurons) and on the core neurons only on single-token steps."""

    def __init__(self, mlp: nn.Module, shared: _Shared):
        super().__init__()
        self.mlp, self.shared = mlp, shared
        self.core: list[torch.Tensor] | None = None
        self._w: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None

    @property
    def n_core(self) -> list[int]:
        return [] if self.core is None else [int(c.numel()) for c in self.core]

    def _gather(self, core: list[torch.Tensor]) -> None:
        m = self.mlp
        k = max(c.numel() for c in core)
        H = m.gate_proj.in_features
        wgu = m.gate_proj.weight.new_zeros(len(core), H, 2 * k)               # (B, H, 2k): [gate | up]^T
        wd = m.down_proj.weight.new_zeros(len(core), k, m.down_proj.out_features)
        has_b = m.gate_proj.bias is not None
        bgu = m.gate_proj.weight.new_zeros(len(core), 1, 2 * k) if has_b else None
        for b, c in enumerate(core):
            n = c.numel()
            wgu[b, :, :n] = m.gate_proj.weight[c].t()
            wgu[b, :, k:k + n] = m.up_proj.weight[c].t()
            wd[b, :n] = m.down_proj.weight[:, c].t()
            if has_b:
                bgu[b, 0, :n], bgu[b, 0, k:k + n] = m.gate_proj.bias[c], m.up_proj.bias[c]
        self._w = (wgu, wd, bgu, m.down_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        B, T, _ = x.shape
        if T > 1 or self._w is None or self._w[0].shape[0] != B:
            a = m.act_fn(m.gate_proj(x)) * m.up_proj(x)                          # (B, T, I)
            if T > 1:      # a prompt (or a new one): choose its core neurons
                self.core = core_neurons(a.detach(), self.shared.mask, self.shared.cfg)
                with torch.no_grad():
                    self._gather(self.core)
            return m.down_proj(a)
        wgu, wd, bgu, bd = self._w
        gu = torch.bmm(x, wgu)                                                   # (B, 1, 2k)
        if bgu is not None:
            gu = gu + bgu
        g, u = gu.chunk(2, dim=-1)
        y = torch.bmm(m.act_fn(g) * u, wd)                                       # (B, 1, H)
        return y if bd is None else y + bd


def apply_coreinfer(model: Any, cfg: CoreInferConfig | None = None) -> Any:
    """Swap every decoder layer's MLP for a ``CoreMLP`` (in place; returns the model). Needs a
    Llama-family MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``)."""
    cfg = cfg or CoreInferConfig()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: CoreInfer needs a Llama-family decoder")
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        if isinstance(mlp, CoreMLP):
            raise ValueError("CoreInfer is already applied to this model")
        missing = [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, n)]
        if missing:
            raise ValueError(f"layer {i}'s MLP ({type(mlp).__name__}) has no {', '.join(missing)}: "
                             "CoreInfer supports gated (Llama-family) MLPs")
    shared = _Shared(cfg)

    def pre_hook(_mod, args, kwargs):
        mask = kwargs.get("attention_mask")
        shared.mask = mask if torch.is_tensor(mask) and mask.dim() == 2 else None
    model._accelerando_coreinfer = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for layer in layers:
        layer.mlp = CoreMLP(layer.mlp, shared)
    return model


def core_fraction(model: Any) -> float:
    """Mean fraction of MLP neurons kept for decoding (over layers and rows) after the last prefill."""
    fr = [n / layer.mlp.mlp.down_proj.in_features for layer in model.model.layers
          if isinstance(layer.mlp, CoreMLP) for n in layer.mlp.n_core]
    return sum(fr) / len(fr) if fr else 1.0
