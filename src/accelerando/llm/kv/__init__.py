"""KV-cache selection and compression for long context (issue 18): prefill presses, decode-time
selection, TriForce drafting, synthetic retrieval tasks. See docs/long-context.md."""
from accelerando.llm.kv.dynamic import RecycledAttention, TokenSelect
from accelerando.llm.kv.generate import kv_continuation_logits, kv_generate, prefill
from accelerando.llm.kv.presses import (ElasticCachePress, H2OPress, Press, RetrievalChunkPress, SnapKVPress,
                                        StreamingLLMPress, kv_bytes)


def __getattr__(name: str):          # TriForce imports the speculative loop: load it on first use
    if name == "TriForce":
        from accelerando.llm.kv.triforce import TriForce
        return TriForce
    if name == "KVPressAnchor":
        from accelerando.llm.kv.anchor import KVPressAnchor
        return KVPressAnchor
    raise AttributeError(name)


__all__ = ["ElasticCachePress", "H2OPress", "KVPressAnchor", "Press", "RecycledAttention", "RetrievalChunkPress",
           "SnapKVPress", "StreamingLLMPress", "TokenSelect", "TriForce", "kv_bytes", "kv_continuation_logits",
           "kv_generate", "prefill"]
