"""The draft-verify loop: prefill, then rounds of propose -> verify -> accept -> commit."""
from .session import DecodeSession, generate, max_cache_len, pick_parts
from .state import DecodeConfig, Generation

__all__ = ["DecodeConfig", "DecodeSession", "Generation", "generate", "max_cache_len", "pick_parts"]
