"""Decoding acceleration for causal LMs: lossless speculative decoding (chains and trees)."""

from accelerando.llm.drafters.draft_model import DraftModel
from accelerando.llm.drafters.prompt_lookup import PromptLookup
from accelerando.llm.sampling import NonFiniteLogitsError, SamplingConfig
from accelerando.llm.speculative import AdaptiveK, SpeculativeOutput, speculative_generate

__all__ = ["speculative_generate", "SpeculativeOutput", "DraftModel", "PromptLookup", "AdaptiveK",
           "SamplingConfig", "NonFiniteLogitsError"]
