"""pyro_lora: LoRA matrices of a peft model as Pyro sample sites (the model side).

Posterior families live in the sibling package :mod:`guides`.
"""

import torch as _torch

# importing peft imports bitsandbytes, whose torch.compile at import runs torch._dynamo's patch, which switches
# torch.distributions' argument validation off for the whole process (Normal(0, -1).log_prob(0) then gives nan, not an
# error): the import leaves the default as it found it
_validate_args = _torch.distributions.Distribution._validate_args
try:
    from .io import export_adapter, load_guide, save_guide
    from .likelihoods import CausalLM, MultipleChoice, SequenceClassification
    from .model import LoraModel
    from .predictive import NonFinitePredictionError, Prediction, predict
    from .distributions import LowRankPlusDiagNormal, MatrixNormalKronecker, isotropic_normal
    from .scalabl import ScalaBLModel
    from .sites import Site
    from .training import FitState, fit
finally:
    _torch.distributions.Distribution.set_default_validate_args(_validate_args)

__all__ = [
    "CausalLM",
    "FitState",
    "LoraModel",
    "LowRankPlusDiagNormal",
    "MatrixNormalKronecker",
    "MultipleChoice",
    "NonFinitePredictionError",
    "Prediction",
    "ScalaBLModel",
    "SequenceClassification",
    "Site",
    "export_adapter",
    "fit",
    "isotropic_normal",
    "load_guide",
    "predict",
    "save_guide",
]
