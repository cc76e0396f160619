"""Posterior guides over the LoRA sites of a :class:`pyro_lora.LoraModel`, one family per module.

Every guide is a Pyro guide with the model's site names, plus the fast path ``sample(S)`` / ``mean()``.
"""

from .base import LoraGuide
from .ensemble import EnsembleGuide, predict_ensemble, train_ensemble
from .flow import FlowGuide
from .laplace import LaplaceGuide
from .map import MAPGuide
from .mcdropout import MCDropoutGuide
from .meanfield import MeanFieldGuide
from .scalabl import ScalaBLGuide
from .swag import SWAGCollector, SWAGGuide
from .tfb import TFBGuide, bayesianize

__all__ = [
    "EnsembleGuide",
    "FlowGuide",
    "LaplaceGuide",
    "LoraGuide",
    "MAPGuide",
    "MCDropoutGuide",
    "MeanFieldGuide",
    "SWAGCollector",
    "SWAGGuide",
    "ScalaBLGuide",
    "TFBGuide",
    "bayesianize",
    "predict_ensemble",
    "train_ensemble",
]
