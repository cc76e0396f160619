"""pyro_lora: LoRA matrices of a peft model as Pyro sample sites (the model side).

Posterior families live in the sibling package :mod:`guides`.
"""

from .io import export_adapter, load_guide, save_guide
from .likelihoods import CausalLM, MultipleChoice, SequenceClassification
from .model import LoraModel
from .predictive import Prediction, predict
from .distributions import LowRankPlusDiagNormal, MatrixNormalKronecker, isotropic_normal
from .scalabl import ScalaBLModel
from .sites import Site
from .training import FitState, fit

__all__ = [
    "CausalLM",
    "FitState",
    "LoraModel",
    "LowRankPlusDiagNormal",
    "MatrixNormalKronecker",
    "MultipleChoice",
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
