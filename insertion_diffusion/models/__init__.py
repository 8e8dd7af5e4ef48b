"""Generative methods as LightningModules."""

from insertion_diffusion.models.base import GenerativeModule
from insertion_diffusion.models.flexmdm import FlexMDM

__all__ = ["FlexMDM", "GenerativeModule"]
