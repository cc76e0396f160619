"""Posterior guides over the LoRA sites of a :class:`pyro_lora.LoraModel`, one family per module.

Every guide is a Pyro guide with the model's site names, plus the fast path ``sample(S)`` / ``mean()``.
"""

from .base import LoraGuide
from .map import MAPGuide

__all__ = ["LoraGuide", "MAPGuide"]
