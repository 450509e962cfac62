"""Layers that passes insert, usable on their own (like geotorch's): ConvNorm wrappers so far; hard orthogonal
layers and stable decompositions arrive with their issues."""

from .convnorm import ConvNormConv1d, ConvNormConv2d, ConvNormConv3d, with_convnorm

__all__ = ["ConvNormConv1d", "ConvNormConv2d", "ConvNormConv3d", "with_convnorm"]
