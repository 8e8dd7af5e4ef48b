"""Generative methods as LightningModules."""

from insertion_diffusion.models.arm import ARM
from insertion_diffusion.models.base import GenerativeModule
from insertion_diffusion.models.flexmdm import FlexMDM
from insertion_diffusion.models.hdlm import HDLM
from insertion_diffusion.models.insertion_base import InsertionModel
from insertion_diffusion.models.ip import InsertionProcess
from insertion_diffusion.models.loflexmdm import LoFlexMDM
from insertion_diffusion.models.mdlm import MDLM

__all__ = ["ARM", "HDLM", "MDLM", "FlexMDM", "GenerativeModule", "InsertionModel", "InsertionProcess", "LoFlexMDM"]
