"""A diffusers scheduler over our samplers: ``pipe.scheduler = as_diffusers_scheduler("f-pndm", pipe.scheduler.config)``.

``scheduler.py`` is the adapter (diffusers' stateful step API over the pure samplers), ``keys.py`` what
it does with every diffusers config key.
"""

from __future__ import annotations

from typing import Any

from .keys import KEY_POLICY, from_foreign_config
from .scheduler import AccelerandoScheduler


def as_diffusers_scheduler(name: str, config: Any = None, **kwargs: Any) -> AccelerandoScheduler:
    """Our sampler ``name`` as a diffusers scheduler. ``config`` (e.g. ``pipe.scheduler.config``) gives the
    schedule and model keys, honoured or refused one by one; ``kwargs`` override them."""
    return AccelerandoScheduler(method=name, **{**from_foreign_config(name, config), **kwargs})


__all__ = ["AccelerandoScheduler", "as_diffusers_scheduler", "KEY_POLICY"]
