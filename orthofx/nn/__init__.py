"""Layers that passes insert, usable on their own (hard orthogonal layers, ConvNorm and stable decompositions
arrive with their issues)."""
