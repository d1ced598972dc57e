"""The draft-verify loop: prefill, then rounds of propose -> verify -> accept -> commit."""
from .session import DecodeConfig, DecodeSession, Generation, generate, max_cache_len

__all__ = ["DecodeConfig", "DecodeSession", "Generation", "generate", "max_cache_len"]
