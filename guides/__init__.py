"""Posterior guides over the LoRA sites of a :class:`pyro_lora.LoraModel`, one family per module.

Every guide is a Pyro guide with the model's site names, plus the fast path ``sample(S)`` / ``mean()``.
Each module also registers its method for ``pyro-lora compare`` (:mod:`pyro_lora.guides.registry`); the
import order below is the order of the comparison table.
"""

from .base import LoraGuide
from .registry import METHODS, Fitted, Method, get_method, method, methods_for_task
from .map import MAPGuide
from .meanfield import MeanFieldGuide
from .flow import FlowGuide
from .tfb import TFBGuide, bayesianize
from .laplace import LaplaceGuide
from .llla import LastLayerLaplaceGuide
from .mcdropout import MCDropoutGuide
from .ensemble import EnsembleGuide, predict_ensemble, train_ensemble
from .mola import LaplaceMixtureGuide
from .swag import SWAGCollector, SWAGGuide
from .scalabl import ScalaBLGuide
from .ivon import IVONGuide, train_ivon

__all__ = [
    "METHODS",
    "EnsembleGuide",
    "Fitted",
    "FlowGuide",
    "IVONGuide",
    "LaplaceGuide",
    "LaplaceMixtureGuide",
    "LastLayerLaplaceGuide",
    "LoraGuide",
    "MAPGuide",
    "MCDropoutGuide",
    "MeanFieldGuide",
    "Method",
    "SWAGCollector",
    "SWAGGuide",
    "ScalaBLGuide",
    "TFBGuide",
    "bayesianize",
    "get_method",
    "method",
    "methods_for_task",
    "predict_ensemble",
    "train_ensemble",
    "train_ivon",
]
