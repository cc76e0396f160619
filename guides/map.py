"""MAP: a point estimate of every LoRA site, i.e. plain LoRA fine-tuning through the Pyro model."""

import pyro.distributions as dist
import torch

from .base import LoraGuide


class MAPGuide(LoraGuide):
    """``q(theta) = delta(theta - theta_MAP)``; SVI with it maximises ``log p(D | theta) + log p(theta)``.

    :param model: the :class:`~pyro_lora.LoraModel`.
    :param dict init: site -> initial value (``site.shape``); defaults to the adapter's current weights,
        never zeros (A = B = 0 is a saddle).
    """

    deterministic = True

    def __init__(self, model, init=None):
        super().__init__(model)
        init = init if init is not None else model.adapter_values()
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(init[name].detach().clone().float()) for name in self.sites])

    def posterior(self):
        return {name: dist.Delta(loc, event_dim=loc.dim()) for name, loc in zip(self.sites, self.locs)}

    def sample(self, num_samples):
        return {name: loc.expand(num_samples, *loc.shape) for name, loc in zip(self.sites, self.locs)}

    def mean(self):
        return dict(zip(self.sites, self.locs))
