"""Neural network building blocks (pure torch)."""

from insertion_diffusion.nn.transformer import AdaLNHead, ScalarHead, Transformer, TransformerConfig

__all__ = ["AdaLNHead", "ScalarHead", "Transformer", "TransformerConfig"]
