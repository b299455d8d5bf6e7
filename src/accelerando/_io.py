"""File writing shared by the zoo and the methods that save weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_safetensors(tensors: dict[str, Any], path: str | Path) -> Path:
    """``safetensors.torch.save_file``, then the mode any other file gets (0644 under the usual
    umask): safetensors creates its file 0600, which other users and services cannot read."""
    from safetensors.torch import save_file
    path = Path(path)
    save_file(tensors, str(path))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return path


def readable_modes(folder: str | Path) -> None:
    """Give files that a library created 0600 (safetensors does, inside ``save_pretrained``) the
    mode any other file gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(folder).rglob("*"):
        if f.is_file() and (f.stat().st_mode & 0o777) == 0o600:
            os.chmod(f, 0o666 & ~mask)
