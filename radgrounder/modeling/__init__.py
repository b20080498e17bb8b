"""Models, tokenizers and checkpoints."""

from radgrounder.modeling.tokenizer import GROUNDING_TOKENS, build_tokenizer

__all__ = ["GROUNDING_TOKENS", "build_tokenizer"]
