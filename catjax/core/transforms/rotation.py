"""Transforms without a fitted part `B`: the identity, the randomized Hadamard
rotation `H · D` (QuaRot's), which fixes concentration only, and SpinQuant, whose
closed form is that Hadamard and whose trained form learns the rotations end to
end (`catjax.ptq.spinquant`)."""

from catjax.core.transforms.base import Method

IDENTITY = Method("identity", None, False, None, "no transform")
HADAMARD = Method("hadamard", None, True, None, "a randomized Hadamard rotation (QuaRot)")
SPINQUANT = Method("spinquant", None, True, None, "QuaRot's Hadamard; with train.steps, "
                   "rotations learned end to end by Cayley SGD (SpinQuant)", end_to_end=True)
