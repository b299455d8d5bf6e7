"""Where candidate tokens come from: draft models, prompt lookup, Medusa heads, draft trees."""

from accelerando.llm.drafters.base import Drafter, Proposal, StepResult
from accelerando.llm.drafters.draft_model import DraftModel
from accelerando.llm.drafters.medusa import Medusa, MedusaConfig
from accelerando.llm.drafters.prompt_lookup import PromptLookup
from accelerando.llm.drafters.tree import DraftTree

__all__ = ["Drafter", "Proposal", "StepResult", "DraftModel", "PromptLookup", "Medusa", "MedusaConfig", "DraftTree"]
