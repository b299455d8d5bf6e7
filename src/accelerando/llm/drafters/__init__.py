"""Where candidate tokens come from: draft models, prompt lookup, Medusa heads, draft trees.

Every drafter speaks one protocol (``base.py``: ``begin`` / ``propose -> Proposal`` / ``accept``).
"""

from accelerando.llm.drafters.base import DraftContext, DraftInput, Drafter, Proposal, Verified
from accelerando.llm.drafters.draft_model import DraftModel
from accelerando.llm.drafters.medusa import Medusa, MedusaConfig
from accelerando.llm.drafters.prompt_lookup import PromptLookup
from accelerando.llm.drafters.tree import DraftTree

__all__ = ["Drafter", "Proposal", "DraftContext", "DraftInput", "Verified", "DraftModel", "PromptLookup", "Medusa",
           "MedusaConfig", "DraftTree"]
