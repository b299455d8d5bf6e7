"""Offline training data for the zoo: Python's own standard library (code), its docs (prose), and
scikit-learn's bundled 8x8 digits.

Everything is deterministic: documents are ordered by name, and the train / held-out split is a
hash of the document name (not of its position), so adding or removing a file elsewhere does not
move any other document between the splits.
"""
from __future__ import annotations

import hashlib
import os
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

HELDOUT_PERCENT = 5              # ~5% of documents (by name hash) are held out
CODE_CAP_BYTES = 3_000_000       # corpus cap (train + held-out) so fitting stays fast on 2 cores
MAX_FILE_BYTES = 60_000          # very large generated files (e.g. unicode tables) are skipped
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "lib2to3", "ensurepip", "turtledemo"}

KINDS = ("code", "prose")
SPLITS = ("train", "heldout")


def split_of(name: str) -> str:
    """'heldout' for ~HELDOUT_PERCENT% of names (stable hash of the name), else 'train'."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def _code_documents() -> tuple[tuple[str, str], ...]:
    root = _stdlib_root()
    files: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for f in filenames:
            if f.endswith(".py") and not f.startswith("test_"):
                p = Path(dirpath) / f
                files.append((p.relative_to(root).as_posix(), p))
    files.sort()
    # Cap by a name-hash order (not alphabetical) so the kept files span the whole library.
    files.sort(key=lambda item: hashlib.sha256(("order:" + item[0]).encode()).hexdigest())
    docs: list[tuple[str, str]] = []
    total = 0
    for rel, p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > MAX_FILE_BYTES:
            continue
        if total + len(text) > CODE_CAP_BYTES:
            continue
        docs.append((rel, text))
        total += len(text)
    docs.sort()
    return tuple(docs)


@lru_cache(maxsize=1)
def _prose_documents() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics
    return tuple(sorted((f"topics/{k}", v) for k, v in topics.items() if v.strip()))


def documents(kind: str = "code", split: str = "train") -> list[tuple[str, str]]:
    """(name, text) pairs of one kind ('code' or 'prose') and split ('train', 'heldout', 'all')."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS + ("all",):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    docs = _code_documents() if kind == "code" else _prose_documents()
    return [(n, t) for n, t in docs if split == "all" or split_of(n) == split]


def texts(kind: str = "code", split: str = "train") -> list[str]:
    """The document texts of one kind and split."""
    return [t for _, t in documents(kind, split)]


def code_corpus(split: str = "train") -> list[str]:
    """Python standard-library source files (the zoo LMs' code data)."""
    return texts("code", split)


def prose_corpus(split: str = "train") -> list[str]:
    """Python documentation topics (pydoc_data) — the zoo LMs' prose data."""
    return texts("prose", split)


# Installed third-party packages whose source is Python code NOT in the zoo's training corpus
# (the corpus is the standard library): the drafts' out-of-corpus agreement is measured on them.
FOREIGN_PACKAGES = ("click", "jinja2", "packaging", "requests", "pluggy", "filelock", "tqdm", "rich")
FOREIGN_CAP_BYTES = 150_000


# Other installed packages' source, for the drafts' logit distillation only (the target labels it;
# never an evaluation set): disjoint from FOREIGN_PACKAGES, so the out-of-corpus figure stays held out.
EXTRA_CODE_PACKAGES = ("networkx", "attr", "anyio", "jsonschema", "markdown_it", "fsspec", "joblib", "dateutil",
                       "cachetools", "h11", "mdurl", "narwhals")
EXTRA_CODE_CAP_BYTES = 1_500_000
assert not set(EXTRA_CODE_PACKAGES) & set(FOREIGN_PACKAGES), "distillation code must not overlap the held-out set"


@lru_cache(maxsize=None)
def _package_documents(packages: tuple[str, ...], cap: int) -> tuple[tuple[str, str], ...]:
    """(package/relative path, text) of the installed ``packages``' Python files (those present),
    in a fixed hash order, files of 2 KB .. MAX_FILE_BYTES, up to ``cap`` characters in all."""
    import importlib.util
    files: list[tuple[str, Path]] = []
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root)
            # generated data tables (unicode widths, IDNA tables) are not code
            if not _SKIP_DIRS.intersection(rel.parts[:-1]) and "data" not in rel.as_posix():
                files.append((f"{pkg}/{p.relative_to(root).as_posix()}", p))
    files.sort(key=lambda item: hashlib.sha256(("order:" + item[0]).encode()).hexdigest())
    docs, total = [], 0
    for rel, p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 2_000 or len(text) > MAX_FILE_BYTES or total + len(text) > cap:
            continue
        docs.append((rel, text))
        total += len(text)
    return tuple(sorted(docs))


def _foreign_documents() -> tuple[tuple[str, str], ...]:
    return _package_documents(FOREIGN_PACKAGES, FOREIGN_CAP_BYTES)


def extra_code() -> list[tuple[str, str]]:
    """(name, text) of Python files from installed packages in `EXTRA_CODE_PACKAGES` (disjoint from
    `FOREIGN_PACKAGES`), capped at EXTRA_CODE_CAP_BYTES: unlabelled code for the drafts' logit
    distillation (the target supplies the labels), never for evaluation."""
    return list(_package_documents(EXTRA_CODE_PACKAGES, EXTRA_CODE_CAP_BYTES))


def foreign_code() -> list[tuple[str, str]]:
    """(name, text) of Python files from installed third-party packages (`FOREIGN_PACKAGES`, those
    present), capped at FOREIGN_CAP_BYTES: code from outside the training corpus, for evaluation
    only. Which files depends on the installed versions; the model cards record the names."""
    return list(_foreign_documents())


def heldout_prompts(kind: str = "code", *, n: int = 8, chars: int = 200) -> list[str]:
    """Deterministic prompts cut from held-out documents: the first `chars` characters of each
    document (cut at a line end when one is near), for the first `n` held-out documents."""
    out = []
    for _, text in documents(kind, "heldout"):
        t = text.lstrip()
        if len(t) < chars:
            continue
        cut = t.rfind("\n", chars // 2, chars)
        out.append(t[: cut + 1 if cut > 0 else chars])
        if len(out) == n:
            break
    return out


def corpus_stats() -> dict[str, Any]:
    """Document and byte counts per kind and split (recorded in the model cards)."""
    stats: dict[str, Any] = {}
    for kind in KINDS:
        for split in SPLITS:
            docs = documents(kind, split)
            stats[f"{kind}_{split}_docs"] = len(docs)
            stats[f"{kind}_{split}_bytes"] = sum(len(t.encode("utf-8")) for _, t in docs)
    return stats


# ----------------------------------------------------------------------------- digits

def digits_arrays(size: int = 16) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's 8x8 digits as (x_train, y_train, x_heldout, y_heldout): float32 images
    (N, 1, size, size) upsampled bilinearly and scaled to [-1, 1], int64 labels. Held-out: every sample
    whose index hashes into the held-out ~HELDOUT_PERCENT*3 % (about 15%)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0            # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.tensor(d.target, dtype=torch.int64)
    held = np.array([int.from_bytes(hashlib.sha256(f"digit:{i}".encode()).digest()[:8], "big") % 100 < 15
                     for i in range(len(y))])
    held_t = torch.from_numpy(held)
    return x[~held_t], y[~held_t], x[held_t], y[held_t]


def shift_augment(x: Any, generator: Any, max_shift: int = 1) -> Any:
    """Random integer shifts of up to `max_shift` pixels per image (padding with the background -1)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    pad = max_shift
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    sx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    sy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    h, w = x.shape[-2:]
    rows = (sy[:, None] + torch.arange(h)[None, :])                                   # (n, h)
    cols = (sx[:, None] + torch.arange(w)[None, :])                                   # (n, w)
    idx_n = torch.arange(n)[:, None, None]
    return xp[idx_n, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
