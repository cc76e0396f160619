"""Mean-field Gaussian posterior over the LoRA sites, BLoB-style: Gaussian A, point-estimate B.

``q(A) = N(mu, diag(sigma^2))`` per entry, ``sigma = softplus(c rho)`` or ``(c rho)^2``; the KL to the model's
prior is closed form under :class:`~pyro.infer.TraceMeanField_ELBO` (Pyro's Normal/Normal KL for the
isotropic prior, the core's registered KLs for the matrix priors). Optional flipout decorrelates the
weight noise across the examples of a batch.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F

from pyro_lora.checks import check_flag, check_initial_stds, check_positive
from pyro_lora.distributions import checked_normal
from pyro_lora.likelihoods import is_cloze
from pyro_lora.model import FLIPOUT_CLOZE

from .base import LoraGuide
from .registry import method
from .tuning import tempered_fit

_STDS = ("softplus", "square")


def prior_variance(model, site, who: str, alternative: str = "") -> torch.Tensor:
    """The variance of ``model``'s prior over ``site`` (``site.shape``), which ``who``'s initial stds are relative to;
    ``alternative``: another way out, said in the error.

    :raises ValueError: for a prior without a finite variance (a Cauchy), or one torch does not compute (a
        ``TransformedDistribution``).
    """
    prior = model.prior_distribution(site)
    try:
        variance = prior.variance
    except NotImplementedError:
        variance = None
    if variance is None or not bool(torch.isfinite(variance).all()):
        name = type(prior.base_dist if isinstance(prior, torch.distributions.Independent) else prior).__name__
        raise ValueError(f"{who} starts the stds of site {site.name!r} relative to the prior's, and its prior ({name}) "
                         f"has {'no finite variance' if variance is not None else 'no variance torch computes'}: use a "
                         f"prior with a finite variance{alternative}")
    return variance


class MeanFieldGuide(LoraGuide):
    r"""
    Diagonal Gaussian ``q(theta_s) = N(mu_s, diag(sigma_s^2))`` on the A sites (and, with ``b="normal"``, the
    B sites), a point estimate (:class:`~pyro.distributions.Delta`) on the other sites.

    B as a point estimate can be had two ways, and both work: build the model with ``random="A"`` (the
    cleanest: B stays a peft parameter that :func:`~pyro_lora.fit` trains as a point estimate, with no prior
    term), or keep ``random="AB"`` and ``b="delta"`` (B becomes a Delta site here: a MAP estimate under the
    model's prior on B).

    Each std is ``sigma = softplus(c rho)`` (``std="softplus"``, ``~ exp(c rho)`` while small) or
    ``sigma = (c rho)^2`` (``std="square"``, BLoB), where ``c = std_lr_scale``: Adam moves ``rho`` by about one
    learning rate per step whatever the gradient's size, so ``log sigma`` moves by about ``c * lr`` per step
    under softplus (by ``2 c lr / sqrt(sigma)`` under square: faster the smaller ``sigma``). ``c > 1`` lets the stds travel to where the data put them within a normal LoRA run
    (TyXe's mean-field failed because its stds could only creep one ``lr`` per step). Stds start at
    ``init_scale`` times each layer's RMS of ``mu`` (the prior's RMS std where ``mu`` is zero).

    The ELBO per step is ``E_q[log p(D | theta)] - KL(q || p)``; with :class:`~pyro.infer.TraceMeanField_ELBO`
    the KL is closed form against ``Normal(...).to_event(k)`` priors (the model's isotropic default) and
    the core's :class:`~pyro_lora.distributions.MatrixNormalKronecker` / :class:`~pyro_lora.distributions.LowRankPlusDiagNormal`,
    and falls back to a one-sample estimate for any other prior.

    **Flipout** (``flipout=True``, Wen et al. 2018): one draw ``A = mu + E`` per step, but example ``n``
    of the batch sees ``mu + diag(s_n) E diag(t_n)`` with random signs ``s_n, t_n``. For a symmetric
    mean-field ``q`` each example's weights are still an exact draw from ``q``, so the ELBO estimate stays
    unbiased, while the examples' weight noise decorrelates: the weight-noise part of the minibatch
    gradient variance then falls like ``1/batch`` instead of staying flat, for one extra ``r x d_in``
    matmul per LoRA layer. It needs the core hand-off to apply the sign flips (``lora_delta(..., a_loc=)``);
    the guide marks its A sites with ``infer={"flipout_loc": mu}``. Applied only inside an ELBO that averages over its
    particles (``Trace_ELBO`` and its kin: ``fit``, ``SVI``): an importance weight (``Importance``, ``RenyiELBO``) is
    one draw's, so there every example sees the one draw, with a warning. ``sample`` / the predictive draw
    whole-batch samples as usual. Refused (``ValueError``) for cloze multiple choice, whose
    choices run as rows of their own: flipout would score them under different weights.

    Example::

        model = LoraModel(net, SequenceClassification(), random="A", prior=0.2, num_data=len(train))
        guide = MeanFieldGuide(model)
        fit(model, guide, loader, epochs=3, lr=1e-3, elbo=TraceMeanField_ELBO())
        predict(model, guide, test_loader, num_samples=8)   # or mean=True: the "N=0" evaluation

    :param model: the :class:`~pyro_lora.LoraModel`.
    :param str b: ``"delta"`` (point estimate) or ``"normal"``: what B sites get, when the model has any.
    :param str std: ``"softplus"`` or ``"square"``: the std parametrisation.
    :param float init_scale: initial std relative to each layer's RMS of ``mu`` (BLoB-like: ``1e-3..1e-2``).
    :param float std_lr_scale: ``c`` above; scales how fast Adam moves the stds relative to the means.
    :param bool flipout: decorrelate weight noise across the examples of a batch (needs the core hand-off support).
    :param dict init: site -> initial mean (``site.shape``); default the adapter's current weights.
    :param bool learn_loc: ``False`` keeps every mean at ``init`` (post-hoc VI around a trained LoRA: SVI learns
        only the stds, so the extra epochs cannot overfit the means; how ``pyro-lora compare`` runs it).
    :param float temperature: the posterior temperature ``T > 0``: every std times ``sqrt(T)``, the tempered
        ``q^(1/T)`` of a Gaussian (Wenzel et al., 2020, "How Good is the Bayes Posterior in Deep Neural Networks
        Really?"); 1 is ``q`` as trained. The ``meanfield_val`` method chooses it by validation NLL.
    :raises ValueError: for an unknown ``b`` or ``std``, an ``init_scale``, ``std_lr_scale`` or ``temperature`` that is
        no finite positive number, initial stds or their parameters float32 cannot hold (an extreme ``init_scale`` or
        ``std_lr_scale``), or ``flipout`` where it cannot apply (no Gaussian A site, cloze multiple choice).
    """

    def __init__(self, model, b="delta", std="softplus", init_scale=1e-2, std_lr_scale=10.0, flipout=False, init=None, learn_loc=True,
                 temperature=1.0):
        super().__init__(model)
        self.set_temperature(temperature)
        if b not in ("delta", "normal"):
            raise ValueError(f"b must be 'delta' or 'normal', got {b!r}")
        if std not in _STDS:
            raise ValueError(f"std must be one of {_STDS}, got {std!r}")
        init_scale, std_lr_scale = check_positive(init_scale, "init_scale"), check_positive(std_lr_scale, "std_lr_scale")
        flipout = check_flag(flipout, "flipout")
        if flipout and is_cloze(model.likelihood):
            raise ValueError(FLIPOUT_CLOZE)
        self.b, self.std, self.init_scale, self.std_lr_scale = b, std, init_scale, std_lr_scale
        self.flipout, self.learn_loc = flipout, check_flag(learn_loc, "learn_loc")
        # Gaussian: A (and R) sites always, B sites when b="normal"
        self.gaussian = [n for n, s in self.sites.items() if s.matrix != "B" or b == "normal"]
        if flipout and not any(self.sites[n].kind.role == "down" for n in self.gaussian):
            # a LoraXSModel or ScalaBLModel takes no random=: the model class is what to change there
            build = ("build the model with random='AB' (or 'A')" if not any(s.kind.role == "between" for s in self.sites.values())
                     else f"a {type(model).__name__} has no A site to give; use a LoraModel(net, likelihood, random='AB')")
            raise ValueError(f"flipout=True applies to Gaussian A sites, and this model's random sites are "
                             f"{sorted({s.matrix for s in self.sites.values()})}: {build}, or leave flipout off")
        init = model.initial_values(init)
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(init[n].detach().clone().float(), requires_grad=self.learn_loc) for n in self.sites])
        with torch.no_grad():
            stds = [self._initial_std(model, n, init[n].float()) for n in self.gaussian]
            self.rhos = torch.nn.ParameterList([torch.nn.Parameter(self._rho(s)) for s in stds])
            for name, std, rho in zip(self.gaussian, stds, self.rhos):
                # float32 must hold sigma and rho = std^-1(sigma) / c, and give sigma back: an extreme c (1e300) or
                # init_scale (1e39) does not
                if not (torch.isfinite(std).all() and torch.isfinite(rho).all()  # a std of 0 (underflowed): rho = -inf
                        and torch.allclose(self._std(rho), std, rtol=1e-3, atol=0)):
                    raise ValueError(f"init_scale={init_scale:g} with std_lr_scale={std_lr_scale:g} gives {name} initial "
                                     f"stds up to {float(std.max()):.3g}, which its parameter rho = std^-1(sigma) / "
                                     "std_lr_scale cannot hold in float32 (they would start at "
                                     f"{float(self._std(rho).max()):.3g}; the stds are init_scale times each layer's "
                                     "RMS weight): choose values nearer 1")
                check_initial_stds(std, f"init_scale={init_scale:g} times {name}'s RMS weight (the prior's RMS std where it "
                                   "is 0)", "choose an init_scale nearer 1, or rescale the weights")

    def _initial_std(self, model, name, loc):
        """``init_scale *`` per-layer RMS of ``loc`` (``[L, 1, 1]`` or ``[1, 1]``), the prior's RMS std where ``loc`` is 0."""
        rms = loc.double().pow(2).mean((-2, -1), keepdim=True).sqrt().float()  # float32 squares overflow from 1.8e19
        if bool((rms > 0).all()):
            return (self.init_scale * rms).expand_as(loc)
        prior = prior_variance(model, self.sites[name], type(self).__name__, ", or give the site nonzero initial values "
                               "(init=...), which the stds are then relative to").mean((-2, -1), keepdim=True).sqrt().to(rms)
        return (self.init_scale * torch.where(rms > 0, rms, prior)).expand_as(loc)

    def _rho(self, std):
        c = self.std_lr_scale
        if self.std == "square":
            return std.sqrt() / c
        return (std + torch.log(-torch.expm1(-std))) / c  # softplus^-1

    def _std(self, rho):
        x = self.std_lr_scale * rho
        return x.pow(2) if self.std == "square" else F.softplus(x)

    def set_temperature(self, value):
        """Set the posterior temperature ``T`` (every std times ``sqrt(T)``).

        :raises ValueError: unless ``T`` is a finite positive number.
        """
        self.temperature = check_positive(value, "temperature")

    def stds(self):
        """Posterior std of every Gaussian site, the temperature's ``sqrt(T)`` included: name -> ``site.shape``."""
        scale = math.sqrt(self.temperature)
        return {n: scale * self._std(rho) for n, rho in zip(self.gaussian, self.rhos)}

    def posterior(self):
        stds = self.stds()
        return {
            n: checked_normal(loc, stds[n], loc.dim()) if n in stds else dist.Delta(loc, event_dim=loc.dim())
            for n, loc in zip(self.sites, self.locs)
        }

    def forward(self, *args, kl_weight=1.0, **kwargs):
        """Pyro guide; with flipout the Gaussian A sites carry their mean as ``infer["flipout_loc"]`` for the model."""
        posterior = self.posterior()
        locs = dict(zip(self.sites, self.locs))
        with poutine.scale(scale=kl_weight):
            return {
                n: pyro.sample(n, posterior[n], infer={"flipout_loc": locs[n]} if self._flips(n) else {})
                for n in self.sites
            }

    def _flips(self, name):
        return self.flipout and self.sites[name].kind.role == "down" and name in self.gaussian

    def mean(self):
        return dict(zip(self.sites, self.locs))

    def extra_parameters(self):
        """One ``rho`` per Gaussian entry: the stds are all this guide adds to a LoRA."""
        return sum(rho.numel() for rho in self.rhos)

    def config(self):
        return {
            "b": self.b,
            "std": self.std,
            "init_scale": self.init_scale,
            "std_lr_scale": self.std_lr_scale,
            "flipout": self.flipout,
            "learn_loc": self.learn_loc,
            "temperature": self.temperature,
        }


# The prior std of the post-hoc mean-field and flow guides: BLoB's 0.2 let the stds of the many directions the data
# leave free grow past the MiniLM LoRA entries and cost accuracy.
POST_HOC_PRIOR = 0.1


def post_hoc_note(setup, fitted):
    """``fitted`` with a note where ``--prior-scale`` set another prior than the default, which post-hoc guides ignore."""
    if setup.config.prior_scale not in (type(setup.config).prior_scale, POST_HOC_PRIOR):
        fitted.note = (f"prior std {POST_HOC_PRIOR} (the post-hoc guides fix it; --prior-scale "
                       f"{setup.config.prior_scale:g} applies to the MAP and the other methods)")
    return fitted


@method("meanfield", bayesian=True, guide=MeanFieldGuide, exportable=True, trains=True)
def meanfield(setup):
    """BLoB-style mean-field Gaussian over A and B, fitted post hoc: means fixed at the MAP, SVI learns the stds.

    Means fixed: SVI epochs that also train the means from the MAP are a noisy second run that costs accuracy;
    B Gaussian too: with A alone the spread reaches the outputs only through B's small trained entries
    (Wang et al., 2024, "BLoB: Bayesian Low-Rank Adaptation by Backpropagation").
    """
    model = setup.lora_model(random="AB", prior=POST_HOC_PRIOR)
    guide = MeanFieldGuide(model, b="normal", std_lr_scale=setup.std_lr_scale(), learn_loc=False)
    return post_hoc_note(setup, setup.svi(model, guide, train_network=False))


@method("meanfield_val", bayesian=True, guide=MeanFieldGuide, exportable=True, validation=True, base="meanfield", tempered=True)
def meanfield_val(setup):
    """Mean-field post hoc with a posterior temperature chosen by validation NLL (every std times sqrt(T)).

    The ``meanfield`` posterior, tempered: ``T`` from a log grid (every std times 0.1 to 100) refined by golden
    section, on the validation split temperature scaling uses (Wenzel et al., 2020).
    """
    return tempered_fit(setup)
