"""``accelerando medusa train``: train Medusa heads for a causal LM on the zoo corpus or local text files.

    accelerando medusa train --target code-target --out heads/            # zoo model + zoo corpus
    accelerando medusa train --target ./my-model --data a.txt b.py --out heads/ --steps 400
    accelerando medusa train --distill --self-generated 200 --steps 500 --out heads/   # the zoo heads' recipe

Mounted by ``accelerando.cli`` as the ``medusa`` group.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(help="Medusa heads: extra decoding heads for tree speculation.", no_args_is_help=True)


def load_texts(data: list[str] | None) -> tuple[list[str], str]:
    """Training texts: local files (any text), or the zoo corpus when none are given."""
    if data:
        texts = []
        for f in data:
            p = Path(f)
            if not p.is_file():
                raise typer.BadParameter(f"{f} is not a file")
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
        return texts, f"{len(texts)} local file(s)"
    from accelerando.zoo import data as zoo_data   # the zoo's offline corpus helpers (train split only)
    import random
    texts = list(zoo_data.code_corpus("train")) + list(zoo_data.prose_corpus("train"))
    random.Random(0).shuffle(texts)   # documents in a fixed random order: a token cap keeps both kinds
    return texts, "zoo corpus, train split (stdlib code + pydoc prose, documents shuffled; accelerando.zoo.data)"


def self_generated_rows(model: Any, tok: Any, *, n_per_kind: int = 200, prompt_len: int = 64, new_tokens: int = 192,
                        sampled_every: int = 3, seed: int = 0, batch: int = 32, compile: bool = True
                        ) -> tuple[Any, int]:
    """Medusa's self-distillation data: the target's own continuations of zoo-corpus windows.

    For each kind (code, prose; train split, documents in a seeded random order) up to 3 random
    ``prompt_len``-token windows per document until ``n_per_kind`` prompts, each continued for
    ``new_tokens`` by the target on the lean engine -- greedily, except every ``sampled_every``-th
    batch (from the second) sampled at temperature 0.7 -- plus one real-text row of the same length
    per window, so heads see both the target's own text (what they draft for at inference) and
    corpus text. Returns (rows (R, prompt_len + new_tokens) shuffled, number of generated rows).
    """
    import random

    import torch

    from accelerando.llm import engine
    from accelerando.zoo import data as zoo_data
    rng = random.Random(seed)
    prompts, corpus_rows = [], []
    for kind in ("code", "prose"):
        docs = zoo_data.texts(kind, "train")
        rng.shuffle(docs)
        got = 0
        for d in docs:
            ids = tok(d, return_tensors="pt").input_ids[0]
            if ids.numel() < prompt_len + 8:
                continue
            for _ in range(3):
                s = rng.randrange(0, ids.numel() - prompt_len)
                prompts.append(ids[s: s + prompt_len])
                got += 1
                if ids.numel() > prompt_len + new_tokens:
                    s2 = rng.randrange(0, ids.numel() - prompt_len - new_tokens)
                    corpus_rows.append(ids[s2: s2 + prompt_len + new_tokens])
            if got >= n_per_kind:
                break
    g = torch.Generator().manual_seed(seed)
    rows = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            temp = 0.7 if sampled_every and (i // batch) % sampled_every == 1 else 0.0
            rows.append(engine.generate(model, torch.stack(prompts[i: i + batch]), max_new_tokens=new_tokens,
                                        eos_token_id=[], temperature=temp, generator=g, compile=compile))
    gen = torch.cat(rows)
    mix = torch.cat([gen, torch.stack(corpus_rows[: len(gen)])])
    return mix[torch.randperm(mix.shape[0], generator=torch.Generator().manual_seed(seed + 1))], len(gen)


def train_heads(target: str, texts: list[str], out: Path, *, n_heads: int = 4, n_layers: int = 1,
                projection: str = "shared", rank: int = 32, steps: int = 300, batch_tokens: int = 2048,
                lr: float = 1e-3, max_tokens: int = 400_000, tree_nodes: int = 32, seed: int = 0,
                data_desc: str = "", log_every: int = 0, distill: bool = False, progress: Any = None,
                self_generated: int = 0) -> dict[str, Any]:
    """Train, measure held-out accuracies, pick the sparse tree, save heads + card.json; returns the card."""
    import torch

    from accelerando.bench.models import load_llm
    from accelerando.llm.drafters import Medusa

    loaded = load_llm(target)         # the one resolver: a local folder, a zoo name or a rand-llama-* spec
    model, tok = loaded.model.eval(), loaded.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    sep = tok.eos_token or "\n"
    t0 = time.perf_counter()
    seq_len = 256
    if self_generated:     # rows of the target's own continuations + corpus rows (zoo corpus), see above
        rows, n_gen = self_generated_rows(model, tok, n_per_kind=self_generated, seed=seed)
        ids, seq_len = rows.flatten(), rows.shape[1]
        data_desc = (f"{n_gen} continuations by the target itself (64-token windows of the zoo corpus train split, "
                     f"+192 tokens on the lean engine: greedy, every 3rd batch sampled at T=0.7) + {rows.shape[0] - n_gen} "
                     "corpus rows of 256 tokens (accelerando.llm.medusa_cli.self_generated_rows)")
    else:
        ids = tok(sep.join(texts), return_tensors="pt").input_ids[0][:max_tokens]
    heads = Medusa.train(model, ids, n_heads=n_heads, n_layers=n_layers, projection=projection, rank=rank,
                         steps=steps, batch_tokens=batch_tokens, lr=lr, tree_nodes=tree_nodes, seed=seed,
                         log_every=log_every, distill=distill, seq_len=seq_len, progress=progress)
    heads.config.base_model = target
    elapsed = time.perf_counter() - t0
    heads.save(out)
    n_params = sum(p.numel() for p in heads.parameters())
    acc = heads.config.top_k_accuracy
    card = {
        "name": out.name, "role": "medusa", "family": "medusa-heads (llama target)", "for_model": target,
        "architecture": f"{n_heads} Medusa heads x {n_layers} ResBlock, projection={projection}"
                        + (" (target lm_head, frozen, not stored)" if projection == "shared" else ""),
        "parameters": n_params, "data": data_desc or "local texts", "train_tokens": int(ids.numel()),
        "steps": int(getattr(heads, "trained_steps", steps)), "seed": seed, "train_seconds": round(elapsed, 1),
        "heldout_top1_accuracy": [round(a[0], 4) for a in acc],
        "heldout_top5_accuracy": [round(sum(a[:5]), 4) for a in acc],
        "heldout_topk_accuracy_by_rank": [[round(x, 4) for x in a] for a in acc],
        "labels": "target's own predictions (self-distillation); accuracies = agreement with its argmax"
                  if distill else "corpus tokens; accuracies = P(head's pick is the corpus token)",
        "tree": heads.config.tree, "torch": torch.__version__,
    }
    (out / "card.json").write_text(json.dumps(card, indent=1))
    return card


@app.command("train")
def train_cmd(
    target: Annotated[str, typer.Option(help="zoo model name or local transformers model folder")] = "code-target",
    out: Annotated[Path, typer.Option(help="folder for medusa.safetensors, medusa.json, card.json")] = Path("medusa-heads"),
    data: Annotated[Optional[list[str]], typer.Option(help="local text files (default: the zoo corpus)")] = None,
    heads: Annotated[int, typer.Option(min=1, help="number of Medusa heads")] = 4,
    layers: Annotated[int, typer.Option(min=1, help="ResBlocks per head")] = 1,
    projection: Annotated[str, typer.Option(help="shared | lowrank | own")] = "shared",
    rank: Annotated[int, typer.Option(min=1, help="rank of the lowrank projection")] = 32,
    steps: Annotated[int, typer.Option(min=1, help="optimizer steps")] = 300,
    batch_tokens: Annotated[int, typer.Option(min=1, help="positions per step")] = 2048,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-3,
    tree_nodes: Annotated[int, typer.Option(min=1, help="node budget of the stored sparse tree")] = 32,
    distill: Annotated[bool, typer.Option(help="learn the target's own next-token distributions (self-distillation) "
                                               "instead of the corpus tokens; what greedy verification accepts")] = False,
    self_generated: Annotated[int, typer.Option(min=0, help="train on N x 2 of the target's own continuations of zoo-corpus "
                                                     "windows (code and prose) + as many corpus rows (Medusa's "
                                                     "self-distillation data); 0: the corpus text only")] = 0,
    seed: int = 0,
) -> None:
    """Train Medusa-1 heads (backbone frozen) and save them beside a card with held-out accuracies."""
    if self_generated and data:
        raise typer.BadParameter("--self-generated draws its prompts from the zoo corpus; drop --data")
    texts, desc = load_texts(data)
    from accelerando.cli.progress import bar
    with bar(steps, "medusa train") as b:
        def progress(i: int, n: int) -> None:
            b.at(i, n, f"step {i}/{n}", line=i % 50 == 0 or i == n)
        card = train_heads(target, texts, out, n_heads=heads, n_layers=layers, projection=projection, rank=rank,
                           steps=steps, batch_tokens=batch_tokens, lr=lr, tree_nodes=tree_nodes, seed=seed,
                           data_desc=desc, distill=distill, self_generated=self_generated, progress=progress)
    typer.echo(f"saved {card['parameters']} parameters to {out}; held-out top-1 per head: {card['heldout_top1_accuracy']}")
