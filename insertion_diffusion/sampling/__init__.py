"""Samplers: pure functions over tensors."""

from insertion_diffusion.sampling.ancestral import MDLMSamplerConfig, ancestral_sample
from insertion_diffusion.sampling.autoregressive import ARSamplerConfig, autoregressive_decode
from insertion_diffusion.sampling.hyperschedule import HDLMSamplerConfig, hyperschedule_sample
from insertion_diffusion.sampling.tau_leaping import SamplerConfig, tau_leaping

__all__ = [
    "ARSamplerConfig",
    "HDLMSamplerConfig",
    "MDLMSamplerConfig",
    "SamplerConfig",
    "ancestral_sample",
    "autoregressive_decode",
    "hyperschedule_sample",
    "tau_leaping",
]
