"""The bundled model zoo: tiny models trained offline on data that ships with Python and
scikit-learn, so demos, tests and benchmarks run with no download.

    from accelerando import zoo
    zoo.names()                       # ('code-target', 'code-draft-small', ...)
    model = zoo.load("code-target")   # LlamaForCausalLM, eval mode, fp32
    tok = zoo.load_tokenizer()        # shared by every code-* model
    zoo.card("code-draft-small")["metrics"]
    heads = zoo.load("code-target-medusa")   # Medusa heads for code-target (accelerando.llm.drafters.Medusa)
    pipe = zoo.pipeline("digits-unet")       # a diffusers DDPMPipeline: the UNet with its training scheduler

Every model directory loads with the library's own `from_pretrained(zoo.path(name))`.
Heavy libraries (transformers, diffusers, safetensors) are imported only when a model is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_ROLES = {
    "code-target": "target",
    "code-draft-small": "draft",
    "code-draft-tiny": "draft",
    "code-long-target": "target",     # long context (2048-token training, 8192 positions): accelerando.zoo.long_context
    "code-target-medusa": "medusa",
    "digits-unet": "unet",
    "digits-classifier": "classifier",
    "digits-dit": "dit",
    "digits-dit-32": "dit",
}
_WEIGHTS_CONFIG = {"medusa": "medusa.json"}       # the file that says a model is there (else config.json)
MODELS_DIR = Path(__file__).resolve().parent / "models"


def names() -> tuple[str, ...]:
    """The zoo's model names (trained or not)."""
    return tuple(_ROLES)


def _check(name: str) -> str:
    if name not in _ROLES:
        raise KeyError(f"unknown zoo model {name!r}; valid names: {', '.join(_ROLES)}")
    return name


def path(name: str) -> str:
    """The model's directory inside the installed package (what `from_pretrained` loads)."""
    return str(MODELS_DIR / _check(name))


def is_trained(name: str) -> bool:
    """True when the model's weights are present."""
    return (Path(path(name)) / _WEIGHTS_CONFIG.get(_ROLES[_check(name)], "config.json")).exists()


def card(name: str) -> dict[str, Any]:
    """The model card (card.json): role, family, parameters, data, steps, seed, held-out metrics,
    training time. FileNotFoundError when the model has not been trained yet."""
    f = Path(path(name)) / "card.json"
    if not f.exists():
        raise FileNotFoundError(f"zoo model {name} has no card at {f} (not trained yet?)")
    return json.loads(f.read_text())


def load(name: str, *, device: Any = "cpu") -> Any:
    """The model, fp32, in eval mode: LlamaForCausalLM, UNet2DModel, DigitsClassifier, or Medusa
    heads (attach them to their target with ``heads.attach(zoo.load("code-target"))``)."""
    role = _ROLES[_check(name)]
    p = path(name)
    if not is_trained(name):
        raise FileNotFoundError(f"zoo model {name} is not trained (no weights in {p}); "
                                f"run: accelerando zoo train {name}")
    if role in ("target", "draft"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(p)
    elif role == "unet":
        from diffusers import UNet2DModel
        model = UNet2DModel.from_pretrained(p)
    elif role == "dit":
        from diffusers import DiTTransformer2DModel
        model = DiTTransformer2DModel.from_pretrained(p)
    elif role == "medusa":
        from accelerando.llm.drafters.medusa import Medusa
        model = Medusa.load(p)
    else:
        from accelerando.zoo.classifier import load_classifier as _load
        model = _load(p)
    return model.float().to(device).eval()


def load_tokenizer(name: str = "code-target") -> Any:
    """The byte-level BPE tokenizer shared by the code-* models."""
    if _ROLES[_check(name)] not in ("target", "draft"):
        raise ValueError(f"{name} is not a language model")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path(name))


def load_scheduler(name: str = "digits-unet") -> Any:
    """The DDPMScheduler the UNet was trained with (1000 steps, linear betas 1e-4..0.02, epsilon)."""
    if _ROLES[_check(name)] not in ("unet", "dit"):
        raise ValueError(f"{name} is not a diffusion model")
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_pretrained(path(name), subfolder="scheduler")


def pipeline(name: str = "digits-unet", *, device: Any = "cpu") -> Any:
    """A diffusers ``DDPMPipeline`` of a zoo UNet with the scheduler it was trained with; swap in a
    faster sampler with ``pipe.scheduler = as_diffusers_scheduler("f-pndm", pipe.scheduler.config)``.
    (The zoo folder holds the UNet at its top level, so ``UNet2DModel.from_pretrained(zoo.path(name))``
    loads it; ``DDPMPipeline.from_pretrained`` wants a pipeline folder -- ``save_pretrained`` on
    this pipeline writes one.)"""
    if _ROLES[_check(name)] != "unet":
        raise ValueError(f"{name} is not a diffusion model")
    from diffusers import DDPMPipeline
    return DDPMPipeline(unet=load(name, device=device), scheduler=load_scheduler(name)).to(device)


def load_classifier(path_or_name: str | Path = "digits-classifier", *, device: Any = "cpu") -> Any:
    """The digits classifier (from a zoo name or a directory), eval mode; `.features(x)` embeds."""
    from accelerando.zoo.classifier import load_classifier as _load
    p = path(str(path_or_name)) if str(path_or_name) in _ROLES else path_or_name
    return _load(p, device=device)


def fid_features(images: Any, *, classifier: Any = None, batch_size: int = 256) -> Any:
    """Penultimate classifier features (numpy float64, shape (N, feature_dim)) of images
    (N, 1, 16, 16) in [-1, 1]; feed two such arrays to `frechet_distance`."""
    import torch
    clf = classifier if classifier is not None else load_classifier()
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(x.shape)}")
    x = x.clamp(-1.0, 1.0)
    with torch.no_grad():
        feats = [clf.features(x[s: s + batch_size]) for s in range(0, len(x), batch_size)]
    return torch.cat(feats).double().numpy()


def frechet_distance(feats_a: Any, feats_b: Any, *, eps: float = 1e-6) -> float:
    """FID formula between two feature sets (delegates to accelerando.bench.metrics)."""
    from accelerando.bench.metrics import frechet_distance as _fd
    return _fd(feats_a, feats_b, eps=eps)


def reference_digits(split: str = "heldout") -> Any:
    """Real digit images (N, 1, 16, 16) in [-1, 1] from the classifier/UNet data split, for FID."""
    from accelerando.zoo import data
    x_tr, _, x_ho, _ = data.digits_arrays()
    if split not in ("train", "heldout"):
        raise ValueError("split must be 'train' or 'heldout'")
    return x_tr if split == "train" else x_ho


def _metrics_text(c: dict[str, Any]) -> str:
    m = c.get("metrics", {})
    if c["role"] in ("target", "draft"):
        parts = [f"code {m['heldout_code_bits_per_byte']:.3f} / prose {m['heldout_prose_bits_per_byte']:.3f} bits/byte"]
        if "heldout_code_agreement_with_target" in m:
            parts.append(f"greedy agreement with target {m['heldout_code_agreement_with_target']:.1%}")
        return "; ".join(parts)
    if c["role"] == "unet":
        return f"eps-MSE {m['heldout_eps_mse']:.4f} ({m['heldout_images']} images)"
    if c["role"] == "dit":
        return (f"eps-MSE {m['heldout_eps_mse']:.4f}; DDIM-25 FD {m.get('cfg1_ddim25_frechet_distance', '-')} / "
                f"class acc {m.get('cfg1_ddim25_class_accuracy', '-')} (cfg 1), "
                f"{m.get('cfg2_ddim25_frechet_distance', '-')} / {m.get('cfg2_ddim25_class_accuracy', '-')} (cfg 2)")
    if c["role"] == "medusa":
        top1 = c.get("heldout_top1_accuracy") or []
        return "held-out top-1 per head " + " / ".join(f"{a:.0%}" for a in top1)
    return f"accuracy {m['heldout_accuracy']:.1%} ({m['heldout_images']} images)"


def markdown_table() -> str:
    """The zoo as a markdown table (name, role, parameters, steps, training time, held-out metrics)."""
    rows = ["| name | role | parameters | data | steps | train time | held-out metrics |",
            "|---|---|---:|---|---:|---:|---|"]
    for n in names():
        try:
            c = card(n)
        except FileNotFoundError:
            rows.append(f"| {n} | {_ROLES[n]} | - | - | - | - | not trained |")
            continue
        data = ("stdlib code + pydoc prose" if c["role"] in ("target", "draft", "medusa")
                else f"sklearn digits {c.get('sample_size', 16)}x{c.get('sample_size', 16)}")
        rows.append(f"| {n} | {c['role']} | {c['parameters']:,} | {data} | {c['steps']} | "
                    f"{c['train_seconds'] / 60:.1f} min | {_metrics_text(c)} |")
    size = sum(f.stat().st_size for f in MODELS_DIR.rglob("*") if f.is_file()) if MODELS_DIR.exists() else 0
    return "\n".join(rows) + f"\n\nAll files together: {size / 2 ** 20:.1f} MiB (fp32 safetensors).\n"


__all__ = ["names", "markdown_table", "path", "card", "load", "load_tokenizer", "load_scheduler", "pipeline", "load_classifier",
           "fid_features", "frechet_distance", "reference_digits", "is_trained", "MODELS_DIR"]
