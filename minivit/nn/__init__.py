"""Modules: Parameter registration, state dicts, and the layers of a ViT."""

from minivit.nn.layers import (Attention, Block, LayerNorm, LayerScale, Linear, Mlp, PatchConv2d,
                               PatchEmbed)
from minivit.nn.module import Constants, Module, ModuleList, Parameter

__all__ = ["Attention", "Block", "Constants", "LayerNorm", "LayerScale", "Linear", "Mlp",
           "Module", "ModuleList", "Parameter", "PatchConv2d", "PatchEmbed"]
