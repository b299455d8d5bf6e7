"""A light early-exit adapter: the target's hidden state after its first E layers, through one
zero-initialised residual block, then the target's own final norm and LM head (frozen, not stored).

Why: an early exit reads the final norm + LM head after layer E, which were trained for the last
layer's states; LayerSkip (Elhoushi et al. 2024) fixes this by training the whole model with an
early-exit loss. The issue allows only something light, so here only the block learns
(``h + SiLU(W h + b)``, Medusa's ResBlock, ``hidden**2 + hidden`` parameters), distilled from the
target's final next-token distribution: loss ``KL(p_target || softmax(lm_head(norm(block(h_E)))))``
(self-distillation, as in Medusa / LayerSkip's self-speculation). The target is never changed, so
self-speculation with the adapted exit stays lossless.

``ExitHead.fit(target, token_ids, exit_layer=E)`` trains one; ``save`` / ``load``;
``skip_view(target, SkipConfig(exit_layer=E), exit_head=head)`` puts it in front of the view's
final norm, so every decode path (transformers, the lean engine, the shared-cache self-speculation
of ``selfspec.py``) uses it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

WEIGHTS_FILE, CONFIG_FILE = "exit_head.safetensors", "exit_head.json"


class ExitHead(nn.Module):
    """One ResBlock applied to the layer-``exit_layer`` hidden state (identity at initialisation)."""

    def __init__(self, hidden_size: int, exit_layer: int):
        super().__init__()
        from accelerando.llm.drafters.medusa import ResBlock
        if exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1 (0 would skip every layer), got {exit_layer}")
        self.hidden_size, self.exit_layer = int(hidden_size), int(exit_layer)
        self.block = ResBlock(self.hidden_size)
        self.info: dict[str, Any] = {}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h)

    def save(self, path: str | Path) -> Path:
        from accelerando._io import save_safetensors
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_safetensors({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                         path / f"{self.exit_layer}-{WEIGHTS_FILE}")
        cfg = {"hidden_size": self.hidden_size, "exit_layer": self.exit_layer, **self.info}
        (path / f"{self.exit_layer}-{CONFIG_FILE}").write_text(json.dumps(cfg, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, exit_layer: int) -> "ExitHead":
        from safetensors.torch import load_file
        path = Path(path)
        cfg_file = path / f"{exit_layer}-{CONFIG_FILE}"
        if not cfg_file.exists():
            raise FileNotFoundError(f"no exit head for exit_layer {exit_layer} in {path} (expected {cfg_file.name})")
        cfg = json.loads(cfg_file.read_text())
        head = cls(cfg.pop("hidden_size"), cfg.pop("exit_layer"))
        head.load_state_dict(load_file(str(path / f"{exit_layer}-{WEIGHTS_FILE}")))
        head.info = cfg
        return head.eval()

    @classmethod
    def fit(cls, target: Any, token_ids: torch.Tensor, *, exit_layer: int, steps: int = 400,
            batch_tokens: int = 1024, lr: float = 2e-3, seq_len: int = 256, heldout_fraction: float = 0.1,
            seed: int = 0, time_limit_s: float | None = None, log_every: int = 0) -> "ExitHead":
        """Distil the exit at ``exit_layer`` from the frozen target over a 1D stream of token ids;
        ``info`` records the held-out top-1 agreement with the target before and after training
        (the greedy acceptance rate of a one-token draft)."""
        n_layers = target.config.num_hidden_layers
        if not 1 <= exit_layer < n_layers:
            raise ValueError(f"exit_layer must be in 1..{n_layers - 1}, got {exit_layer}")
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        H, P = exit_states(target, token_ids, exit_layer, seq_len)         # (N, hidden), (N, hidden)
        n_held = max(1, int(len(H) * heldout_fraction))
        Htr, Ptr, Hev, Pev = H[:-n_held], P[:-n_held], H[-n_held:], P[-n_held:]
        head = cls(H.shape[-1], exit_layer)
        norm, lm_head = target.model.norm, target.get_output_embeddings()
        for p in list(norm.parameters()) + list(lm_head.parameters()):
            p.requires_grad_(False)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        before = agreement(head, norm, lm_head, Hev, Pev)
        t0, step = time.perf_counter(), 0
        for step in range(steps):
            i = torch.randint(0, len(Htr), (batch_tokens,), generator=g)
            with torch.no_grad():
                logp_t = lm_head(Ptr[i]).float().log_softmax(-1)                # the target's final
            logq = lm_head(norm(head(Htr[i]))).float().log_softmax(-1)
            loss = (logp_t.exp() * (logp_t - logq)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if log_every and step % log_every == 0:
                print(f"exit head E={exit_layer} step {step} KL {loss.item():.4f}", flush=True)
            if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                break
        head.eval()
        head.info = {"steps": step + 1, "train_tokens": len(Htr), "train_seconds": round(time.perf_counter() - t0, 1),
                     "heldout_top1_agreement_untrained": round(before, 4),
                     "heldout_top1_agreement": round(agreement(head, norm, lm_head, Hev, Pev), 4)}
        for p in list(norm.parameters()) + list(lm_head.parameters()):
            p.requires_grad_(True)
        return head


def exit_head_for(target: Any, exit_layer: int) -> ExitHead:
    """The exit head trained for ``target``, stored in ``<its directory>/exit_heads`` (the zoo
    target ships heads for exits 1-3); FileNotFoundError names what is missing."""
    src = getattr(target, "name_or_path", None) or getattr(target.config, "_name_or_path", "")
    if not src:
        raise FileNotFoundError("the target was not loaded from a directory, so it has no exit_heads/")
    return ExitHead.load(Path(src) / "exit_heads", exit_layer)


@torch.no_grad()
def exit_states(target: Any, token_ids: torch.Tensor, exit_layer: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden state after layer ``exit_layer``, the target's final normed state), one row per
    position of the stream cut into rows of ``seq_len`` tokens: both (N, hidden)."""
    ids = torch.as_tensor(token_ids).flatten()
    S = ids.numel() // seq_len
    if S < 1:
        raise ValueError(f"need at least {seq_len} tokens, got {ids.numel()}")
    X = ids[: S * seq_len].view(S, seq_len)
    hs, fs = [], []
    for i in range(0, S, 8):
        out = target.model(X[i: i + 8], output_hidden_states=True)
        hs.append(out.hidden_states[exit_layer].reshape(-1, out.hidden_states[0].shape[-1]))
        fs.append(out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1]))
    return torch.cat(hs), torch.cat(fs)


@torch.no_grad()
def agreement(head: nn.Module, norm: nn.Module, lm_head: nn.Module, H: torch.Tensor, P: torch.Tensor) -> float:
    """Fraction of positions where the exit's argmax equals the target's (greedy acceptance)."""
    hits = sum(int((lm_head(norm(head(H[i:i + 4096]))).argmax(-1) == lm_head(P[i:i + 4096]).argmax(-1)).sum())
               for i in range(0, len(H), 4096))
    return hits / max(1, len(H))


def main() -> None:
    """Train the zoo target's exit heads: ``python -m accelerando.llm.compute.exit_head OUT_DIR``."""
    import argparse
    from accelerando import zoo
    from accelerando.zoo.data import code_corpus, prose_corpus
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--exits", default="1,2,3")
    ap.add_argument("--tokens", type=int, default=131072, help="training stream length (code + prose, train split)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per head")
    a = ap.parse_args()
    torch.set_num_threads(1)
    target, tok = zoo.load("code-target"), zoo.load_tokenizer()
    rows = []           # 256-token rows, code and prose alternating (the held-out tail has both)
    for corpus in (code_corpus("train"), prose_corpus("train")):
        ids = torch.tensor(tok("\n".join(corpus))["input_ids"])[: a.tokens // 2]
        rows.append(ids[: len(ids) // 256 * 256].view(-1, 256))
    n = min(len(r) for r in rows)
    ids = torch.stack([rows[0][:n], rows[1][:n]], 1).flatten()
    for e in (int(x) for x in a.exits.split(",")):
        head = ExitHead.fit(target, ids, exit_layer=e, steps=a.steps, time_limit_s=a.time_limit, log_every=50)
        head.info["command"] = f"python -m accelerando.llm.compute.exit_head {a.out} --exits {a.exits} " \
                               f"--tokens {a.tokens} --steps {a.steps}"
        head.save(a.out)
        print(f"E={e}: {head.info}", flush=True)


if __name__ == "__main__":
    main()
