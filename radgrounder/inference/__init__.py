"""Inference: batched generation with RadGrounder checkpoints."""

from radgrounder.inference.batching import generate_examples

__all__ = ["generate_examples"]
