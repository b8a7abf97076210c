"""Transforms without a fitted part `B`: the identity, and the randomized
Hadamard rotation `H · D` (QuaRot's), which fixes concentration only."""

from catjax.core.transforms.base import Method

IDENTITY = Method("identity", None, False, None, "no transform")
HADAMARD = Method("hadamard", None, True, None, "a randomized Hadamard rotation (QuaRot)")
