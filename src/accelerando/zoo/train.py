"""Reproduce the zoo's models from their offline data, deterministically given a seed.

`train(name, seed=0, steps=None, out_dir=None, progress=None)` trains one model and writes its
weights, tokenizer (LMs), `card.json` and `README.md` into `out_dir` (default: the package's zoo
folder). Drafts are distilled from `code-target`, which must exist first (in `out_dir` or the zoo).

Run everything: ``python -m accelerando.zoo.train all``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from accelerando.zoo import data as zoo_data

EOS = "<|endoftext|>"
SEQ_LEN = 256


@dataclass(frozen=True)
class LMSpec:
    """One causal LM of the zoo: its architecture and training recipe."""
    role: str                       # target | draft
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    steps: int
    lr: float
    batch_size: int = 16
    seq_len: int = SEQ_LEN
    kl_weight: float = 0.0          # drafts: weight of KL(target || draft); CE gets 1 - kl_weight
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    weight_decay: float = 0.1
    # Further cosine cycles after the first `steps` (warm restarts, SGDR): each starts from the
    # previous cycle's weights with a fresh AdamW state and its own batch generator (seed + 1000*c).
    restarts: tuple[int, ...] = ()
    # drafts: start the (tied) embedding from the target's, projected on its top principal axes
    embed_from_teacher: bool = False
    # drafts' refinement (the `restarts` cycles): their KL weight and peak LR (default: the first
    # cycle's), code windows only, and the share of each batch made of code-target's own sampled
    # continuations of code prompts (sequence-level distillation, Kim & Rush 2016), all under
    # logit distillation KL(target || draft) at every position.
    refine_kl_weight: float | None = None
    refine_lr: float | None = None
    refine_code_only: bool = False
    teacher_text: float = 0.0
    # drafts: per refinement cycle, the share of each batch made of other installed packages' code
    # (`zoo.data.extra_code`, disjoint from the out-of-corpus evaluation set), labelled by the
    # target's logits only (the refinement's KL weight should be 1: that code is not corpus text)
    refine_extra_code: tuple[float, ...] = ()

    @property
    def total_steps(self) -> int:
        return self.steps + sum(self.restarts)

    def __post_init__(self) -> None:
        if self.role not in ("target", "draft"):
            raise ValueError(f"role must be target or draft, got {self.role!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if not 0.0 <= self.kl_weight <= 1.0:
            raise ValueError("kl_weight must be in [0, 1]")
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps, lr, batch_size must be positive and seq_len >= 2")
        if any(n < 1 for n in self.restarts):
            raise ValueError("restart cycles need >= 1 step each")
        if self.refine_kl_weight is not None and not 0.0 <= self.refine_kl_weight <= 1.0:
            raise ValueError("refine_kl_weight must be in [0, 1]")
        if self.refine_lr is not None and self.refine_lr <= 0:
            raise ValueError("refine_lr must be positive")
        if not 0.0 <= self.teacher_text <= 1.0:
            raise ValueError("teacher_text must be in [0, 1]")
        if len(self.refine_extra_code) > len(self.restarts) or any(
                not 0.0 <= e or e + self.teacher_text > 1.0 for e in self.refine_extra_code):
            raise ValueError("refine_extra_code: one share per restart cycle, each >= 0 and <= 1 - teacher_text")


@dataclass(frozen=True)
class UNetSpec:
    steps: int
    lr: float = 2e-3
    batch_size: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class DiTSpec:
    """A class-conditional pixel-space DiT (diffusers `DiTTransformer2DModel`, patch size 2)."""
    steps: int
    sample_size: int = 16
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 16
    lr: float = 2e-3
    batch_size: int = 32
    label_dropout: float = 0.1          # labels -> the null class (index 10) for classifier-free guidance
    num_train_timesteps: int = 1000


@dataclass(frozen=True)
class ClassifierSpec:
    steps: int
    lr: float = 3e-3
    batch_size: int = 128


SPECS: dict[str, Any] = {
    "code-target": LMSpec("target", 192, 4, 4, 512, steps=3000, lr=3e-3, batch_size=8),
    "code-draft-small": LMSpec("draft", 128, 2, 2, 344, steps=1500, lr=4e-3, batch_size=8, kl_weight=0.8,
                               embed_from_teacher=True, restarts=(300, 400, 1200), refine_kl_weight=1.0,
                               refine_lr=2e-3, refine_code_only=True, teacher_text=0.5,
                               refine_extra_code=(0.0, 0.375, 0.375)),
    "code-draft-tiny": LMSpec("draft", 64, 1, 1, 172, steps=1500, lr=5e-3, batch_size=8, kl_weight=0.8,
                              embed_from_teacher=True, restarts=(300,), refine_kl_weight=1.0,
                              refine_lr=3e-3, refine_code_only=True, teacher_text=0.5),
    "digits-unet": UNetSpec(steps=600),
    "digits-classifier": ClassifierSpec(steps=300),
    "digits-dit": DiTSpec(steps=1500),
    "digits-dit-32": DiTSpec(steps=400, sample_size=32, batch_size=16),
}
TARGET = "code-target"
EVAL_SLICE_WINDOWS = 4          # the fixed held-out slice whose metric tests reproduce
EVAL_MAX_WINDOWS = 32           # cap on held-out windows per kind for the card's metrics


def _log(progress: Callable[..., Any] | None, msg: str) -> None:
    print(msg, flush=True)
    if progress is not None:
        progress(msg)


def _cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def _default_dir(name: str) -> Path:
    return Path(__file__).resolve().parent / "models" / name


def _card(name: str, role: str, family: str, architecture: str, *, n_params: int, seed: int, steps: int,
          data: str, recipe: dict[str, Any], metrics: dict[str, Any], eval_slice: dict[str, Any],
          train_seconds: float, summary: str, log: list[str], **extra: Any) -> dict[str, Any]:
    """A model card: the fields every zoo model records, then its own (`extra`)."""
    return {"name": name, "role": role, "family": family, "architecture": architecture,
            "parameters": n_params, "seed": seed, "steps": steps, "data": data, **extra,
            "recipe": recipe, "metrics": metrics, "eval_slice": eval_slice,
            "train_seconds": round(train_seconds, 1), "torch_threads": torch.get_num_threads(),
            "summary": summary, "log": log}


def _write_card(out: Path, card: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    lines = [f"# {card['name']}", "", card.get("summary", ""), "",
             "| field | value |", "|---|---|"]
    for k in sorted(card):
        if k in ("summary", "log"):
            continue
        v = card[k]
        lines.append(f"| {k} | `{json.dumps(v, sort_keys=True)}` |")
    if card.get("log"):
        lines += ["", "## Training log (every few steps)", "", "```"] + list(card["log"]) + ["```"]
    cycles = card.get("recipe", {}).get("cycles") or []
    if len(cycles) > 1:        # trained in cycles, each continuing from the last one's weights
        cmds = [f"`python -m accelerando.zoo.train {card['name']} --seed {card['seed']} --steps {cycles[0]} "
                f"--threads 1`"] + [f"`python -m accelerando.zoo.train {card['name']} --seed {card['seed']} "
                                    f"--steps {c} --threads 1 --resume-from <that directory>`" for c in cycles[1:]]
        lines += ["", "Reproduce: " + ", then ".join(cmds) + ".", ""]
    else:
        lines += ["", f"Reproduce: `accelerando zoo train {card['name']} --seed {card['seed']}` "
                  f"(or `python -m accelerando.zoo.train {card['name']}`).", ""]
    (out / "README.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- tokenizer

def fit_tokenizer(texts: list[str], *, vocab_size: int = 2048) -> Any:
    """A byte-level BPE (`tokenizers`) fitted on `texts`, wrapped as a PreTrainedTokenizerFast with
    `<|endoftext|>` as bos / eos / pad. Exact round trip: no prefix space, no clean-up."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, clean_up_tokenization_spaces=False,
                                   model_max_length=1024)


def _encode_docs(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each preceded by <|endoftext|>."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in _encode_docs(tokenizer, texts):
        ids.append(eos)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def foreign_windows(tokenizer: Any, *, seq_len: int = SEQ_LEN,
                    max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`heldout_windows` over code from outside the corpus (`zoo.data.foreign_code`)."""
    return _windows(tokenizer, [t for _, t in zoo_data.foreign_code()], seq_len=seq_len, max_windows=max_windows)


def foreign_code_note() -> dict[str, Any]:
    """What the drafts' out-of-corpus agreement was measured on (recorded in their cards)."""
    docs = zoo_data.foreign_code()
    return {"what": "Python source of installed third-party packages (not the stdlib the corpus comes from)",
            "packages": list(zoo_data.FOREIGN_PACKAGES), "files": [n for n, _ in docs],
            "bytes": sum(len(t.encode("utf-8")) for _, t in docs)}


def heldout_windows(tokenizer: Any, kind: str, *, seq_len: int = SEQ_LEN,
                    max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Held-out documents of `kind` as (inputs, targets) windows of `seq_len` (targets -100 where
    padded) and the UTF-8 byte count of the targets they cover. Each document starts from EOS and
    is cut into non-overlapping windows."""
    return _windows(tokenizer, zoo_data.texts(kind, "heldout"), seq_len=seq_len, max_windows=max_windows)


def _windows(tokenizer: Any, texts: list[str], *, seq_len: int,
             max_windows: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    eos = tokenizer.eos_token_id
    inputs, targets = [], []
    n_bytes = 0
    for text in texts:
        ids = [eos] + tokenizer(text, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - 1, seq_len):
            if max_windows is not None and len(inputs) >= max_windows:
                break
            chunk = ids[s: s + seq_len + 1]
            x = chunk[:-1] + [eos] * (seq_len + 1 - len(chunk))
            y = chunk[1:] + [-100] * (seq_len + 1 - len(chunk))
            inputs.append(x)
            targets.append(y)
            n_bytes += len(tokenizer.decode(chunk[1:]).encode("utf-8"))
    return torch.tensor(inputs), torch.tensor(targets), n_bytes


@torch.no_grad()
def lm_eval(model: Any, inputs: torch.Tensor, targets: torch.Tensor, n_bytes: int, *,
            reference: Any = None, batch_size: int = 8) -> dict[str, float]:
    """Held-out metrics of a causal LM: nats/token, bits/byte, and (with a reference model) the
    greedy next-token agreement with the reference on the same positions."""
    model.eval()
    nll, count, agree = 0.0, 0, 0
    for s in range(0, len(inputs), batch_size):
        x, y = inputs[s: s + batch_size], targets[s: s + batch_size]
        logits = model(input_ids=x).logits.float()
        mask = y != -100
        nll += F.cross_entropy(logits[mask], y[mask], reduction="sum").item()
        count += int(mask.sum())
        if reference is not None:
            ref = reference(input_ids=x).logits.float()
            agree += int((logits.argmax(-1) == ref.argmax(-1))[mask].sum())
    out = {"loss_nats_per_token": nll / count, "tokens": count, "bytes": n_bytes,
           "bits_per_byte": nll / math.log(2) / n_bytes}
    if reference is not None:
        out["agreement"] = agree / count
    return out


def project_embedding(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """(V, D) embedding -> (V, dim): coordinates on the top-`dim` principal axes (uncentred SVD),
    rescaled to the original per-coordinate RMS. Keeps token similarities, so a narrower draft's
    tied output layer starts out ranking tokens like the target's."""
    if dim >= emb.shape[1]:
        out = torch.zeros(emb.shape[0], dim)
        out[:, : emb.shape[1]] = emb
        return out
    _, _, vh = torch.linalg.svd(emb.double(), full_matrices=False)
    proj = emb.double() @ vh[:dim].T                                     # (V, dim)
    proj = proj * (emb.double().pow(2).mean().sqrt() / proj.pow(2).mean().sqrt())
    return proj.float()


def _lm_config(spec: LMSpec, tokenizer: Any) -> Any:
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                       num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
                       max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0)


def _lm_cycle(name: str, model: Any, teacher: Any, stream: torch.Tensor, spec: LMSpec, *, n_steps: int,
              seed: int, log: list[str], progress: Any, label: str,
              batches: Callable[[torch.Generator], torch.Tensor] | None = None) -> None:
    """One cosine cycle of `n_steps` AdamW steps on random windows of `stream` (CE, or KL+CE
    against `teacher`). `batches(gen)`, when given, supplies each (batch, seq_len + 1) batch instead
    (e.g. the long-context target's mix of code windows and synthetic retrieval tasks)."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95),
                            weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, min(30, n_steps // 10))
    t0 = time.time()
    model.train()
    for step in range(n_steps):
        if batches is not None:
            batch = batches(gen)
        else:
            starts = torch.randint(0, len(stream) - spec.seq_len - 1, (spec.batch_size,), generator=gen)
            batch = torch.stack([stream[s: s + spec.seq_len + 1] for s in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, n_steps, spec.lr, warmup)
        logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss = ce
        if teacher is not None and spec.kl_weight > 0:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=x).logits.float(), -1)
            kl = F.kl_div(F.log_softmax(logits, -1), t_logp, log_target=True, reduction="batchmean")
            kl = kl / spec.seq_len             # batchmean divides by batch only: per-token KL
            loss = spec.kl_weight * kl + (1 - spec.kl_weight) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == n_steps - 1:
            msg = f"{label}step {step + 1}/{n_steps} loss {loss.item():.4f} ce {ce.item():.4f} ({time.time() - t0:.0f}s)"
            log.append(msg)
            _log(progress, f"[{name}] {msg}")
    model.eval()


@torch.no_grad()
def teacher_continuations(teacher: Any, stream: torch.Tensor, *, n: int, seq_len: int, prompt_len: int = 32,
                          temperature: float = 0.7, batch_size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, seq_len + 1) token windows: `prompt_len` tokens of `stream` at seeded random starts, then
    the teacher's own sampled continuation (temperature `temperature`, no early stop)."""
    from accelerando.llm.cache import cache_kwarg
    kw = cache_kwarg(teacher)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(0, n, batch_size):
        m = min(batch_size, n - b)
        starts = torch.randint(0, len(stream) - prompt_len, (m,), generator=gen)
        ids = torch.stack([stream[s: s + prompt_len] for s in starts.tolist()])
        res = teacher(input_ids=ids, use_cache=True)
        cache = getattr(res, "cache", None) or res.past_key_values
        while ids.shape[1] < seq_len + 1:
            probs = torch.softmax(res.logits[:, -1].float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], 1)
            if ids.shape[1] == seq_len + 1:
                break
            res = teacher(input_ids=nxt, use_cache=True, **{kw: cache})
            cache = getattr(res, "cache", None) or res.past_key_values
        out.append(ids)
    return torch.cat(out)


def _mixed_batches(stream: torch.Tensor, pool: torch.Tensor, spec: LMSpec, extra: torch.Tensor | None = None,
                   extra_share: float = 0.0) -> Callable[[torch.Generator], torch.Tensor]:
    """Batches of `spec.batch_size` windows: a `spec.teacher_text` share drawn from `pool` (teacher
    continuations), an `extra_share` of random windows of `extra`, the rest random windows of `stream`."""
    n_pool = round(spec.batch_size * spec.teacher_text) if len(pool) else 0
    n_extra = round(spec.batch_size * extra_share) if extra is not None else 0

    def windows(src: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
        starts = torch.randint(0, len(src) - spec.seq_len - 1, (n,), generator=gen)
        return [src[s: s + spec.seq_len + 1] for s in starts.tolist()]

    def batches(gen: torch.Generator) -> torch.Tensor:
        rows = windows(stream, spec.batch_size - n_pool - n_extra, gen)
        if n_pool:
            rows += list(pool[torch.randint(0, len(pool), (n_pool,), generator=gen)])
        if n_extra:
            rows += windows(extra, n_extra, gen)
        return torch.stack(rows)
    return batches


def _train_lm(name: str, spec: LMSpec, *, seed: int, out: Path, progress: Any,
              max_train_bytes: int | None, target_dir: Path | None,
              eval_windows: int = EVAL_MAX_WINDOWS, resume_from: Path | None = None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    t0 = time.time()
    code, prose = zoo_data.texts("code", "train"), zoo_data.texts("prose", "train")
    train_texts = code + prose
    if max_train_bytes is not None:            # smoke tests: a small prefix of the corpus
        kept, total = [], 0
        for t in train_texts:
            if total >= max_train_bytes:
                break
            kept.append(t[: max_train_bytes - total])
            total += len(kept[-1])
        train_texts = kept
    teacher = None
    if spec.role == "target":
        tokenizer = fit_tokenizer(train_texts, vocab_size=spec.vocab_size)
    else:
        if target_dir is None or not (target_dir / "config.json").exists():
            raise FileNotFoundError(f"{name} is distilled from {TARGET}; train {TARGET} first "
                                    f"(looked in {target_dir})")
        tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
        teacher = AutoModelForCausalLM.from_pretrained(str(target_dir)).float().eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    _log(progress, f"[{name}] tokenizer ready ({len(tokenizer)} tokens) in {time.time() - t0:.1f}s")
    stream = _stream(tokenizer, train_texts)
    _log(progress, f"[{name}] train stream {len(stream):,} tokens")

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_lm_config(spec, tokenizer)).float()
    n_params = sum(p.numel() for p in model.parameters())
    if teacher is not None and spec.embed_from_teacher:
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(
                project_embedding(teacher.get_input_embeddings().weight.float(), spec.hidden_size))
    log: list[str] = []
    cycles = (spec.steps,) + tuple(spec.restarts)
    first, prev_seconds = 0, 0.0
    if resume_from is not None:
        # Continue a saved run of the same recipe after its first cycle: exactly what a fresh run
        # computes, since each cycle only depends on the previous weights (fresh optimizer, own RNG).
        # A saved run that did more cycles (its recipe's cycles a prefix of this one's) resumes after them.
        prev = json.loads((resume_from / "card.json").read_text())
        done = (prev["recipe"]["steps"],) + tuple(prev["recipe"].get("restarts", ()))
        if prev["seed"] != seed or done != cycles[: len(done)] or len(done) >= len(cycles):
            raise ValueError(f"{resume_from} ran cycles {done}; not a first part of this recipe's {cycles} (seed {seed})")
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(resume_from / "model.safetensors")), strict=False)
        model.tie_weights()
        first, prev_seconds = len(done), float(prev["train_seconds"])
        log.extend(prev["log"])
    t_train = time.time()
    for c in range(first, len(cycles)):
        cyc_spec, batches = spec, None
        if c > 0 and teacher is not None:          # a draft's refinement cycle
            from dataclasses import replace
            cyc_spec = replace(spec, kl_weight=spec.kl_weight if spec.refine_kl_weight is None else spec.refine_kl_weight,
                               lr=spec.lr if spec.refine_lr is None else spec.refine_lr)
            cyc_stream = _stream(tokenizer, [t for t in train_texts if t in set(code)]) if spec.refine_code_only else stream
            pool = torch.empty(0, spec.seq_len + 1, dtype=torch.long)
            if spec.teacher_text > 0:
                n_pool = max(64, round(cycles[c] * spec.batch_size * spec.teacher_text / 6))
                t_pool = time.time()
                pool = teacher_continuations(teacher, cyc_stream, n=n_pool, seq_len=spec.seq_len, seed=seed + 1000 * c + 7)
                _log(progress, f"[{name}] {n_pool} teacher continuations in {time.time() - t_pool:.0f}s")
            share = spec.refine_extra_code[c - 1] if c - 1 < len(spec.refine_extra_code) else 0.0
            extra = _stream(tokenizer, [t for _, t in zoo_data.extra_code()]) if share > 0 else None
            if extra is not None:
                _log(progress, f"[{name}] extra code for distillation: {len(extra):,} tokens ({share:.0%} of each batch)")
            batches = _mixed_batches(cyc_stream, pool, cyc_spec, extra, share)
        _lm_cycle(name, model, teacher, stream, cyc_spec, n_steps=cycles[c], seed=seed + 1000 * c, log=log,
                  progress=progress, label=f"cycle {c + 1}/{len(cycles)} " if len(cycles) > 1 else "",
                  batches=batches)
    train_seconds = time.time() - t_train + prev_seconds

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.padding_side = "left"        # decoder-only generation continues after the last column
    tokenizer.save_pretrained(str(out))
    metrics: dict[str, Any] = {}
    t_eval = time.time()
    for kind in zoo_data.KINDS:
        x, y, nb = heldout_windows(tokenizer, kind, max_windows=eval_windows)
        m = lm_eval(model, x, y, nb, reference=teacher if kind == "code" else None)
        metrics[f"heldout_{kind}_bits_per_byte"] = round(m["bits_per_byte"], 5)
        metrics[f"heldout_{kind}_nats_per_token"] = round(m["loss_nats_per_token"], 5)
        metrics[f"heldout_{kind}_tokens"] = m["tokens"]
        if "agreement" in m:
            metrics["heldout_code_agreement_with_target"] = round(m["agreement"], 5)
    if teacher is not None:
        xf, yf, nbf = foreign_windows(tokenizer, max_windows=eval_windows)
        m = lm_eval(model, xf, yf, nbf, reference=teacher)
        metrics["foreign_code_agreement_with_target"] = round(m["agreement"], 5)
        metrics["foreign_code_tokens"] = m["tokens"]
    xs, ys, nbs = heldout_windows(tokenizer, "code", max_windows=EVAL_SLICE_WINDOWS)
    sl = lm_eval(model, xs, ys, nbs, reference=teacher)
    slice_ = {"kind": "code", "windows": EVAL_SLICE_WINDOWS, "seq_len": SEQ_LEN,
              "loss_nats_per_token": sl["loss_nats_per_token"], "bits_per_byte": sl["bits_per_byte"]}
    if "agreement" in sl:
        slice_["agreement"] = sl["agreement"]
    _log(progress, f"[{name}] eval {metrics} ({time.time() - t_eval:.0f}s)")
    card = _card(
        name, spec.role, "llama", "LlamaForCausalLM", n_params=n_params, seed=seed, steps=spec.total_steps,
        data="Python stdlib source (code) + pydoc_data topics (prose), held-out by name hash "
             f"({zoo_data.HELDOUT_PERCENT}%)",
        corpus=zoo_data.corpus_stats() if max_train_bytes is None else {"max_train_bytes": max_train_bytes},
        train_tokens_stream=len(stream),
        tokenizer={"type": "byte-level BPE", "vocab_size": len(tokenizer), "special": [EOS]},
        eval_max_windows=eval_windows,
        recipe={**asdict(spec), "optimizer": "AdamW(0.9,0.95)", "schedule": "warmup+cosine to 0.1",
                "tokens_per_step": spec.batch_size * spec.seq_len,
                "loss": "CE" if teacher is None else f"{spec.kl_weight}*KL(target||draft)+{1 - spec.kl_weight:.2f}*CE"},
        metrics=metrics, eval_slice=slice_, train_seconds=train_seconds,
        summary=(f"{'Target' if teacher is None else 'Draft (distilled from code-target)'} "
                 f"causal LM, {n_params:,} parameters, trained on Python code and docs."),
        log=log)
    if teacher is not None:
        card["distilled_from"] = TARGET
        card["foreign_code"] = foreign_code_note()
        if any(spec.refine_extra_code):
            extra = zoo_data.extra_code()
            card["distillation_extra_code"] = {
                "what": "other installed packages' Python source, labelled by code-target's logits (KL only), "
                        "in the refinement cycles with a share > 0; disjoint from the foreign_code evaluation set",
                "packages": sorted({n.split("/")[0] for n, _ in extra}), "files": len(extra),
                "bytes": sum(len(t.encode("utf-8")) for _, t in extra),
                "share_per_refinement_cycle": list(spec.refine_extra_code)}
    _write_card(out, card)
    return card


# ----------------------------------------------------------------------------- diffusion

def build_unet(spec: UNetSpec | None = None) -> Any:
    from diffusers import UNet2DModel
    spec = spec or SPECS["digits-unet"]
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=tuple(spec.block_out_channels),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=32)


def ddpm_scheduler(num_train_timesteps: int = 1000) -> Any:
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", prediction_type="epsilon", clip_sample=True)


@torch.no_grad()
def unet_eval(unet: Any, x0: torch.Tensor, *, seed: int = 1234, num_train_timesteps: int = 1000,
              batch_size: int = 128, labels: torch.Tensor | None = None) -> float:
    """Held-out eps-prediction MSE at seeded timesteps and noise (one draw per image); `labels`:
    class labels of a class-conditional model (a DiT)."""
    sched = ddpm_scheduler(num_train_timesteps)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ac = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    unet.eval()
    se = 0.0
    for s in range(0, len(x0), batch_size):
        kw = {} if labels is None else {"class_labels": labels[s: s + batch_size]}
        pred = unet(xt[s: s + batch_size], t[s: s + batch_size], **kw).sample
        se += float(((pred - noise[s: s + batch_size]) ** 2).sum())
    return se / noise.numel()


def _denoiser_loop(name: str, model: Any, forward: Callable[..., Any], x_tr: torch.Tensor, y_tr: torch.Tensor, *,
                   steps: int, lr: float, batch_size: int, num_train_timesteps: int, seed: int, progress: Any,
                   label_dropout: float | None = None, max_shift: int = 1,
                   warmup: int | None = None) -> tuple[dict[str, Any], list[str], float]:
    """eps-prediction training (DDPM loss) with AdamW, warmup + cosine and an EMA of the weights.
    `forward(model, xt, t, y)` -> eps; `label_dropout` (class-conditional models) replaces labels by
    the null class `10` with that probability, for classifier-free guidance. Returns (EMA state, log,
    seconds). `warmup`: linear warmup steps (default min(100, steps / 10))."""
    ac_all = ddpm_scheduler(num_train_timesteps).alphas_cumprod.float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema_decay = 0.995
    log: list[str] = []
    t0 = time.time()
    model.train()
    warmup = warmup if warmup is not None else max(1, min(100, steps // 10))
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=gen)
        x0 = zoo_data.shift_augment(x_tr[idx], gen, max_shift)
        t = torch.randint(0, num_train_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        y = None
        if label_dropout is not None:
            drop = torch.rand(batch_size, generator=gen) < label_dropout
            y = torch.where(drop, torch.full_like(y_tr[idx], 10), y_tr[idx])
        ac = ac_all[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr, warmup)
        loss = F.mse_loss(forward(model, xt, t, y), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (step + 1) / (step + 10))
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        if step % 100 == 0 or step == steps - 1:
            msg = f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)"
            log.append(msg)
            _log(progress, f"[{name}] {msg}")
    return ema, log, time.time() - t0


def _unet_forward(model: Any, xt: torch.Tensor, t: torch.Tensor, y: Any) -> torch.Tensor:
    return model(xt, t).sample


def _train_unet(name: str, spec: UNetSpec, *, seed: int, out: Path, progress: Any) -> dict[str, Any]:
    x_tr, y_tr, x_ho, _ = zoo_data.digits_arrays()
    torch.manual_seed(seed)
    unet = build_unet(spec).float()
    n_params = sum(p.numel() for p in unet.parameters())
    ema, log, train_seconds = _denoiser_loop(name, unet, _unet_forward, x_tr, y_tr, steps=spec.steps, lr=spec.lr,
                                             batch_size=spec.batch_size, seed=seed, progress=progress,
                                             num_train_timesteps=spec.num_train_timesteps)
    ema_decay = 0.995
    unet.load_state_dict(ema)
    unet.eval()
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out), safe_serialization=True)
    ddpm_scheduler(spec.num_train_timesteps).save_pretrained(str(out / "scheduler"))
    mse = unet_eval(unet, x_ho)
    slice_mse = unet_eval(unet, x_ho[:32])
    _log(progress, f"[{name}] held-out eps MSE {mse:.5f}")
    card = _card(
        name, "unet", "ddpm", "UNet2DModel", n_params=n_params, seed=seed, steps=spec.steps,
        data="scikit-learn load_digits (8x8 -> 16x16 bilinear, [-1,1], +-1px shifts), ~15% held out by index hash",
        prediction_type="epsilon", sample_size=16, in_channels=1,
        scheduler={"num_train_timesteps": spec.num_train_timesteps, "beta_schedule": "linear",
                   "beta_start": 1e-4, "beta_end": 0.02},
        recipe={**asdict(spec), "optimizer": "AdamW", "ema_decay": ema_decay, "schedule": "warmup+cosine to 0.1"},
        metrics={"heldout_eps_mse": round(mse, 6), "heldout_images": len(x_ho)},
        eval_slice={"images": 32, "seed": 1234, "eps_mse": slice_mse}, train_seconds=train_seconds,
        summary="Epsilon-prediction UNet for 1x16x16 digits with a 1000-step linear-beta DDPM schedule "
                "(weights are the EMA).",
        log=log)
    _write_card(out, card)
    return card


def build_dit(spec: DiTSpec | None = None) -> Any:
    """diffusers' DiTTransformer2DModel for 1-channel digits: eps output only (no learned sigma),
    10 classes + a null class. The per-block label embedders' own dropout is switched off: the
    training loop drops labels itself, once per image (diffusers' embedders would each drop
    independently, so blocks would disagree about the label)."""
    from diffusers import DiTTransformer2DModel
    spec = spec or SPECS["digits-dit"]
    model = DiTTransformer2DModel(num_attention_heads=spec.num_heads, attention_head_dim=spec.head_dim,
                                  in_channels=1, out_channels=1, num_layers=spec.num_layers,
                                  sample_size=spec.sample_size, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=1)
    for m in model.modules():
        if type(m).__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    return model


def _dit_forward(model: Any, xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(xt, t, class_labels=y).sample


def dit_eps_fn(model: Any, labels: torch.Tensor, *, guidance: float = 1.0) -> Callable[..., torch.Tensor]:
    """eps(x, t) of a class-conditional zoo DiT with classifier-free guidance
    eps_u + w (eps_c - eps_u) (Ho & Salimans 2022); w = 1 is the conditional model alone."""
    null = torch.full_like(labels, 10)

    @torch.no_grad()
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        if guidance == 1.0:
            return model(x, t, class_labels=labels).sample
        out = model(torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])).sample
        e_c, e_u = out.chunk(2)
        return e_u + guidance * (e_c - e_u)
    return eps


@torch.no_grad()
def dit_sample_metrics(model: Any, *, n_per_class: int = 10, steps: int = 25, guidance: float = 1.0,
                       seed: int = 0, classifier: Any = None) -> dict[str, float]:
    """Fréchet distance (zoo classifier's features) to the held-out digits and the classifier's
    accuracy on the requested classes, of DDIM samples of a class-conditional DiT (32x32 samples
    are average-pooled to the classifier's 16x16)."""
    from accelerando import zoo
    from accelerando.diffusion.api import sample
    clf = classifier if classifier is not None else zoo.load_classifier()
    size = model.config.sample_size
    labels = torch.arange(10).repeat_interleave(n_per_class)
    x_T = torch.randn(len(labels), 1, size, size, generator=torch.Generator().manual_seed(seed))
    x0 = sample(dit_eps_fn(model, labels, guidance=guidance), x_T, method="ddim", steps=steps).clamp(-1, 1)
    x16 = F.avg_pool2d(x0, size // 16) if size > 16 else x0
    fd = zoo.frechet_distance(zoo.fid_features(x16, classifier=clf), zoo.fid_features(zoo.reference_digits(), classifier=clf))
    acc = float((clf(x16).argmax(-1) == labels).float().mean())
    return {"frechet_distance": round(fd, 4), "class_accuracy": round(acc, 4)}


def _train_dit(name: str, spec: DiTSpec, *, seed: int, out: Path, progress: Any,
               resume_from: Path | None = None) -> dict[str, Any]:
    """Train a zoo DiT; `resume_from`: a trained DiT directory of this recipe and seed whose (EMA)
    weights training continues from for `spec.steps` more steps (a fresh warmup + cosine cycle, the
    data stream seeded with seed + the steps already done so batches do not repeat)."""
    x_tr, y_tr, x_ho, y_ho = zoo_data.digits_arrays(spec.sample_size)
    torch.manual_seed(seed)
    model = build_dit(spec).float()
    n_params = sum(p.numel() for p in model.parameters())
    done, prev_log, prev_seconds, cycles = 0, [], 0.0, [spec.steps]
    if resume_from is not None:
        from safetensors.torch import load_file
        prev = json.loads((resume_from / "card.json").read_text())
        if prev.get("recipe", {}).get("sample_size") != spec.sample_size or prev.get("seed") != seed:
            raise ValueError(f"resume_from {resume_from} is not a {name} of this recipe with seed {seed}")
        model.load_state_dict(load_file(str(resume_from / "diffusion_pytorch_model.safetensors")))
        done, prev_log, prev_seconds = int(prev["steps"]), list(prev.get("log", [])), float(prev["train_seconds"])
        cycles = list(prev.get("recipe", {}).get("cycles", [done])) + [spec.steps]
    ema, log, train_seconds = _denoiser_loop(name, model, _dit_forward, x_tr, y_tr, steps=spec.steps, lr=spec.lr,
                                             batch_size=spec.batch_size, seed=seed + done, progress=progress,
                                             num_train_timesteps=spec.num_train_timesteps,
                                             label_dropout=spec.label_dropout, max_shift=spec.sample_size // 16)
    if done:
        log = prev_log + [f"-- continued from step {done} (EMA weights), new cycle of {spec.steps} steps --"] + log
        train_seconds += prev_seconds
    total_steps = done + spec.steps
    model.load_state_dict(ema)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    ddpm_scheduler(spec.num_train_timesteps).save_pretrained(str(out / "scheduler"))
    mse = unet_eval(model, x_ho, labels=y_ho)
    slice_mse = unet_eval(model, x_ho[:32], labels=y_ho[:32])
    t_eval = time.time()
    metrics: dict[str, Any] = {"heldout_eps_mse": round(mse, 6), "heldout_images": len(x_ho)}
    for w in (1.0, 2.0):
        m = dit_sample_metrics(model, guidance=w, seed=seed, n_per_class=20)
        metrics[f"cfg{w:g}_ddim25_frechet_distance"] = m["frechet_distance"]
        metrics[f"cfg{w:g}_ddim25_class_accuracy"] = m["class_accuracy"]
    _log(progress, f"[{name}] {metrics} ({time.time() - t_eval:.0f}s)")
    card = _card(
        name, "dit", "ddpm", "DiTTransformer2DModel", n_params=n_params, seed=seed, steps=total_steps,
        data=f"scikit-learn load_digits (8x8 -> {spec.sample_size}x{spec.sample_size} bilinear, [-1,1], "
             f"+-{spec.sample_size // 16}px shifts), ~15% held out by index hash",
        prediction_type="epsilon", sample_size=spec.sample_size, in_channels=1, patch_size=2,
        tokens=(spec.sample_size // 2) ** 2, num_classes=10, null_class=10,
        scheduler={"num_train_timesteps": spec.num_train_timesteps, "beta_schedule": "linear",
                   "beta_start": 1e-4, "beta_end": 0.02},
        recipe={**asdict(spec), "steps": total_steps, "cycles": cycles, "optimizer": "AdamW", "ema_decay": 0.995,
                "schedule": "warmup+cosine to 0.1 per cycle" if len(cycles) > 1 else "warmup+cosine to 0.1"},
        classifier_free_guidance=True,
        metrics=metrics, eval_slice={"images": 32, "seed": 1234, "eps_mse": slice_mse,
                                     "labels": "held-out labels"},
        sample_metrics_note="200 DDIM-25 samples (20 per class, seed = model seed), Fréchet distance in the "
                            "digits-classifier's feature space to the held-out digits (32x32 average-pooled to "
                            "16x16), class accuracy = the classifier agrees with the requested class",
        train_seconds=train_seconds,
        summary=f"Class-conditional epsilon-prediction DiT (patch 2, {(spec.sample_size // 2) ** 2} tokens) for "
                f"1x{spec.sample_size}x{spec.sample_size} digits, 1000-step linear-beta DDPM schedule; label "
                "10 is the null class for classifier-free guidance (weights are the EMA).",
        log=log)
    _write_card(out, card)
    return card


def _train_classifier(name: str, spec: ClassifierSpec, *, seed: int, out: Path, progress: Any) -> dict[str, Any]:
    from accelerando.zoo.classifier import ClassifierConfig, DigitsClassifier

    x_tr, y_tr, x_ho, y_ho = zoo_data.digits_arrays()
    torch.manual_seed(seed)
    model = DigitsClassifier(ClassifierConfig())
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    log: list[str] = []
    t0 = time.time()
    warmup = max(1, min(50, spec.steps // 10))
    model.train()
    for step in range(spec.steps):
        idx = torch.randint(0, len(x_tr), (spec.batch_size,), generator=gen)
        x = zoo_data.shift_augment(x_tr[idx], gen)
        # a little pixel noise so features stay meaningful on imperfect samples
        x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, spec.steps, spec.lr, warmup)
        loss = F.cross_entropy(model(x), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == spec.steps - 1:
            msg = f"step {step + 1}/{spec.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)"
            log.append(msg)
            _log(progress, f"[{name}] {msg}")
    train_seconds = time.time() - t0
    model.eval()
    model.save_pretrained(out)
    with torch.no_grad():
        acc = float((model(x_ho).argmax(-1) == y_ho).float().mean())
        slice_acc = float((model(x_ho[:64]).argmax(-1) == y_ho[:64]).float().mean())
        slice_logit_sum = float(model(x_ho[:64]).log_softmax(-1).gather(1, y_ho[:64, None]).sum())
    _log(progress, f"[{name}] held-out accuracy {acc:.4f}")
    card = _card(
        name, "classifier", "cnn", "DigitsClassifier", n_params=n_params, seed=seed, steps=spec.steps,
        data="scikit-learn load_digits (8x8 -> 16x16 bilinear, [-1,1], +-1px shifts, pixel noise 0.1), "
             "~15% held out by index hash",
        feature_dim=model.config.feature_dim,
        recipe={**asdict(spec), "optimizer": "AdamW", "schedule": "warmup+cosine to 0.1"},
        metrics={"heldout_accuracy": round(acc, 5), "heldout_images": len(x_ho)},
        eval_slice={"images": 64, "accuracy": slice_acc, "log_likelihood_sum": slice_logit_sum},
        train_seconds=train_seconds,
        summary="Small CNN digit classifier; `features(x)` (penultimate layer) is the embedding for "
                "FID-style scores of 1x16x16 samples. Load with `accelerando.zoo.load_classifier(path)`.",
        log=log)
    _write_card(out, card)
    return card


# ----------------------------------------------------------------------------- entry point

def train(name: str, *, seed: int = 0, steps: int | None = None, out_dir: str | Path | None = None,
          progress: Callable[..., Any] | None = None, max_train_bytes: int | None = None,
          eval_windows: int = EVAL_MAX_WINDOWS, resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train zoo model `name` deterministically from its offline data; returns its card.

    steps: override the recipe's step count. out_dir: the model's directory (default: the package's
    zoo folder). Drafts need `code-target` in `out_dir`'s parent folder or in the package's zoo.
    max_train_bytes, eval_windows: LMs only, train on a prefix of the corpus and measure on fewer
    held-out windows per kind (quick smoke runs; the card records both). resume_from: an LM
    directory holding this recipe's first cycle; training continues with the remaining cycles;
    a DiT directory: training continues from its weights for `steps` more steps.
    """
    if name not in SPECS:
        raise KeyError(f"unknown zoo model {name!r}; valid: {', '.join(SPECS)}")
    spec = SPECS[name]
    if steps is not None:
        if steps < 1:
            raise ValueError("steps must be >= 1")
        spec = type(spec)(**{**asdict(spec), "steps": steps, **({"restarts": (), "refine_extra_code": ()} if isinstance(spec, LMSpec) else {})})
    out = Path(out_dir) if out_dir is not None else _default_dir(name)
    card = _train(name, spec, seed=seed, out=out, progress=progress, max_train_bytes=max_train_bytes,
                  eval_windows=eval_windows, resume_from=resume_from)
    from accelerando._io import readable_modes
    readable_modes(out)                 # save_pretrained's safetensors files are created 0600
    return card


def _train(name: str, spec: Any, *, seed: int, out: Path, progress: Callable[..., Any] | None,
           max_train_bytes: int | None, eval_windows: int, resume_from: str | Path | None) -> dict[str, Any]:
    if isinstance(spec, LMSpec):
        target_dir = None
        if spec.role == "draft":
            sibling = out.parent / TARGET
            target_dir = sibling if (sibling / "config.json").exists() else _default_dir(TARGET)
        return _train_lm(name, spec, seed=seed, out=out, progress=progress,
                         max_train_bytes=max_train_bytes, target_dir=target_dir,
                         eval_windows=eval_windows,
                         resume_from=Path(resume_from) if resume_from is not None else None)
    if isinstance(spec, UNetSpec):
        return _train_unet(name, spec, seed=seed, out=out, progress=progress)
    if isinstance(spec, DiTSpec):
        return _train_dit(name, spec, seed=seed, out=out, progress=progress,
                          resume_from=Path(resume_from) if resume_from is not None else None)
    return _train_classifier(name, spec, seed=seed, out=out, progress=progress)


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Train accelerando zoo models.")
    p.add_argument("names", nargs="+", help="model names or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out-root", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume-from", type=Path, default=None,
                   help="continue training from this trained model directory (LM: cycle 1; DiT: its weights, "
                        "--steps more steps)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = list(SPECS) if a.names == ["all"] else a.names
    for n in names:
        out = a.out_root / n if a.out_root is not None else None
        train(n, seed=a.seed, steps=a.steps, out_dir=out, resume_from=a.resume_from)


if __name__ == "__main__":
    main()
