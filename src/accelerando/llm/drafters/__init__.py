"""Where candidate tokens come from: draft models, prompt lookup, Medusa heads, draft trees."""

from accelerando.llm.drafters.medusa import Medusa, MedusaConfig
from accelerando.llm.drafters.tree import DraftTree

__all__ = ["Medusa", "MedusaConfig", "DraftTree"]
