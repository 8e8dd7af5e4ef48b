"""Generative methods as LightningModules."""

from insertion_diffusion.models.base import GenerativeModule
from insertion_diffusion.models.flexmdm import FlexMDM
from insertion_diffusion.models.insertion_base import InsertionModel
from insertion_diffusion.models.loflexmdm import LoFlexMDM

__all__ = ["FlexMDM", "GenerativeModule", "InsertionModel", "LoFlexMDM"]
