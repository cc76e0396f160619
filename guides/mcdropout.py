"""MC dropout on the LoRA input, as a guide: each sample drops input units of every ``A`` (Gal & Ghahramani 2016).

A LoRA layer computes ``s B A x``; dropping input unit ``j`` of the LoRA branch zeroes column ``j`` of ``A``.
A sample is ``A_s = A diag(m_s) / (1 - p)`` with ``m_s ~ Bernoulli(1 - p)^{d_in}`` per layer, one mask per
*sample* shared by the whole batch (peft's ``lora_dropout`` draws one per token instead). Masks in weight
space are what let S samples run through the batched S-sample predictive, and they are Gal's Bernoulli
variational family in its weight-space form.
"""

import math
import warnings

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from pyro_lora.callers import user_stacklevel
from pyro_lora.checks import check_count, check_nonnegative
from pyro_lora.distributions import check_event_shape

from .base import LoraGuide
from .ensemble import reinitialize
from .registry import Fitted, method


class MCDropoutGuide(LoraGuide):
    r"""``q(A) = law of A diag(m) / (1 - p)``, ``m ~ Bernoulli(1 - p)`` per input unit; other sites are point estimates.

    The locations are trainable parameters initialised from the adapter (or ``init``), so the guide serves
    both ways:

    - *post hoc*: wrap a trained MAP adapter and predict with ``S`` masks;
    - *dropout training*: ``fit(model, MCDropoutGuide(model), ...)``. Each step draws one mask and the ELBO is
      ``log p(D | A_m) + log p(A_m)`` plus a constant: the mask's log-probability (counted per column) does not
      depend on ``A``. That is dropout training with the prior as weight decay, with one mask per step
      instead of per token. ``fit`` runs the network in training mode, so its own dropout (BERT's, peft's
      ``lora_dropout``) draws too unless its probabilities are 0; ``predict`` draws the column masks alone.

    ``mean()`` is ``A`` itself (``E[m / (1 - p)] = 1``: the usual weight-scaling rule), so
    ``predict(..., mean=True)`` is the network without dropout.

    Example::

        model = LoraModel(net, SequenceClassification(), random="AB", num_data=len(train))
        guide = MCDropoutGuide(model, p=0.1)        # from the trained adapter
        predict(model, guide, test_loader, num_samples=10)

    :param model: a :class:`~pyro_lora.LoraModel` with at least one ``A`` site.
    :param float p: dropout probability, in ``[0, 1)``.
    :param dict init: site -> initial value (``site.shape``); default the adapter's current weights.
    :raises ValueError: for a ``p`` that is no number in ``[0, 1)``, or a model without ``A`` sites.
    """

    samples_have_width = False  # a draw masks columns of the fixed weights: p is fitted, no width search narrows it

    def __init__(self, model, p=0.1, init=None):
        super().__init__(model)
        if not check_nonnegative(p, "dropout probability p") < 1:  # a string or None refused as such, not compared
            raise ValueError(f"dropout probability p must be in [0, 1), got {p!r}")
        if not any(s.kind.role == "down" for s in self.sites.values()):
            # a LoraXSModel or ScalaBLModel takes no random=: the model class is what to change there
            fix = ("use random='A' or 'AB'" if not any(s.kind.role == "between" for s in self.sites.values()) else
                   f"a {type(model).__name__} has none to give; use a LoraModel(net, likelihood, random='A' or 'AB')")
            raise ValueError(f"MC dropout drops columns of the A sites; the model has none ({list(self.sites)}): {fix}")
        self.p = float(p)
        if self.p == 0:  # allowed (a limit of the family), but a table would list the MAP as a Bayesian method
            warnings.warn("MCDropoutGuide(p=0) drops nothing: every sample is A itself, so its predictive is the MAP's "
                          "(mutual information 0); a dropout probability p > 0 of the LoRA input units (e.g. 0.1) gives "
                          "the dropout posterior",
                          stacklevel=user_stacklevel())
        init = model.initial_values(init)
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(init[name].detach().clone().float()) for name in self.sites])

    def posterior(self):
        return {
            name: ColumnDropout(loc, self.p) if site.kind.role == "down" else dist.Delta(loc, event_dim=loc.dim())
            for (name, site), loc in zip(self.sites.items(), self.locs)
        }

    def sample(self, num_samples):
        """Name -> ``[S, *site.shape]``: ``A`` sites with one column mask per sample and layer, others repeated."""
        num_samples = check_count(num_samples, "num_samples")
        return {
            name: _drop(loc, self.p, (num_samples,)) if site.kind.role == "down" else loc.expand(num_samples, *loc.shape)
            for (name, site), loc in zip(self.sites.items(), self.locs)
        }

    def mean(self):
        return dict(zip(self.sites, self.locs))

    def config(self):
        return {"p": self.p}


def _drop(loc, p, sample_shape):
    """``loc * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` of shape ``[*sample_shape, *loc.shape[:-2], 1, d_in]``."""
    mask_shape = (*sample_shape, *loc.shape[:-2], 1, loc.shape[-1])
    keep = torch.rand(mask_shape, device=loc.device) >= p
    return loc * keep.to(loc.dtype) / (1 - p)


class ColumnDropout(TorchDistribution):
    r"""The law of ``A diag(m) / (1 - p)``, ``m_j ~ Bernoulli(1 - p)``, for ``A: [..., r, d_in]`` (one mask per matrix).

    A discrete distribution with ``event_shape = loc.shape``; ``rsample`` is differentiable in ``loc`` (the mask
    does not depend on it). ``log_prob`` counts the kept and dropped columns (``log(1 - p)`` and ``log p`` each;
    an all-zero column of ``loc`` is the same either way and counts 0); a value that is no such masking has
    ``-inf``.

    :param torch.Tensor loc: ``A``, shape ``(..., r, d_in)``; every dim is an event dim.
    :param float p: dropout probability in ``[0, 1)``.
    """

    arg_constraints = {}
    has_rsample = True

    def __init__(self, loc, p, validate_args=None):
        if loc.dim() < 2:
            raise ValueError(f"ColumnDropout: loc must have shape (..., r, d_in), got {tuple(loc.shape)}")
        self.loc, self.p = loc, float(p)
        super().__init__(torch.Size(), loc.shape, validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return self.loc.pow(2) * self.p / (1 - self.p)

    def rsample(self, sample_shape=torch.Size()):
        return _drop(self.loc, self.p, tuple(sample_shape))

    def entropy(self):
        """``H(Bernoulli(1 - p))`` nats per nonzero column of ``loc`` (a zero column is the same kept or dropped),
        shape ``batch_shape`` (empty: every dim is an event dim)."""
        per_column = -sum(q * math.log(q) for q in (self.p, 1 - self.p) if q > 0)
        return (self.loc != 0).any(-2).flatten(-(len(self.event_shape) - 1)).sum(-1).to(self.loc.dtype) * per_column

    def log_prob(self, value):
        check_event_shape(self, value)
        zero = (self.loc == 0).all(-2)  # [..., d_in]
        kept = (value == self.loc / (1 - self.p)).all(-2)
        dropped = (value == 0).all(-2)
        log_p = math.log(self.p) if self.p > 0 else -math.inf
        # a zero column of loc is zero kept or dropped (probability 1), and a value nonzero there no draw of it
        per_column = torch.where(
            zero, torch.where(dropped, 0.0, -math.inf),
            torch.where(kept, math.log1p(-self.p), torch.where(dropped, log_p, -math.inf)),
        )
        return per_column.flatten(-(len(self.event_shape) - 1)).sum(-1)


# version 2: its initialisation's seed is derived from the run seed (seed + 1 was run seed s + 1's MAP's: the two rows
# started from the same A, and per-seed intervals assume independent draws)
@method("mcdropout", bayesian=True, guide=MCDropoutGuide, exportable=True, trains=True, version=2)
def mcdropout(setup, p=0.1):
    """MC dropout of the LoRA input units: a LoRA trained with that dropout from peft's init (MAP's budget), under a
    seed no other run seed shares."""
    model = setup.lora_model(random="AB")
    (seed,) = setup.derived_seeds("mcdropout init", 1)
    reinitialize(model, seed=seed)
    guide = MCDropoutGuide(model, p=p)
    setup.fit(model, guide)
    return Fitted(guide=guide)
