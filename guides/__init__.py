"""Posterior guides over the LoRA sites of a :class:`pyro_lora.LoraModel`, one family per module.

Every guide is a Pyro guide with the model's site names, plus the fast path ``sample(S)`` / ``mean()``.
"""

from .base import LoraGuide
from .flow import FlowGuide
from .laplace import LaplaceGuide
from .map import MAPGuide
from .meanfield import MeanFieldGuide
from .tfb import TFBGuide, bayesianize

__all__ = ["FlowGuide", "LaplaceGuide", "LoraGuide", "MAPGuide", "MeanFieldGuide", "TFBGuide", "bayesianize"]
