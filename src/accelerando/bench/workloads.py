"""Workload descriptions: what is measured, separate from which method measures it.

A workload's ``key()`` is a plain, stable dict (sorted keys when stored, JSON-safe values) that goes
into every history row, so rows of the same workload can be found again and compared.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPACINGS = ("linspace", "leading", "trailing")

# Two short held-out style code prompts (written for accelerando, not taken from the training data)
DEFAULT_CODE_PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\n\ndef list_python_files(root):\n    result = []\n    for dirpath, dirnames, filenames in os.walk(root):\n",
)


class PromptsError(ValueError):
    """A prompts file that cannot be read or holds no prompts."""


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, or one prompt per non-empty line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptsError(f"prompts file {p} does not exist") from None
    except IsADirectoryError:
        raise PromptsError(f"prompts file {p} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsError(f"cannot read prompts file {p}: {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptsError(f"prompts file {p} looks like JSON but is not valid: {exc}") from None
        if not all(isinstance(s, str) for s in data):
            raise PromptsError(f"prompts file {p}: the JSON list must hold only strings")
        prompts = [s for s in data if s.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsError(f"prompts file {p} holds no prompts")
    return prompts


def prompts_digest(prompts: list[str] | tuple[str, ...]) -> str:
    """Short content hash, so a workload names its prompts without storing them."""
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LLMWorkload:
    """Causal-LM decoding: a target model (zoo name or directory), optional drafts, prompts, settings."""

    model: str
    drafts: tuple[str, ...] = ()
    domain: str = "code"                 # what the prompts are: code, prose, chat, ...
    prompts_file: str | None = None      # None: ``prompts`` (or the default code prompts)
    batch_size: int = 1
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    prompts: tuple[str, ...] = field(default=(), compare=False)

    family = "llm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "drafts", tuple(self.drafts))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.model:
            raise ValueError("LLMWorkload.model must name a model")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def resolve_prompts(self) -> list[str]:
        if self.prompts:
            return list(self.prompts)
        if self.prompts_file is not None:
            return load_prompts(self.prompts_file)
        return list(DEFAULT_CODE_PROMPTS)

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("prompts")
        d["drafts"] = list(self.drafts)
        if self.prompts_file is not None:
            d["prompts_file"] = Path(self.prompts_file).name
        d["prompts_digest"] = prompts_digest(self.resolve_prompts())
        d["family"] = self.family
        return d


@dataclass(frozen=True)
class DiffusionWorkload:
    """Diffusion sampling: a UNet (zoo name or directory) or ``"oracle:<spec>"``, a schedule, an NFE budget."""

    model: str
    schedule: str = "linear"             # beta schedule name (make_schedule)
    steps: int = 20                      # timesteps on the grid (the NFE budget for 1-call methods)
    spacing: str = "trailing"
    batch: int = 4
    seed: int = 0

    family = "diffusion"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("DiffusionWorkload.model must name a model")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {self.spacing!r}")

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["family"] = self.family
        return d
