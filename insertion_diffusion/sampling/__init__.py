"""Samplers: pure functions over tensors."""

from insertion_diffusion.sampling.tau_leaping import SamplerConfig, tau_leaping

__all__ = ["SamplerConfig", "tau_leaping"]
