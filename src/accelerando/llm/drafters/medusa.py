"""Medusa heads: K extra decoding heads on the target's last hidden state (Cai et al. 2024, Medusa-1).

Head k (k = 1..K) predicts the token k+1 positions ahead of the hidden state's position:
``logits_k = W_out,k ResBlock_k^n(h)`` with ``ResBlock(h) = h + SiLU(W h)`` (W zero-initialised, so
a fresh head equals the target's own next-token head). The output projection ``W_out,k`` is

* ``"shared"``  the target's ``lm_head``, frozen and not saved (small files; heads only learn ResBlocks),
* ``"lowrank"`` the frozen ``lm_head`` plus a trainable rank-r correction ``B A`` (B zero-initialised),
* ``"own"``     a full copy initialised from ``lm_head`` (the paper's choice; V x H per head on disk).

Every head has its own modules (the reference code's ``[ResBlock] * n`` shares one block). Training
(``Medusa.train``) freezes the backbone: loss ``sum_k 0.8^k CE(head_k(h_t), x_{t+k+1})``. Saved as
``medusa.safetensors`` + ``medusa.json`` (config, tree, measured accuracies) in one folder.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from accelerando.llm.cache import StepHook
from accelerando.llm.drafters.base import DraftContext, DraftInput, Drafter, Proposal, Verified
from accelerando.llm.drafters.tree_draws import sample_tree_tokens
from accelerando.llm.engine import transposed
from accelerando.llm.tree import TokenTree
from accelerando.llm.tree_verify import deepest_alive_node

PROJECTIONS = ("shared", "lowrank", "own")
WEIGHTS_FILE, CONFIG_FILE = "medusa.safetensors", "medusa.json"


@dataclass
class MedusaConfig:
    hidden_size: int
    vocab_size: int
    n_heads: int = 4
    n_layers: int = 1                 # ResBlocks per head
    projection: str = "shared"        # one of PROJECTIONS
    rank: int = 32                    # for projection="lowrank"
    base_model: str = ""              # the target these heads were trained for (name or model_type)
    tree: list[list[int]] = field(default_factory=list)       # sparse tree (Medusa choices), may be empty
    top_k_accuracy: list[list[float]] = field(default_factory=list)   # [head][rank] = P(rank-i pick is right)
    distilled: bool = False           # trained on the target's own predictions (self-distillation)

    def __post_init__(self) -> None:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if min(self.hidden_size, self.vocab_size, self.n_heads, self.n_layers, self.rank) < 1:
            raise ValueError("hidden_size, vocab_size, n_heads, n_layers and rank must be >= 1")
        if self.tree:
            TokenTree.from_paths(self.tree)     # validates
            if max(len(p) for p in self.tree) > self.n_heads:
                raise ValueError(f"tree depth exceeds the {self.n_heads} heads")


class ResBlock(nn.Module):
    """h + SiLU(W h + b), W zero-initialised: starts as the identity."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + nn.functional.silu(self.linear(h))


class MedusaHead(nn.Module):
    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(cfg.hidden_size) for _ in range(cfg.n_layers)])   # distinct modules
        self.out: nn.Module | None = None
        self.down: nn.Linear | None = None
        self.up: nn.Linear | None = None
        if cfg.projection == "own":
            self.out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        elif cfg.projection == "lowrank":
            self.down = nn.Linear(cfg.hidden_size, cfg.rank, bias=False)
            self.up = nn.Linear(cfg.rank, cfg.vocab_size, bias=False)
            nn.init.zeros_(self.up.weight)

    def forward(self, h: torch.Tensor, lm_head: nn.Module | None) -> torch.Tensor:
        x = self.blocks(h)
        if self.out is not None:
            return self.out(x)
        if lm_head is None:
            raise RuntimeError("these heads share the target's lm_head: call medusa.attach(target) first")
        logits = lm_head(x)
        if self.up is not None:
            logits = logits + self.up(self.down(x))
        return logits


class Medusa(nn.Module, Drafter):
    """K Medusa heads for one target model; ``Medusa.load(path)`` / ``Medusa.train(...)`` make them."""

    def __init__(self, config: MedusaConfig):
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList([MedusaHead(config) for _ in range(config.n_heads)])
        self._lm_head: list[nn.Module] = []      # a list so the target's module is not registered (not saved)

    # --- binding to a target -------------------------------------------------------------------
    @classmethod
    def for_target(cls, target: Any, **options: Any) -> "Medusa":
        """Fresh heads for ``target`` (own projections start as copies of its lm_head)."""
        lm_head = target.get_output_embeddings()
        V, H = lm_head.weight.shape
        cfg = MedusaConfig(hidden_size=H, vocab_size=V, base_model=_model_id(target), **options)
        m = cls(cfg).to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
        for head in m.heads:
            if head.out is not None:
                head.out.weight.data.copy_(lm_head.weight.data)
        return m.attach(target)

    def check_compatible(self, target: Any, tokenizer: Any = None) -> None:
        """Raise if these heads were trained for a model with another hidden size or vocabulary."""
        lm_head = target.get_output_embeddings()
        V, H = lm_head.weight.shape
        c = self.config
        if H != c.hidden_size:
            raise ValueError(f"Medusa heads expect hidden size {c.hidden_size} (trained for {c.base_model!r}); "
                             f"the target has {H}")
        if V != c.vocab_size:
            raise ValueError(f"Medusa heads expect a vocabulary of {c.vocab_size} (trained for {c.base_model!r}); "
                             f"the target has {V}")

    def attach(self, target: Any) -> "Medusa":
        self.check_compatible(target)
        self._lm_head = [target.get_output_embeddings()]
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., H) last hidden states (what lm_head reads) -> logits (K, ..., V)."""
        lm = self._lm_head[0] if self._lm_head else None
        return torch.stack([head(h, lm) for head in self.heads])

    def draft_logits(self, h: torch.Tensor) -> torch.Tensor:
        """``forward`` for one hidden state h (H,) -> (K, V) with the K heads batched: one bmm per
        ResBlock layer and one matmul for all heads' projections (decoding; ``forward`` trains).

        The stacked weights (and the shared lm_head's, transposed once: a matmul with a contiguous
        (H, V) operand is ~2x faster on CPU than through the (V, H) weight) are built on first use
        and reused while the parameters are unchanged (same storage and ``_version``: an optimizer
        step, ``load_state_dict`` or ``.to()`` rebuilds them). Call it under ``torch.no_grad()``.
        """
        W, b, out, low = self._stacked()
        x = h.to(W.dtype).reshape(1, 1, -1).expand(W.shape[0], 1, -1)                  # (K, 1, H)
        down, up = low if low is not None else (None, None)
        return _heads_logits(x, W, b, out, down, up).squeeze(1)                         # (K, V)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
        """(W (K, n_layers, H, H) as x @ W, b (K, n_layers, H), out (H, V) shared or (K, H, V) own,
        low-rank (down (K, H, r), up (K, r, V)) | None), cached."""
        hd0 = self.heads[0]
        lm_w = None
        if hd0.out is None:
            if not self._lm_head:
                raise RuntimeError("these heads share the target's lm_head: call medusa.attach(target) first")
            lm_w = self._lm_head[0].weight
        cache = self.__dict__.get("_stack_cache")
        if cache is None or cache[0] != _param_key(cache[2]) or cache[3] is not lm_w:   # cheap check per step
            params = list(self.parameters()) + ([lm_w] if lm_w is not None else [])
            with torch.no_grad():
                W = torch.stack([torch.stack([blk.linear.weight.t() for blk in hd.blocks]) for hd in self.heads])
                b = torch.stack([torch.stack([blk.linear.bias for blk in hd.blocks]) for hd in self.heads])
                if hd0.out is not None:
                    out = torch.stack([hd.out.weight.t() for hd in self.heads]).contiguous()
                else:       # the engine's transposed lm_head, shared (one copy in memory)
                    out = transposed(lm_w)
                low = None
                if hd0.up is not None:
                    low = (torch.stack([hd.down.weight.t() for hd in self.heads]).contiguous(),
                           torch.stack([hd.up.weight.t() for hd in self.heads]).contiguous())
            cache = (_param_key(params), (W.contiguous(), b.contiguous(), out, low), params, lm_w)
            self.__dict__["_stack_cache"] = cache
        return cache[1]

    # --- drafting (the tree loop's drafter protocol) ------------------------------------------------
    needs_hidden = True
    batched = False             # one tree per step: the loop runs rows one at a time
    draft_calls = 0
    acceptance, epsilon, alpha = "exact", 0.09, 0.3

    def use_acceptance(self, rule: str = "exact", *, epsilon: float = 0.09, alpha: float = 0.3) -> "Medusa":
        """"exact": lossless (greedy at T=0, recursive rejection over sampled heads at T>0);
        "typical": Medusa's typical acceptance, p(x) > min(epsilon, alpha exp(-H(p))) -- lossy at T>0."""
        if rule not in ("exact", "typical"):
            raise ValueError(f"acceptance must be 'exact' or 'typical', got {rule!r}")
        if not (0 < epsilon <= 1 and alpha >= 0):
            raise ValueError("need 0 < epsilon <= 1 and alpha >= 0")
        self.acceptance, self.epsilon, self.alpha = rule, epsilon, alpha
        return self

    @property
    def tree(self) -> TokenTree:
        t = getattr(self, "_tree", None)
        if t is None:    # the config's tree, kept: a tree object carries its index tensors, built once
            paths, k = self.config.tree, self.config.n_heads
            cached = self.__dict__.get("_config_tree")
            # checked by identity (no key rebuilt per access); a new list or head count rebuilds it
            if cached is None or cached[0] is not paths or cached[1] != (k, len(paths)):
                tree = TokenTree.from_paths(paths) if paths else TokenTree.chain(k)
                cached = self.__dict__["_config_tree"] = (paths, (k, len(paths)), tree)
            t = cached[2]
        return t

    @property
    def max_nodes(self) -> int:
        return len(self.tree)

    def use_tree(self, tree: "TokenTree | int | Sequence[Sequence[int]]") -> "Medusa":
        """Draft with ``tree``: a TokenTree, Medusa paths, or a node budget (best sparse tree)."""
        if isinstance(tree, int):    # one tree object per budget: its index tensors are built once
            trees = self.__dict__.setdefault("_sparse_trees", {})
            key = (tree, tuple(map(tuple, self.config.top_k_accuracy)), self.config.n_heads)
            if key not in trees:
                trees[key] = self.sparse_tree(tree)
            tree = trees[key]
        elif not isinstance(tree, TokenTree):
            tree = TokenTree.from_paths(tree)
        if tree.max_depth > self.config.n_heads:
            raise ValueError(f"tree depth {tree.max_depth} exceeds the {self.config.n_heads} heads")
        self._tree = tree
        return self

    def begin(self, ctx: DraftContext) -> None:
        self.attach(ctx.target)
        self._sampling, self._generator = ctx.sampling, ctx.generator

    def step_hook(self, sampling: Any) -> Any:
        """At temperature 0, a ``StepHook`` that runs the heads inside the target's compiled tree
        step (the real Medusa computes its heads in the tree forward too): the graph runs greedy
        verification (the node it accepts, the next token, the non-finite flag: the loop takes this
        verdict instead of verifying again, ``StepHook.verdict``), runs the heads on the accepted
        node's hidden state only and returns the next tree's drafted tokens, so ``propose`` just
        prepends the root. None otherwise (sampling and typical acceptance at T > 0 read the raw
        hidden state and the loop verifies).
        """
        tree = self.tree
        if not sampling.greedy or len(tree) < 2:
            return None
        W, b, out, low = self._stacked()
        cached = self.__dict__.get("_step_hook")            # one hook per (tree, stacked weights)
        if cached is None or cached[0] is not tree or cached[1] is not W:
            K = tree.max_depth                                            # only the heads the tree reaches
            head, rank, R = medusa_picks(tree, W.device)
            t = tree.tensors(W.device)
            down, up = (low[0][:K], low[1][:K]) if low is not None else (None, None)
            args = (t["parent"], t["fail_of"].to(W.dtype), t["score"], W[:K], b[:K],
                    out[:K] if out.dim() == 3 else out, down, up, head * R + rank, R)
            cached = self.__dict__["_step_hook"] = (tree, W, StepHook(medusa_step_drafts, args, verdict=True))
        return cached[2]

    def propose(self, x: DraftInput) -> Proposal:
        return self.draft(x.root_host[0], hidden=None if x.hidden is None else x.hidden[0],
                          drafts=None if x.hook is None else x.hook[0], sampling=self._sampling,
                          generator=self._generator)

    @torch.no_grad()
    def draft(self, root: int, *, hidden: torch.Tensor | None = None, drafts: torch.Tensor | None = None,
              sampling: Any, generator: torch.Generator | None = None) -> Proposal:
        """The tree for one row from the heads at ``hidden`` (H,) (the state that produced ``root``),
        or from ``drafts`` (N-1,), the tokens the step hook already drew inside the target's step.

        A node at depth d takes head d's pick: its rank-th top token (greedy / typical), or, for
        lossless sampling, children sampled without replacement from head d's processed
        distribution (the same q for every node of a depth: Medusa heads do not see the path).
        """
        tree = self.tree
        if drafts is not None:
            return Proposal(tree, torch.cat([drafts.new_full((1,), int(root)), drafts])[None])
        logits = self.draft_logits(hidden)                                  # (K, V)
        if sampling.greedy or self.acceptance == "typical":
            head, rank, R = medusa_picks(tree, logits.device)               # built once per tree
            top = logits.topk(R, dim=-1).indices                            # (K, R)
            tokens = torch.cat([top.new_full((1,), int(root)), top[head, rank]])    # (N,) root first
            return Proposal(tree, tokens[None])
        qd = sampling.probs(logits)                                         # (K, V)
        depth_idx = tree.depth_tensor(qd.device).clamp(max=self.config.n_heads - 1)
        q = qd[depth_idx]                                                   # (N, V): children of depth-d node <- head d
        tokens = sample_tree_tokens(tree, root, q, replacement=False, generator=generator)
        return Proposal(tree, torch.tensor([tokens], device=q.device), q[None], replacement=False)

    def accept(self, step: Verified) -> None:
        pass

    def sparse_tree(self, n_nodes: int) -> TokenTree:
        """Best tree of ``n_nodes`` drafted nodes from the measured accuracies (else a top-1 chain)."""
        if self.config.top_k_accuracy:
            return TokenTree.from_paths(best_sparse_tree(self.config.top_k_accuracy, n_nodes))
        return TokenTree.chain(min(n_nodes, self.config.n_heads))

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        from accelerando._io import save_safetensors
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_safetensors(state, path / WEIGHTS_FILE)
        (path / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, *, target: Any = None, device: Any = None) -> "Medusa":
        from safetensors.torch import load_file
        path = Path(path)
        if not (path / CONFIG_FILE).exists():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {path} (expected Medusa heads saved by Medusa.save)")
        cfg = MedusaConfig(**json.loads((path / CONFIG_FILE).read_text()))
        m = cls(cfg)
        m.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        if device is not None:
            m.to(device)
        if target is not None:
            m.attach(target)
        return m.eval()

    # --- training ------------------------------------------------------------------------------
    @classmethod
    def fit(cls, target: Any, token_ids: torch.Tensor, *, n_heads: int = 4, n_layers: int = 1,
              projection: str = "shared", rank: int = 32, steps: int = 300, batch_tokens: int = 2048,
              lr: float = 1e-3, decay: float = 0.8, seq_len: int = 256, heldout_fraction: float = 0.1,
              top_k: int = 10, tree_nodes: int = 32, seed: int = 0, log_every: int = 0,
              time_limit_s: float | None = None, distill: bool = False,
              progress: Callable[[int, int], None] | None = None) -> "Medusa":
        """Medusa-1: train heads on a frozen ``target`` over a 1D stream of token ids.

        Hidden states are computed once (the backbone is frozen), then heads train on random
        position batches with loss ``sum_k decay^k CE(head_k(h_t), x_{t+k+1})``. The held-out tail
        measures per-head top-k accuracies, which choose the sparse tree stored with the heads.

        ``distill=True`` (self-distillation, as the Medusa paper recommends when the training text
        is not the target's own output): head k learns the *target's* next-token distribution at
        position t+k+1 (soft labels from the frozen ``lm_head``) instead of the corpus token, and
        accuracies count agreement with the target's argmax -- what greedy verification accepts.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        m = cls.for_target(target, n_heads=n_heads, n_layers=n_layers, projection=projection, rank=rank)
        H, X = _hidden_states(target, token_ids, seq_len)                 # (S, T, H), (S, T)
        S = H.shape[0]
        n_held = max(1, int(round(S * heldout_fraction))) if S > 1 else 0
        Htr, Xtr = H[: S - n_held], X[: S - n_held]
        K = n_heads
        T = Xtr.shape[1] - K - 1                                            # positions with all K labels
        if T <= 0:
            raise ValueError(f"sequences of {X.shape[1]} tokens are too short for {K} heads")
        lm_head = target.get_output_embeddings()

        def label_of(Hs: torch.Tensor, Xs: torch.Tensor, si: torch.Tensor, ti: torch.Tensor, k: int) -> torch.Tensor:
            """Head k's label at (row si, position ti): the corpus token x_{t+k+2}, or (distill) the
            target's distribution over it, read off its frozen lm_head at position t+k+1."""
            if not distill:
                return Xs[si, ti + k + 2]
            with torch.no_grad():
                return torch.softmax(lm_head(Hs[si, ti + k + 1]).float(), -1)

        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
        weights = [decay ** (k + 1) for k in range(K)]
        t0 = time.perf_counter()
        for step in range(steps):
            si = torch.randint(0, Htr.shape[0], (batch_tokens,), generator=g)
            ti = torch.randint(0, T, (batch_tokens,), generator=g)
            logits = m(Htr[si, ti])                                          # (K, B, V)
            loss = sum(w * nn.functional.cross_entropy(logits[k].float(), label_of(Htr, Xtr, si, ti, k))
                       for k, w in enumerate(weights))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress is not None:        # (steps done, steps): a CLI progress bar
                progress(step + 1, steps)
            if log_every and (step % log_every == 0 or step == steps - 1):
                print(f"medusa step {step} loss {loss.item():.4f}", flush=True)
            if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                break
        m.eval()
        Hev, Xev = (H[S - n_held:], X[S - n_held:]) if n_held else (Htr, Xtr)
        if distill:      # accuracy against the target's own greedy choice at each position
            Xev = target_picks(lm_head, Hev, Xev)
        acc = m.top_k_accuracy(Hev, Xev, top_k=top_k)
        m.config.distilled = distill
        m.config.top_k_accuracy = acc
        m.config.tree = best_sparse_tree(acc, tree_nodes)
        m.trained_steps = step + 1
        return m

    @torch.no_grad()
    def top_k_accuracy(self, H: torch.Tensor, X: torch.Tensor, *, top_k: int = 10) -> list[list[float]]:
        """acc[k][i] = P(head k's rank-i prediction is the true token x_{t+k+2}) on hidden states H."""
        K = self.config.n_heads
        T = X.shape[1] - K - 1
        hits = torch.zeros(K, top_k)
        n = 0
        for i in range(0, H.shape[0], 4):                                   # chunks bound the (K, N, V) logits
            h = H[i: i + 4, :T].reshape(-1, H.shape[-1])
            logits = self(h)                                                # (K, N, V)
            for k in range(K):
                top = logits[k].topk(top_k, dim=-1).indices                # (N, top_k)
                y = X[i: i + 4, k + 2: k + 2 + T].reshape(-1, 1)
                hits[k] += (top == y).float().sum(0).cpu()
            n += h.shape[0]
        return (hits / n).tolist()


class _ClassOrInstance:
    """``Medusa.train(target, ...)`` trains new heads; ``heads.train(mode)`` is nn.Module's train."""

    def __init__(self, on_class, on_instance):
        self.on_class, self.on_instance = on_class, on_instance

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self.on_class.__get__(objtype, objtype)
        return self.on_instance.__get__(obj, objtype)


Medusa.train = _ClassOrInstance(Medusa.__dict__["fit"], nn.Module.train)


def _param_key(params: list) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in params)


def medusa_picks(tree: TokenTree, device: Any = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Which head and which top-k rank fills each drafted node (nodes 1..N-1): (head (N-1,),
    rank (N-1,), R = ranks needed). A node at depth d takes head d-1's rank-th token. Cached on
    the tree (its shape does not change between steps)."""
    cache = tree.__dict__.setdefault("_medusa_picks", {})
    key = str(torch.device(device) if device is not None else torch.device("cpu"))
    if key not in cache:
        head = torch.tensor([d - 1 for d in tree.depths[1:]], dtype=torch.long, device=device)
        rank = torch.tensor(tree.ranks[1:], dtype=torch.long, device=device)
        cache[key] = (head, rank, max(tree.ranks) + 1)
    return cache[key]


def _heads_logits(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                  down: torch.Tensor | None, up: torch.Tensor | None) -> torch.Tensor:
    """x (K, M, H), one row block per head -> logits (K, M, V), the K heads batched: one bmm per
    ResBlock layer, one matmul for a shared projection (bmm for own ones), the stacked weights of
    ``Medusa._stacked``."""
    for l in range(W.shape[1]):
        x = x + nn.functional.silu(torch.baddbmm(b[:, l, None], x, W[:, l]))           # ResBlock, all heads
    if out.dim() == 3:                                                                   # own projections
        return torch.bmm(x, out)
    logits = x @ out                                                                     # (K*M, H) @ (H, V)
    if down is not None:
        logits = logits + torch.bmm(torch.bmm(x, down), up)
    return logits


def medusa_step_drafts(h: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor, parent: torch.Tensor,
                       fail_of: torch.Tensor, score: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                       out: torch.Tensor, down: torch.Tensor | None, up: torch.Tensor | None,
                       idx: torch.Tensor, R: int) -> torch.Tensor:
    """Medusa's ``StepHook`` (inside the target's compiled tree step, temperature 0).

    h (B, T, H), logits (B, T, V), ids (B, T): the step's hidden states, logits and node tokens
    (T >= N: padding columns follow the tree's N nodes). The accepted node is greedy
    verification's (``tree_verify.greedy_accept_tree``: deepest node whose path matches the
    argmax, ties to the lowest index); the heads run on its hidden state only, and node j of the
    next tree takes head ``idx[j] // R``'s rank ``idx[j] % R`` pick. Returns (B, T, N - 1 + 3): the
    N-1 drafts, then the verdict (accepted node, next token = the target's argmax there, 1 if any
    node's logits are not finite: ``speculative.verify``'s greedy answer, which the loop takes
    from here), the same for every column.
    """
    B, T, H = h.shape
    N = parent.shape[0]
    K = W.shape[0]
    top_logit, arg = logits[:, :N].max(-1)          # as sampling.checked_argmax: NaN / inf propagate, ties -> first
    bad = (~top_logit.isfinite()).any(-1, keepdim=True)                                  # (B, 1)
    node = deepest_alive_node(ids[:, :N] == arg[:, parent], fail_of, score)              # (B,)
    hn = h.gather(1, node[:, None, None].expand(B, 1, H)).reshape(1, B, H).expand(K, B, H)
    top = _heads_logits(hn, W, b, out, down, up).topk(R, dim=-1).indices                 # (K, B, R)
    drafts = top.permute(1, 0, 2).reshape(B, K * R)[:, idx]                             # (B, N-1)
    out = torch.cat([drafts, node[:, None], arg.gather(1, node[:, None]), bad.long()], 1)   # (B, N + 2)
    return out[:, None, :].expand(B, T, N + 2)


def _model_id(target: Any) -> str:
    cfg = getattr(target, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", ""))


@torch.no_grad()
@torch.no_grad()
def target_picks(lm_head: Any, H: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(S, T) ids whose position j holds the target's greedy pick for it (argmax of ``lm_head`` at
    j - 1); position 0 keeps X's token. The labels greedy verification accepts."""
    return torch.cat([X[:, :1], lm_head(H).argmax(-1)[:, :-1]], 1)


def _hidden_states(target: Any, token_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a token stream into rows of ``seq_len`` and return (last hidden states, ids), both (S, T[, H])."""
    ids = torch.as_tensor(token_ids).flatten()
    S = ids.numel() // seq_len
    if S < 1:
        raise ValueError(f"need at least {seq_len} tokens to train Medusa heads, got {ids.numel()}")
    X = ids[: S * seq_len].view(S, seq_len).to(next(target.parameters()).device)
    base = target.base_model
    hs = [base(X[i: i + 8]).last_hidden_state for i in range(0, S, 8)]
    return torch.cat(hs).detach(), X


def expected_accept_length(paths: Iterable[Sequence[int]], acc: Sequence[Sequence[float]]) -> float:
    """Expected accepted drafts per step if head k's rank-i pick is right with prob acc[k][i] (independent)."""
    return sum(math.prod(acc[d][r] for d, r in enumerate(p)) for p in paths)


def best_sparse_tree(acc: Sequence[Sequence[float]], n_nodes: int) -> list[list[int]]:
    """Greedy sparse tree: add the frontier path with the highest acceptance probability, n_nodes times.

    A node's value (probability that the whole path is accepted) never exceeds its parent's, so
    growing by the best frontier node maximises the expected accepted length for the node budget.
    """
    if n_nodes < 1:
        raise ValueError("n_nodes must be >= 1")
    K, R = len(acc), len(acc[0])
    chosen: list[list[int]] = []
    frontier = {(r,): acc[0][r] for r in range(R)}
    while frontier and len(chosen) < n_nodes:
        p, v = max(frontier.items(), key=lambda kv: (kv[1], [-x for x in kv[0]]))
        del frontier[p]
        chosen.append(list(p))
        if len(p) < K:
            for r in range(R):
                frontier[p + (r,)] = v * acc[len(p)][r]
    return chosen
