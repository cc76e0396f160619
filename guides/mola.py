"""Mixture of Laplace approximations (MoLA): a KFAC Laplace around each member of a deep ensemble.

Eschenhagen et al. (2021), "Mixtures of Laplace Approximations for Improved Post-Hoc Uncertainty in Deep Learning":
``q(theta) = 1/K sum_k N(theta_k, P_k^-1)``, component ``k`` the :class:`~pyro_lora.guides.LaplaceGuide` of member
``k`` (fitted at its LoRA values, with its own head), and the predictive the uniform mixture of the components' GLM
predictives. The members bring the accuracy of the ensemble, each Laplace the spread around its member; it costs the
ensemble plus ``K`` Laplace fits, and ``K`` GLM passes per prediction.
"""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch

from pyro_lora import distributed
from pyro_lora.checks import check_data_given, check_flag, check_reiterable
from pyro_lora.contract import check_guide, check_model, entry_checks
from pyro_lora.data import fixed_batches
from pyro_lora.ownership import point_snapshot
from pyro_lora.distributions import UniformMixture
from pyro_lora.kfac import glm_predict, grid_nll, probit

from .base import DensityDelta
from .ensemble import MEMBER_SITE, EnsembleGuide
from .laplace import (LaplaceGuide, check_prior_search, earlier_fit, kfac_likelihood, prior_precision_grid, search_grid,
                      tuned_prior_precision, warn_fitted_rows)
from .registry import Fitted, method


class LaplaceMixtureGuide(EnsembleGuide):
    r"""``q(theta) = 1/K sum_k N(theta_k, (G_k (x) Lambda_k + lambda_k I)^-1)``: one KFAC Laplace per ensemble member.

    Build it from a trained ensemble, fit the components, then predict with the mixture of GLM predictives::

        ensemble = train_ensemble(model, train_loader, k=3)
        guide = LaplaceMixtureGuide.from_ensemble(ensemble).fit(train_loader)
        guide.optimize_prior_precision("marglik")        # each component its own lambda_k
        pred = guide.predict_glm(test_loader)            # 1/K sum_k GLM probit of component k

    Component ``k`` is ``components[k]``, a :class:`~pyro_lora.guides.LaplaceGuide` whose mean is member ``k``; while
    it is fitted or predicts, member ``k``'s head runs in the network's place (:meth:`heads_of`), so its curvature and
    its Jacobians are those of member ``k``'s network. As for :class:`EnsembleGuide`, :meth:`sample` draws component
    ``s mod K`` for draw ``s`` (``S`` a multiple of ``K``), with per-member heads only inside :meth:`member_heads`,
    and :meth:`mean` (the members' averaged weights) predicts nothing. Weight samples of a Laplace collapse on real
    data (see :class:`~pyro_lora.guides.LaplaceGuide`): report :meth:`predict_glm`.

    :param model: the :class:`~pyro_lora.LoraModel` (class-level logits, sites ``A`` and ``B``).
    :param list members: ``K`` dicts site -> value (the ensemble's members).
    :param list heads: ``K`` dicts head parameter name -> value, or ``None`` (no trained head).
    :param int num_members: ``K`` when ``members`` is ``None`` (for loading).
    :param list head_parameters: the head parameter names when ``heads`` is ``None`` (for loading).
    :param str fisher: ``"mc"`` or ``"exact"``; ``rank``, ``kfac``: as :class:`~pyro_lora.guides.LaplaceGuide`'s.
    """

    def __init__(self, model, members=None, heads=None, num_members=None, head_parameters=None, fisher="mc", rank=10,
                 kfac="reduce"):
        super().__init__(model, members, heads, num_members, head_parameters)
        self.components = torch.nn.ModuleList(
            LaplaceGuide(model, fisher=fisher, rank=rank, kfac=kfac) for _ in range(self.num_members))
        first = self.components[0]  # the settings as each component checked them (a numpy rank as an int)
        self.fisher, self.rank, self.kfac = first.fisher, first.rank, first.kfac
        self.adopt_point_parameters()

    @classmethod
    def from_ensemble(cls, ensemble, model=None, **laplace_kwargs):
        """The (unfitted) mixture over ``ensemble``'s members and heads, on ``model`` (default the ensemble's; another
        :class:`~pyro_lora.LoraModel` over the same network, e.g. with the one-forward likelihood KFAC needs)."""
        model = ensemble.model if model is None else model
        check_model(model, "build a Laplace mixture")
        if model.net is not ensemble.model.net:
            raise ValueError("from_ensemble: the model must run the ensemble's network (its heads are set there)")
        check_guide(model, ensemble, "build a Laplace mixture from")  # its sites, adapter, base and head are the model's
        members = [{n: v[k] for n, v in ensemble.members().items()} for k in range(ensemble.num_members)]
        heads = [{n: v[k] for n, v in ensemble.heads().items()} for k in range(ensemble.num_members)]
        return cls(model, members, heads if ensemble.head_parameters else None, **laplace_kwargs)

    samples_have_width = True  # a draw spreads around its member by its component's width (the prior precision)

    @property
    def deterministic(self):
        return False

    @property
    def fitted(self):
        return all(bool(c.fitted) for c in self.components)

    def fit(self, data, progress=True):
        """Fit component ``k`` (:meth:`LaplaceGuide.fit`) at member ``k``'s values with member ``k``'s head, for each
        ``k``: ``K`` passes over ``data`` (which must be iterable again: a list or a ``DataLoader``). The posterior is of
        the network as it is now (as :meth:`LaplaceGuide.fit`); a fit that fails leaves every component as it was. A
        refit replaces the earlier fit, and one over other examples is warned, as :meth:`LaplaceGuide.fit` warns it.

        :returns: ``self``.
        :raises ValueError: for ``data`` that is an iterator (the second member would see nothing), a ``DataLoader``
            dropping its last incomplete batch (as :meth:`LaplaceGuide.fit`), or a model the guide was not built for.
        """
        check_reiterable(data, "data", "a Laplace mixture reads it once per member")
        members = self.members()
        previous = earlier_fit(self.components[0]) if self.fitted else None  # every component is fitted on the same data
        with self._all_or_nothing(adopt=True):
            check_guide(self.model, self, "fit")
            fits = self._each_component(lambda k, c: c._fit(data, progress, {n: v[k] for n, v in members.items()}))
            self.adopt_point_parameters()  # each component's head is its member's, not the network's its fit took
        count, rows = fits[0]
        for component in self.components:  # once the fit stands: a failed one leaves them, their examples too, as they were
            component._rows = rows
        warn_fitted_rows(self.model, count, type(self).__name__, rows, previous)  # once, for all components
        return self

    def optimize_prior_precision(self, method="marglik", val_loader=None, grid=None, refine=True, progress=False, **kwargs):
        """Choose the prior precisions.

        ``"marglik"``: each component its own ``lambda_k`` by its evidence (:meth:`LaplaceGuide.optimize_prior_precision`,
        whose keyword arguments ``kwargs`` takes: ``per_layer``, ``max_iter``, ...). ``"val_nll"``: one ``lambda`` for
        every component, the value of ``grid`` (default ``logspace(-4, 4, 17)``; then, with ``refine``, 7 values between
        its neighbours, or between it and its one neighbour at an end) of lowest NLL on ``val_loader`` of the predictive :meth:`predict_glm` reports, the mixture's GLM
        probit (one pass per grid: the Jacobians do not depend on ``lambda``; ``val_loader`` is read once into a list
        of batches, :meth:`LaplaceGuide.optimize_prior_precision`'s search). Either leaves every ``lambda_k`` as it was
        where it fails.

        :returns: the components' evidence traces (``"marglik"``), or the validation NLL per grid value (``"val_nll"``).
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
            before :meth:`fit`, on an unknown ``method``, ``"marglik"`` given a ``val_loader`` or a
            ``grid``, ``"val_nll"`` without ``val_loader``, with ``kwargs``, on a grid value that is not finite and positive, on a model
            the guide was not built for or a network whose head changed since, or where the NLL is nan.
        """
        refine = check_flag(refine, "refine")
        progress = check_flag(progress, "progress")
        distributed.check_settings("optimize_prior_precision", {  # first: the method decides which ranks run collectives
            "method": method, "grid": grid, "refine": refine, **kwargs})
        self._check_fitted()
        check_prior_search(method, val_loader, grid)
        if method == "marglik":
            with self._all_or_nothing():
                return [c.optimize_prior_precision("marglik", **kwargs) for c in self.components]
        if kwargs:
            raise ValueError(f"method='val_nll' of a Laplace mixture takes val_loader, grid, refine and progress; got {sorted(kwargs)}")
        grid = prior_precision_grid(grid)
        with entry_checks(self.model, self, "tune lambda on validation data"):  # every rank scores the whole data
            check_guide(self.model, self, "tune lambda on validation data")
        val_loader = fixed_batches(val_loader, f"{type(self).__name__} val_nll", "val_loader")  # the grid in one pass, its refinement in another
        with self._all_or_nothing():
            best, nlls = search_grid(grid, lambda g: self._grid_nll(val_loader, g, progress), refine, type(self).__name__)
            for component in self.components:
                component.set_prior_precision(best)
        return nlls

    def _grid_nll(self, data, grid, progress):
        """Validation NLL of the mixture's GLM probit predictive at each ``lambda`` of ``grid`` (shared by the components)."""
        grid = grid.to(self.member_0.device)
        lams = [[grid[:, None].expand(-1, f.prior_precision.numel()) for f in c.factors] for c in self.components]

        def probs_of(batch):  # [G, N, C]
            return torch.stack(self._each_component(lambda k, c: probit(*c._glm_batch(batch, lams[k])))).mean(0)

        return grid_nll(self.model, data, grid.numel(), probs_of, progress)

    def adopt_point_parameters(self):
        """Take the network's point parameters as they are now for the mixture; component ``k`` takes them with member
        ``k``'s head in place of the network's, so used alone it predicts only on a network that holds that head."""
        super().adopt_point_parameters()
        heads = self.heads()
        for k, component in enumerate(self.components):
            component._point_snapshot = point_snapshot(self.model, {n: v[k] for n, v in heads.items()})

    def posterior(self):
        """Site -> :class:`~pyro_lora.distributions.UniformMixture` of the components' :class:`KFACNormal` s."""
        parts = [c.posterior() for c in self.components]
        return {name: UniformMixture(p[name] for p in parts) for name in self.sites}

    def forward(self, *args, kl_weight=1.0, **kwargs):
        """Pyro guide: component ``k ~ Uniform{0..K-1}`` (auxiliary site ``"ensemble_member"``), a draw ``theta`` of its
        Gaussian, and each site a :class:`~pyro_lora.guides.base.DensityDelta` at it, of log-density
        ``log sum_j q_j(theta_{<=s}) - log sum_j q_j(theta_{<s})`` (the first site's less nothing), the mixture's chain
        rule over the sites. They sum to ``log sum_j q_j(theta)``: with the component site's ``-log K``, the mixture's
        exact ``log q(theta)``, what ``Importance`` and ``RenyiELBO`` weigh a draw by (the component's
        ``log q_k(theta) - log K`` fell short of it by ``-log q(k | theta)``)."""
        if self.head_parameters:
            raise ValueError("a Laplace mixture with per-member heads has no Pyro guide path (heads are not sites): "
                             "use predict_glm")
        logits = torch.zeros(self.num_members, device=self.member_0.device)
        posteriors = [c.posterior() for c in self.components]
        with poutine.scale(scale=kl_weight):
            k = pyro.sample(MEMBER_SITE, dist.Categorical(logits=logits), infer={"is_auxiliary": True})
            if k.numel() != 1:
                raise ValueError(f"the component site {MEMBER_SITE!r} got a batch of values {tuple(k.shape)}: vectorized "
                                 "particles (vectorize_particles=True, Predictive(parallel=True)) are not supported; use "
                                 "num_particles without vectorizing, or Predictive(parallel=False)")
            theta = {name: posteriors[int(k)][name].rsample() for name in self.sites}
            # [K, sites]: log q_j(theta_{<=s}); its log sum over j, less that of the sites before (none before the first)
            prefix = torch.stack([torch.stack([p[n].log_prob(theta[n]) for n in self.sites]) for p in posteriors]).cumsum(-1)
            total = torch.logsumexp(prefix, 0)
            factors = total - torch.cat([total.new_zeros(1), total[:-1]])
            return {name: pyro.sample(name, DensityDelta(v, factor, event_dim=v.dim()))
                    for (name, v), factor in zip(theta.items(), factors)}

    def sample(self, num_samples):
        """Draw ``s`` from component ``s mod K``: name -> ``[S, *site.shape]``; ``S`` must be a multiple of ``K``."""
        num_samples = self.check_num_samples(num_samples)
        self._check_heads(num_samples)
        return self.sample_members(torch.arange(num_samples, device=self.member_0.device) % self.num_members)

    def sample_members(self, index):
        """Draw ``s`` from component ``index[s]``: name -> ``[n, *site.shape]`` (component ``k``'s draws in one call)."""
        index = torch.as_tensor(index, device=self.member_0.device)
        out = {name: torch.empty(len(index), *site.shape, device=self.member_0.device) for name, site in self.sites.items()}
        for k, component in enumerate(self.components):
            rows = (index == k).nonzero().squeeze(-1)
            if len(rows):
                for name, v in component.sample(len(rows)).items():
                    out[name][rows] = v
        return out

    def draw_centres(self, index):
        """Draw ``s``'s centre, component ``index[s] mod K``'s member: name -> ``[n, *site.shape]``."""
        index = torch.as_tensor(index, device=self.member_0.device) % self.num_members
        return self.member_values(index)

    def predict_glm(self, data, link="probit", num_samples=100, keep_samples=False, progress=False):
        """``p(y | x) = 1/K sum_k p_k(y | x)``, ``p_k`` component ``k``'s GLM predictive (:meth:`LaplaceGuide.predict_glm`
        with member ``k``'s head), in one pass over ``data``: every component scores a batch before the next.

        :param link: ``"probit"`` or ``"mc"`` (``num_samples`` logit draws per example and component).
        :param keep_samples: also the logit draws of every component: ``[S K, N, C]`` (with ``link="probit"``, for
            the mutual information; ``probs`` stay the probits' average).
        :returns: a :class:`~pyro_lora.Prediction`.
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
            before :meth:`fit`, on a model the guide was not built for or a network whose head changed
            since, or as :meth:`LaplaceGuide.predict_glm` does.
        """
        check_data_given(data)
        keep_samples = check_flag(keep_samples, "keep_samples")
        progress = check_flag(progress, "progress")
        return glm_predict(data, self._glm_logits, self.model.likelihood.observed, link, num_samples, keep_samples, progress,
                           ready=self._check_ready, guide=self)

    def _check_fitted(self):
        if not self.fitted:
            raise ValueError("LaplaceMixtureGuide has no posterior yet: call fit(train_loader) first (or load a fitted guide)")

    def _check_ready(self):
        self._check_fitted()
        check_guide(self.model, self, "predict")

    def _glm_logits(self, batch):
        """Every component's linearised logits of ``batch``, each with its member's head: ``[K, N, C]``, ``[K, N, C, C]``."""
        parts = self._each_component(lambda k, c: c._glm_logits(batch))
        return torch.stack([m for m, _ in parts]), torch.stack([c for _, c in parts])

    def _each_component(self, fn):
        """``[fn(k, components[k]) for each k]``, each run with member ``k``'s head in the network's head's place."""
        out = []
        for k, component in enumerate(self.components):
            with self.heads_of([k]):
                out.append(fn(k, component))
        return out

    def extra_parameters(self):
        """The ensemble's further members plus every component's curvature factors."""
        return super().extra_parameters() + sum(c.extra_parameters() for c in self.components)

    def config(self):
        return {**super().config(), "fisher": self.fisher, "rank": self.rank, "kfac": self.kfac}


def mixture_glm_probit(guide, loader, num_samples):
    """The mixture of the components' GLM probit predictives: closed form per component, no weight samples; 100
    logit draws of each component's Gaussian are kept for the mutual information."""
    return guide.predict_glm(loader, link="probit", keep_samples=True)


mixture_glm_probit.uses_samples = False


@method("mola", bayesian=True, guide=LaplaceMixtureGuide, predictive=mixture_glm_probit, likelihood=kfac_likelihood,
        base="ensemble", version=2)  # 2: the ensemble's members draw their data order from their seeds
def mola(setup):
    """Mixture of Laplace approximations: KFAC Laplace (evidence prior) around each ensemble member, GLM probit averaged.

    Eschenhagen et al. (2021); the members are the ``ensemble`` method's (the MAP and ``K - 1`` more).
    """
    base = setup.base_fit()
    guide = LaplaceMixtureGuide.from_ensemble(base.guide, setup.lora_model(random="AB"))
    guide.fit(setup.loader(setup.train), progress=setup.config.progress)
    guide.optimize_prior_precision("marglik")
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters(), inherited_seconds=base.inherited_seconds)


@method("mola_val", bayesian=True, guide=LaplaceMixtureGuide, predictive=mixture_glm_probit, likelihood=kfac_likelihood,
        validation=True, base="mola", version=2)  # as mola's
def mola_val(setup):
    """Mixture of Laplace approximations with one prior precision by validation NLL of the mixture's GLM probit
    predictive (grid, then refined), on the validation split temperature scaling uses."""
    return tuned_prior_precision(setup, setup.base_fit())
