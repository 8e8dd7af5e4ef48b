"""insertion_diffusion: insertion-based sequence generation with learnable order dynamics."""

__version__ = "0.1.0"
