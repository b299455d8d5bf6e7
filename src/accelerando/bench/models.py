"""One model resolver for every command (``bench``, ``sweep``, ``recommend``, ``medusa train``) and
the zoo: a name is a local directory, a zoo name, or a random-initialised spec.

    resolve("digits-unet")                    # ModelRef(kind="diffusion", path=<zoo>/digits-unet)
    resolve("./my-llama")                     # a local Hugging Face directory (config.json)
    resolve("rand-llama-h64-l2-v256-s0")      # hidden 64, 2 layers, vocabulary 256, seed 0
    resolve("rand-unet-c16x32-i16-s0")        # channels 16/32, 16x16 images, seed 0
    load_unet("digits-unet").num_train_timesteps      # loaded records carry named fields
    ModelCache("cpu").llm("code-target").tokenizer    # each model loaded once

A local path wins over a zoo name of the same spelling. Loaded models are records with named
fields (``LoadedLLM``, ``LoadedUNet``), never tuples, so no caller unpacks the wrong number of values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(ValueError):
    """A name that is no model: missing directory, unknown zoo name, malformed spec, wrong kind."""


RAND_LLM = re.compile(r"^rand-llama-h(\d+)-l(\d+)-v(\d+)-s(\d+)(?:-d(\d+))?(?:@l(\d+))?$")
RAND_UNET = re.compile(r"^rand-unet-c(\d+)x(\d+)-i(\d+)-s(\d+)$")


@dataclass(frozen=True)
class ModelRef:
    """What a model name points at (nothing loaded yet)."""

    name: str                 # as the user gave it
    kind: str                 # "llm" | "diffusion"
    path: Path | None         # the directory; None for a random spec
    source: str               # "dir" | "zoo" | "rand"


@dataclass(frozen=True)
class LoadedLLM:
    model: Any                # a transformers causal LM, eval mode
    tokenizer: Any
    ref: ModelRef


@dataclass(frozen=True)
class LoadedUNet:
    unet: Any                 # a diffusers denoiser, eval mode
    num_train_timesteps: int
    prediction_type: str      # epsilon | v_prediction | sample
    ref: ModelRef


def _zoo_names() -> list[str]:
    try:
        from accelerando import zoo
        return list(zoo.names())
    except (ImportError, AttributeError):
        return []


def resolve(name: str) -> ModelRef:
    """A local directory, else a ``rand-*`` spec, else a zoo name; ``ModelError`` names the forms."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"model path {p} is a file; give the model's directory (with config.json)")
        return ModelRef(name, model_kind(p), p, "dir")
    if RAND_LLM.match(name):
        return ModelRef(name, "llm", None, "rand")
    if RAND_UNET.match(name):
        return ModelRef(name, "diffusion", None, "rand")
    names = _zoo_names()
    if name in names:
        from accelerando import zoo
        d = Path(zoo.path(name))
        if not (d / "config.json").exists():
            if (d / "medusa.json").exists():
                raise ModelError(f"zoo entry {name} holds Medusa heads for {zoo.card(name).get('for_model', 'its target')}, "
                                 "not a model (the medusa methods' heads= knob takes it)")
            raise ModelError(f"zoo model {name} is not trained (no config.json in {d}); "
                             f"run: accelerando zoo train {name}")
        return ModelRef(name, model_kind(d), d, "zoo")
    if name.startswith("rand-"):
        raise ModelError(f"malformed random spec {name!r}; want rand-llama-h64-l2-v256-s0 or rand-unet-c16x32-i16-s0")
    known = ", ".join(names) if names else "(zoo not available)"
    raise ModelError(f"no model directory {name!r} and no zoo model of that name (zoo: {known}; "
                     "or a random spec such as rand-llama-h64-l2-v256-s0)")


def model_kind(model_dir: Path) -> str:
    """"llm" for a causal LM, "diffusion" for a diffusers UNet, from ``config.json``."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.exists():
        raise ModelError(f"{model_dir} has no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {cfg_path}: {exc}") from None
    cls = str(cfg.get("_class_name", ""))
    if cls:
        if "UNet" in cls or "Transformer2D" in cls or "DiT" in cls:
            return "diffusion"
        raise ModelError(f"{model_dir} is a diffusers {cls}, not a denoising UNet")
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "llm"
    what = ", ".join(archs) or cfg.get("model_type") or "unknown"
    raise ModelError(f"{model_dir} is not a causal LM or a diffusers UNet (config says: {what})")


def _want(ref: ModelRef, kind: str) -> None:
    if ref.kind != kind:
        what = "a causal LM" if kind == "llm" else "a diffusion model"
        other = "a diffusion model" if ref.kind == "diffusion" else "a causal LM"
        raise ModelError(f"{ref.name} is {other}, not {what}")


def tokenizer_dir(model_dir: Path) -> Path:
    if (model_dir / "tokenizer.json").exists() or (model_dir / "tokenizer_config.json").exists():
        return model_dir
    raise ModelError(f"{model_dir} has no tokenizer (tokenizer.json / tokenizer_config.json)")


def load_llm(name: str | ModelRef, *, device: Any = "cpu") -> LoadedLLM:
    """The causal LM and its tokenizer (random specs get ``char_tokenizer``)."""
    ref = name if isinstance(name, ModelRef) else resolve(name)
    _want(ref, "llm")
    if ref.source == "rand":
        return LoadedLLM(rand_llm(ref.name).to(device), char_tokenizer(), ref)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(ref.path).to(device).eval()
    return LoadedLLM(model, AutoTokenizer.from_pretrained(tokenizer_dir(ref.path)), ref)


def load_unet(name: str | ModelRef, *, device: Any = "cpu") -> LoadedUNet:
    """The denoiser, its training-timestep count and prediction type (from a scheduler config
    beside it, ``scheduler/`` first; 1000 and epsilon when there is none, as for random specs)."""
    ref = name if isinstance(name, ModelRef) else resolve(name)
    _want(ref, "diffusion")
    if ref.source == "rand":
        return LoadedUNet(rand_unet(ref.name).to(device), 1000, "epsilon", ref)
    import diffusers
    d = ref.path
    cls_name = json.loads((d / "config.json").read_text())["_class_name"]
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ModelError(f"diffusers has no model class {cls_name}")
    n_train, prediction = load_unet_config(ref)
    sub = {"subfolder": "unet"} if (d / "unet" / "config.json").exists() else {}
    return LoadedUNet(cls.from_pretrained(d, **sub).to(device).eval(), n_train, prediction, ref)


def load_unet_config(name: str | ModelRef) -> tuple[int, str]:
    """(training timesteps, prediction type) of a diffusion model, without loading its weights."""
    ref = name if isinstance(name, ModelRef) else resolve(name)
    _want(ref, "diffusion")
    n_train, prediction = 1000, "epsilon"
    if ref.path is None:
        return n_train, prediction
    for sc in (ref.path / "scheduler" / "scheduler_config.json", ref.path / "scheduler_config.json"):
        if sc.exists():
            cfg = json.loads(sc.read_text())
            n_train = int(cfg.get("num_train_timesteps", n_train))
            prediction = str(cfg.get("prediction_type", prediction))
            break
    return n_train, prediction


class ModelCache:
    """Loads each model once (a sweep or a recommendation touches a model many times)."""

    def __init__(self, device: Any = "cpu"):
        self.device = device
        self._m: dict[tuple[str, str], Any] = {}

    def llm(self, name: str) -> LoadedLLM:
        if ("llm", name) not in self._m:
            self._m["llm", name] = load_llm(name, device=self.device)
        return self._m["llm", name]

    def unet(self, name: str) -> LoadedUNet:
        if ("unet", name) not in self._m:
            self._m["unet", name] = load_unet(name, device=self.device)
        return self._m["unet", name]

    def __contains__(self, name: str) -> bool:
        return ("llm", name) in self._m or ("unet", name) in self._m


# ----------------------------------------------------------------------------- random specs

def char_tokenizer():
    """A character-level tokenizer (printable ASCII + newline/tab) built offline, for random models."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for c in [chr(i) for i in range(32, 127)] + ["\n", "\t"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")


def rand_llm(spec: str):
    """A random-initialised Llama from a ``rand-llama-h{hidden}-l{layers}-v{vocab}-s{seed}`` spec.

    ``-d{pct}`` scales the residual branches (attention and MLP output projections) of every
    layer after the first by pct/100, so the first layer decides most of the output;
    ``...@l{n}`` is that model truncated to its first n layers (same embeddings, norm and head):
    an early-exit draft whose agreement with the target grows as pct shrinks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    m = RAND_LLM.match(spec)
    if not m:
        raise ValueError(f"not a random LLM spec: {spec!r} (want rand-llama-h64-l2-v256-s0)")
    if m.group(6) is not None:
        keep = int(m.group(6))
        full = rand_llm(spec.split("@")[0])
        if not 1 <= keep <= full.config.num_hidden_layers:
            raise ValueError(f"{spec}: cannot keep {keep} of {full.config.num_hidden_layers} layers")
        full.model.layers = full.model.layers[:keep]
        full.config.num_hidden_layers = keep
        if getattr(full.config, "layer_types", None):
            full.config.layer_types = full.config.layer_types[:keep]
        return full
    h, n_layers, v, seed = map(int, m.groups()[:4])
    heads = max(1, h // 32)
    cfg = LlamaConfig(vocab_size=max(v, 100), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=n_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    # random init is near-uniform; a larger output scale gives peaked, repetitive, LM-like outputs
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        if m.group(5) is not None:
            for layer in model.model.layers[1:]:
                layer.self_attn.o_proj.weight.mul_(int(m.group(5)) / 100)
                layer.mlp.down_proj.weight.mul_(int(m.group(5)) / 100)
    return model


def rand_unet(spec: str):
    """A random-initialised diffusers UNet2DModel from ``rand-unet-c{c1}x{c2}-i{size}-s{seed}``."""
    import torch
    from diffusers import UNet2DModel
    m = RAND_UNET.match(spec)
    if not m:
        raise ValueError(f"not a random UNet spec: {spec!r} (want rand-unet-c16x32-i16-s0)")
    c1, c2, size, seed = map(int, m.groups())
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(c1, c2), norm_num_groups=min(8, c1),
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
