"""Decoding acceleration for causal LMs: lossless speculative decoding (chains and trees) on a lean engine."""

from accelerando.llm.drafters import DraftModel, DraftTree, Medusa, PromptLookup
from accelerando.llm.drafters.adaptive import AdaptiveK
from accelerando.llm.sampling import NonFiniteLogitsError, SamplingConfig
from accelerando.llm.speculative import SpeculativeOutput, speculative_generate

__all__ = ["speculative_generate", "SpeculativeOutput", "DraftModel", "PromptLookup", "Medusa", "DraftTree",
           "AdaptiveK", "SamplingConfig", "NonFiniteLogitsError"]
