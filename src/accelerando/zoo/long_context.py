"""The zoo's long-context target `code-long-target`: a Llama-style RoPE model trained at 2048
tokens (positions up to 8192) on the code corpus mixed with synthetic retrieval tasks
(`accelerando.llm.kv.tasks`), so a tiny model can actually retrieve a needle from a long context.

Reuses the zoo trainer's pieces (`_stream`, `_lm_config`, `lm_eval`, cards) with its own phase loop:
a curriculum of cosine cycles at 256 -> 512 -> 1024 -> 2048 tokens, most rows synthetic multi-query
retrieval with the answer tokens' CE weighted up, each phase logging held-out exact match and the
short ones stopping early once it is reached (copying appears after a phase transition, which is
cheap at 256 tokens; the longer phases only extend it).

    python -m accelerando.zoo.long_context [--out DIR] [--seed 0]
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from accelerando.zoo import data as zoo_data
from accelerando.zoo import train as zt

NAME = "code-long-target"
TRAINED_LEN = 2048
MAX_POSITIONS = 8192


@dataclass(frozen=True)
class Phase:
    """One cosine cycle of the curriculum: `spec` (architecture, steps, lr, batch, seq_len), the share
    of rows that are retrieval sequences, the extra weight of the answer tokens' mean CE, and an
    early stop once held-out exact match at `spec.seq_len` reaches `stop_em` on two evaluations."""
    spec: zt.LMSpec
    task_fraction: float = 0.8
    copy_fraction: float = 0.0                  # rows of a random segment repeated (induction training)
    answer_weight: float = 1.0
    answer_only: bool = False                   # loss on answer / copied tokens only (head on those only)
    eval_every: int = 100
    stop_em: float = 1.01                       # > 1: never stop early

    def __post_init__(self) -> None:
        if not 0.0 <= self.task_fraction + self.copy_fraction <= 1.0 or min(self.task_fraction, self.copy_fraction) < 0:
            raise ValueError(f"task_fraction + copy_fraction must be in [0, 1], got {self.task_fraction} + {self.copy_fraction}")
        if self.answer_weight < 0 or self.eval_every < 1:
            raise ValueError("answer_weight must be >= 0 and eval_every >= 1")


def _spec(seq_len: int, steps: int, lr: float, batch_size: int) -> zt.LMSpec:
    return zt.LMSpec("target", 64, 2, 4, 128, steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len,
                     max_position_embeddings=MAX_POSITIONS)


# Copying (an induction head: match the key, copy what followed it) appears after a plateau, which
# is cheap to cross at 128 tokens on retrieval rows and repeated random segments with the loss on
# the answers / copies only; the longer phases then extend it to 2048 tokens next to code LM rows.
# (A 4-layer, 128-wide model on 256-token rows was still on the plateau after 460 steps: 10x the
# cost per step of this one.)
PHASES = (
    Phase(_spec(128, 3000, 4e-3, 16), task_fraction=0.5, copy_fraction=0.5, answer_only=True, eval_every=100,
          stop_em=0.95),
    Phase(_spec(512, 300, 2e-3, 8), task_fraction=0.6, copy_fraction=0.1, eval_every=100, stop_em=0.95),
    Phase(_spec(1024, 200, 1.5e-3, 4), task_fraction=0.6, copy_fraction=0.1, eval_every=50, stop_em=0.95),
    Phase(_spec(TRAINED_LEN, 200, 1e-3, 2), task_fraction=0.6, copy_fraction=0.1, eval_every=50),
    # retrieval at 2048 was at 0.25-0.6 after phase 4's 200 steps: a longer, retrieval-heavier cycle
    Phase(_spec(TRAINED_LEN, 600, 1e-3, 2), task_fraction=0.8, copy_fraction=0.1, eval_every=50, stop_em=0.95),
    # still 0.65-0.75 at 2048 (first answer word 0.9, second 0.83): a lower-lr, larger-batch cycle
    # resumed from phase 5's weights, retrieval-heavier again
    Phase(_spec(TRAINED_LEN, 700, 6e-4, 4), task_fraction=0.85, copy_fraction=0.05, eval_every=50, stop_em=0.95),
    # 0.80-0.95 on the last evaluations (0.875 on 40 samples): a short low-lr cycle to settle
    Phase(_spec(TRAINED_LEN, 250, 3e-4, 4), task_fraction=0.85, copy_fraction=0.05, eval_every=50, stop_em=0.95),
)
EVAL_LENGTHS = (1024, 2048, 4096, 8192)
EVAL_DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)


def copy_sequence(seq_len: int, vocab: int, *, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), ``seq_len + 1`` long: a random segment of 16-64 tokens repeated; the mask marks
    every token an induction head can predict (all but the first segment)."""
    n = int(torch.randint(16, 65, (1,), generator=gen))
    seg = torch.randint(1, vocab, (n,), generator=gen)
    ids = seg.repeat(seq_len // n + 2)[: seq_len + 1]
    mask = torch.arange(seq_len + 1) >= n + 1
    return ids, mask


def mixed_batches(spec: zt.LMSpec, stream: torch.Tensor, builder: Any, *, task_fraction: float,
                  copy_fraction: float = 0.0):
    """batches(gen) -> ((batch, seq_len + 1) ids, same-shape answer mask): retrieval sequences,
    repeated random segments and code windows, mixed per row."""
    def batches(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows, masks = [], []
        for _ in range(spec.batch_size):
            u = float(torch.rand((), generator=gen))
            if u < task_fraction:
                ids, m = builder.training_sequence(spec.seq_len, gen=gen)
            elif u < task_fraction + copy_fraction:
                ids, m = copy_sequence(spec.seq_len, spec.vocab_size, gen=gen)
            else:
                s = int(torch.randint(0, len(stream) - spec.seq_len - 1, (1,), generator=gen))
                ids, m = stream[s: s + spec.seq_len + 1], torch.zeros(spec.seq_len + 1, dtype=torch.bool)
            rows.append(ids)
            masks.append(m)
        return torch.stack(rows), torch.stack(masks)
    return batches


def _train_step(model: Any, opt: Any, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, *,
                answer_weight: float, answer_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on loss = mean CE + answer_weight * mean CE over the answer tokens ``m``
    (``answer_only``: the answer tokens' CE alone, the LM head run only there); returns (per-token
    CE, answer CE) for the log."""
    import torch.nn.functional as F
    if answer_only:    # the LM head only where there is a loss: most of a step's work saved
        h = model.model(input_ids=x).last_hidden_state[m]
        ans = F.cross_entropy(model.lm_head(h), y[m])
        ce, loss = ans, ans
    else:
        ce = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten(), reduction="none")
        ans = ce[m.flatten()].mean() if m.any() else ce.new_zeros(())
        loss = ce.mean() + answer_weight * ans
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return ce, ans


def _run_phase(model: Any, phase: Phase, batches: Any, held: Any, *, seed: int, log: list[str],
               progress: Any, label: str) -> None:
    """AdamW, warmup + cosine; loss = mean CE + answer_weight * mean CE over answer tokens."""
    spec = phase.spec
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, min(50, spec.steps // 10))
    t0, hits = time.time(), 0
    for step in range(spec.steps):
        model.train()
        batch, mask = batches(gen)
        x, y, m = batch[:, :-1], batch[:, 1:], mask[:, 1:]
        for g in opt.param_groups:
            g["lr"] = zt._cosine_lr(step, spec.steps, spec.lr, warmup)
        ce, ans = _train_step(model, opt, x, y, m, answer_weight=phase.answer_weight, answer_only=phase.answer_only)
        last = step == spec.steps - 1
        if step % 20 == 0 or last:
            msg = (f"{label}step {step + 1}/{spec.steps} ce {ce.mean().item():.3f} answer ce {ans.item():.3f} "
                   f"({time.time() - t0:.0f}s)")
            log.append(msg)
            zt._log(progress, f"[{NAME}] {msg}")
        if (step + 1) % phase.eval_every == 0 or last:
            model.eval()
            em = retrieval_table(model, held, lengths=(spec.seq_len,), per_cell=4, seed=seed + step)
            em_n = em[str(spec.seq_len)]
            log.append(f"{label}step {step + 1}: held-out exact match at {spec.seq_len} tokens {em_n:.2f}")
            zt._log(progress, f"[{NAME}] {log[-1]}")
            hits = hits + 1 if em_n >= phase.stop_em else 0
            if hits >= 2:
                log.append(f"{label}stopped early at step {step + 1} (exact match >= {phase.stop_em} twice)")
                break
    model.eval()


@torch.no_grad()
def retrieval_table(model: Any, builder: Any, *, lengths=EVAL_LENGTHS, depths=EVAL_DEPTHS,
                    per_cell: int = 2, seed: int = 1234, task: str = "multikey",
                    by_depth: bool = False) -> dict[str, Any]:
    """Full-cache exact match (teacher-forced argmax over the answer == greedy decoding of it) by
    context length (and needle depth with `by_depth`), 4-key needles on held-out filler."""
    out: dict[str, Any] = {}
    for n in lengths:
        cells: dict[str, float] = {}
        for d in depths:
            g = torch.Generator().manual_seed(seed + n + int(d * 1000))
            hits = []
            for _ in range(per_cell):
                _, _, s = builder.sample(task, n, gen=g, depth=d, n_keys=4)
                ids = torch.cat([s.prompt, s.answer])[None]
                pred = model(input_ids=ids).logits[0, len(s.prompt) - 1: -1].argmax(-1)
                hits.append(int(torch.equal(pred, s.answer)))
            cells[str(d)] = sum(hits) / len(hits)
        out[str(n)] = cells if by_depth else sum(cells.values()) / len(cells)
    return out


def heldout_lm_metrics(model: Any, tok: Any) -> dict[str, Any]:
    """Held-out code and prose bits per byte and nats per token (the card's language-model numbers)."""
    metrics: dict[str, Any] = {}
    for kind in zoo_data.KINDS:
        x, y, nb = zt.heldout_windows(tok, kind, max_windows=zt.EVAL_MAX_WINDOWS)
        m = zt.lm_eval(model, x, y, nb)
        metrics[f"heldout_{kind}_bits_per_byte"] = round(m["bits_per_byte"], 5)
        metrics[f"heldout_{kind}_nats_per_token"] = round(m["loss_nats_per_token"], 5)
    return metrics


def train_long_target(*, out_dir: str | Path | None = None, seed: int = 0, phases=PHASES,
                      progress: Any = None, eval_per_cell: int = 4, skip_phases: int = 0,
                      prior_log: list[str] | None = None) -> dict[str, Any]:
    """Train `code-long-target` (tokenizer shared with code-target) and write it with its card.
    skip_phases: continue from the checkpoint in `out_dir` written after that many phases (each
    phase depends only on the previous weights: fresh optimizer, own seed)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from accelerando.llm.kv.tasks import HaystackBuilder, corpus_filler

    out = Path(out_dir) if out_dir is not None else zt._default_dir(NAME)
    tok = AutoTokenizer.from_pretrained(str(zt._default_dir(zt.TARGET)))
    tok.model_max_length = MAX_POSITIONS
    train_texts = zoo_data.texts("code", "train") + zoo_data.texts("prose", "train")
    stream = zt._stream(tok, train_texts)
    builder = HaystackBuilder(tok, corpus_filler(tok, "train"))
    held = HaystackBuilder(tok, corpus_filler(tok, "heldout"))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(zt._lm_config(phases[-1].spec, tok)).float()
    n_params = sum(p.numel() for p in model.parameters())
    log: list[str] = list(prior_log or [])
    if skip_phases:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(out / "model.safetensors")), strict=False)
        model.tie_weights()
        log.append(f"resumed after phase {skip_phases} from {out.name}/model.safetensors")
    t0 = time.time()
    for c, ph in enumerate(phases):
        if c < skip_phases:
            continue
        _run_phase(model, ph, mixed_batches(ph.spec, stream, builder, task_fraction=ph.task_fraction,
                                            copy_fraction=ph.copy_fraction), held,
                   seed=seed + 1000 * c, log=log, progress=progress,
                   label=f"phase {c + 1}/{len(phases)} (T={ph.spec.seq_len}) ")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))          # checkpoint after every phase
        tok.save_pretrained(str(out))
    prior_s: dict[str, float] = {}       # the earlier phases' time: each phase's last elapsed count
    for ln in prior_log or []:
        m = re.match(r"(phase \d+)/\d+ .*\((\d+)s\)$", ln)
        if m:
            prior_s[m.group(1)] = max(prior_s.get(m.group(1), 0.0), float(m.group(2)))
    train_seconds = time.time() - t0 + sum(prior_s.values())
    metrics: dict[str, Any] = heldout_lm_metrics(model, tok)
    metrics["retrieval_exact_match_by_length"] = retrieval_table(model, held, per_cell=eval_per_cell)
    metrics["retrieval_exact_match_by_depth_at_trained_length"] = retrieval_table(
        model, held, lengths=(TRAINED_LEN,), per_cell=eval_per_cell, by_depth=True)
    zt._log(progress, f"[{NAME}] eval {metrics}")
    xs, ys, nbs = zt.heldout_windows(tok, "code", max_windows=zt.EVAL_SLICE_WINDOWS)
    sl = zt.lm_eval(model, xs, ys, nbs)
    last = phases[-1].spec
    card = zt._card(
        NAME, "target", "llama", "LlamaForCausalLM", n_params=n_params, seed=seed,
        steps=sum(p.spec.steps for p in phases),
        data="Python stdlib source + pydoc topics (as code-target), most rows replaced by synthetic "
             "multi-query retrieval sequences (accelerando.llm.kv.tasks: passkey / multi-key needles "
             "`#@ <key> <two words>` in code haystacks, every needle queried) and repeated random segments",
        trained_length=last.seq_len, max_position_embeddings=MAX_POSITIONS,
        tokenizer={"type": "byte-level BPE (code-target's)", "vocab_size": len(tok)},
        recipe={"num_layers": last.num_layers, "hidden_size": last.hidden_size, "num_heads": last.num_heads,
                "phases": [{**asdict(p.spec), "task_fraction": p.task_fraction, "copy_fraction": p.copy_fraction,
                            "answer_weight": p.answer_weight, "answer_only": p.answer_only, "stop_em": p.stop_em}
                           for p in phases],
                "optimizer": "AdamW(0.9,0.95)", "schedule": "warmup+cosine to 0.1 per phase, early stop on "
                "held-out exact match", "loss": "mean CE + answer_weight * mean CE of the answer tokens"},
        metrics=metrics,
        eval_slice={"kind": "code", "windows": zt.EVAL_SLICE_WINDOWS, "seq_len": zt.SEQ_LEN,
                    "loss_nats_per_token": sl["loss_nats_per_token"], "bits_per_byte": sl["bits_per_byte"]},
        train_seconds=train_seconds,
        summary=(f"Long-context target causal LM, {n_params:,} parameters, trained up to "
                 f"{last.seq_len} tokens (RoPE, {MAX_POSITIONS} positions) on code + synthetic "
                 "retrieval; the KV-cache methods' model. Retrieval exact match (full cache, 4-key "
                 "needles, held-out haystacks) by context length and depth is in metrics."),
        log=log)
    zt._write_card(out, card)
    return card


@dataclass(frozen=True)
class Anneal:
    """The last cycle, from the saved weights: `grow_layers` new decoder layers appended with their
    o_proj and down_proj zero (the model is unchanged at step 0: each new block adds 0 to the
    residual stream), then `steps` at `seq_len` with the lr annealed to 0 (cosine), held-out exact
    match on one fixed set of `eval_samples` every `eval_every` steps, the best checkpoint kept."""
    steps: int = 700
    lr: float = 4e-4
    batch_size: int = 4
    seq_len: int = TRAINED_LEN
    task_fraction: float = 0.9
    copy_fraction: float = 0.05
    answer_weight: float = 2.0
    grow_layers: int = 1
    eval_every: int = 50
    eval_samples: int = 100
    max_cpu_minutes: float = 45.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("steps, lr, batch_size and eval_every must be positive")
        if self.grow_layers < 0 or self.eval_samples < len(EVAL_DEPTHS):
            raise ValueError(f"grow_layers must be >= 0 and eval_samples >= {len(EVAL_DEPTHS)}")


def grow(model: Any, n_new: int) -> Any:
    """`model` with `n_new` decoder layers appended, each adding exactly 0 at initialisation
    (function-preserving growth: zero output projections, as in Net2Net-style deepening)."""
    from transformers import LlamaForCausalLM
    if n_new == 0:
        return model
    cfg = replace_config(model.config, num_hidden_layers=model.config.num_hidden_layers + n_new)
    big = LlamaForCausalLM(cfg).float()
    missing, unexpected = big.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("model.layers.") for k in missing if "lm_head" not in k):
        raise ValueError(f"grow: state dict mismatch ({unexpected[:3]}, {missing[:3]})")
    for layer in big.model.layers[-n_new:]:
        torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
        torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    big.tie_weights()
    return big


def replace_config(config: Any, **changes: Any) -> Any:
    c = config.__class__.from_dict(config.to_dict())
    for k, v in changes.items():
        setattr(c, k, v)
    return c


def anneal_long_target(*, src_dir: str | Path | None = None, out_dir: str | Path, plan: Anneal = Anneal(),
                       seed: int = 7, progress: Any = None) -> dict[str, Any]:
    """Run `plan` on the model in `src_dir` (default: the zoo's) and write the best checkpoint and a
    card to `out_dir`; the card's training time adds this run's CPU seconds to the source card's."""
    import json
    import math

    from transformers import AutoTokenizer, LlamaForCausalLM

    from accelerando.llm.kv.tasks import HaystackBuilder, corpus_filler

    src = Path(src_dir) if src_dir is not None else zt._default_dir(NAME)
    out = Path(out_dir)
    prior = json.loads((src / "card.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(src))
    model = grow(LlamaForCausalLM.from_pretrained(str(src)).float(), plan.grow_layers)
    stream = zt._stream(tok, zoo_data.texts("code", "train") + zoo_data.texts("prose", "train"))
    builder = HaystackBuilder(tok, corpus_filler(tok, "train"))
    held = HaystackBuilder(tok, corpus_filler(tok, "heldout"))
    spec = replace(_spec(plan.seq_len, plan.steps, plan.lr, plan.batch_size),
                   num_layers=model.config.num_hidden_layers)
    batches = mixed_batches(spec, stream, builder, task_fraction=plan.task_fraction,
                            copy_fraction=plan.copy_fraction)
    per_cell = plan.eval_samples // len(EVAL_DEPTHS)
    log = list(prior.get("log", [])) + [f"anneal: from {src.name} grown by {plan.grow_layers} layer(s) "
                                        f"(zero o_proj/down_proj), {asdict(plan)}"]
    zt._log(progress, f"[{NAME}] {log[-1]}")

    def evaluate() -> float:      # one fixed held-out set (seed 777), so evaluations compare like with like
        model.eval()
        return retrieval_table(model, held, lengths=(plan.seq_len,), per_cell=per_cell, seed=777)[str(plan.seq_len)]

    best = evaluate()
    best_step, best_state = 0, {k: v.clone() for k, v in model.state_dict().items()}
    log.append(f"anneal step 0: held-out exact match at {plan.seq_len} ({per_cell * len(EVAL_DEPTHS)} samples) {best:.3f}")
    zt._log(progress, f"[{NAME}] {log[-1]}")
    opt = torch.optim.AdamW(model.parameters(), lr=plan.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    warmup = 30
    c0 = time.process_time()
    for step in range(plan.steps):
        model.train()
        batch, mask = batches(gen)
        x, y, m = batch[:, :-1], batch[:, 1:], mask[:, 1:]
        frac = max(0.0, step - warmup) / max(1, plan.steps - warmup)
        lr = plan.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        ce, ans = _train_step(model, opt, x, y, m, answer_weight=plan.answer_weight)
        cpu_min = (time.process_time() - c0) / 60
        if step % 20 == 0:
            log.append(f"anneal step {step + 1}/{plan.steps} lr {lr:.2e} ce {ce.mean().item():.3f} "
                       f"answer ce {ans.item():.3f} ({cpu_min:.1f} CPU min)")
            zt._log(progress, f"[{NAME}] {log[-1]}")
        last = step == plan.steps - 1 or cpu_min >= plan.max_cpu_minutes
        if (step + 1) % plan.eval_every == 0 or last:
            em = evaluate()
            log.append(f"anneal step {step + 1}: held-out exact match {em:.3f} (best {max(em, best):.3f})")
            zt._log(progress, f"[{NAME}] {log[-1]}")
            if em >= best:
                best, best_step = em, step + 1
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
                model.save_pretrained(str(out))
                tok.save_pretrained(str(out))
        if last:
            break
    anneal_cpu_s = time.process_time() - c0
    model.load_state_dict(best_state)
    model.eval()
    log.append(f"anneal: kept step {best_step} (selection set {best:.3f}); {anneal_cpu_s / 60:.1f} CPU min")
    zt._log(progress, f"[{NAME}] {log[-1]}")
    # the card's numbers come from fresh samples (seed 1234), not the set the checkpoint was chosen on
    metrics: dict[str, Any] = heldout_lm_metrics(model, tok)
    em_len = retrieval_table(model, held, lengths=(1024, TRAINED_LEN, 4096), per_cell=per_cell)
    em_len.update(retrieval_table(model, held, lengths=(8192,), per_cell=2))
    metrics["retrieval_exact_match_by_length"] = em_len
    metrics["retrieval_samples_per_length"] = {"1024": per_cell * 5, "2048": per_cell * 5, "4096": per_cell * 5,
                                               "8192": 10}
    metrics["retrieval_exact_match_by_depth_at_trained_length"] = retrieval_table(
        model, held, lengths=(TRAINED_LEN,), per_cell=per_cell, by_depth=True)
    zt._log(progress, f"[{NAME}] eval {metrics}")
    xs, ys, nbs = zt.heldout_windows(tok, "code", max_windows=zt.EVAL_SLICE_WINDOWS)
    sl = zt.lm_eval(model, xs, ys, nbs)
    n_params = sum(p.numel() for p in model.parameters())
    recipe = dict(prior["recipe"])
    recipe.update(num_layers=model.config.num_hidden_layers, anneal={**asdict(plan), "seed": seed,
                  "kept_step": best_step, "schedule": "warmup 30 + cosine to 0", "cpu_seconds": round(anneal_cpu_s)})
    card = {**prior, "parameters": n_params, "steps": prior["steps"] + best_step, "recipe": recipe,
            "metrics": metrics, "eval_slice": {**prior["eval_slice"], "loss_nats_per_token": sl["loss_nats_per_token"],
                                              "bits_per_byte": sl["bits_per_byte"]},
            "train_seconds": round(prior["train_seconds"] + anneal_cpu_s, 1),
            "summary": (f"Long-context target causal LM, {n_params:,} parameters, {model.config.num_hidden_layers} "
                        f"layers, trained up to {TRAINED_LEN} tokens (RoPE, {MAX_POSITIONS} positions) on code + "
                        "synthetic retrieval (a curriculum, then grown by a zero-initialised layer and annealed "
                        "at 2048); the KV-cache methods' model. Retrieval exact match (full cache, 4-key needles, "
                        "held-out haystacks, fresh samples) by context length and depth is in metrics."),
            "log": log}
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    zt._write_card(out, card)
    return card


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description=f"Train the zoo's {NAME}.")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every phase's steps (smoke runs)")
    p.add_argument("--skip-phases", type=int, default=0, help="resume from --out's checkpoint after N phases")
    p.add_argument("--only-phases", type=int, default=None, help="run only the first N phases (pilots)")
    p.add_argument("--prior-log", type=Path, default=None,
                   help="with --skip-phases: the earlier phases' progress log, kept in the card's log")
    p.add_argument("--anneal", action="store_true",
                   help="run the final Anneal cycle (grow + cosine to 0 at 2048, best of held-out evals) "
                        "on the zoo's model, writing to --out")
    p.add_argument("--anneal-steps", type=int, default=Anneal.steps)
    p.add_argument("--grow-layers", type=int, default=Anneal.grow_layers)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.anneal:
        if a.out is None:
            p.error("--anneal needs --out (the zoo's model is its source)")
        anneal_long_target(out_dir=a.out, seed=a.seed + 7, plan=Anneal(steps=a.anneal_steps, grow_layers=a.grow_layers))
        return
    phases = tuple(replace(p, spec=replace(p.spec, steps=max(1, int(p.spec.steps * a.scale)))) for p in PHASES)
    if a.only_phases is not None:
        phases = phases[: a.only_phases]
    prior = None
    if a.prior_log is not None:
        tag = f"[{NAME}] "
        prior = [ln.strip()[len(tag):] for ln in a.prior_log.read_text().splitlines() if ln.startswith(tag)]
    train_long_target(out_dir=a.out, seed=a.seed, phases=phases, eval_per_cell=4 if a.scale >= 1 else 1,
                      skip_phases=a.skip_phases, prior_log=prior)


if __name__ == "__main__":
    main()
