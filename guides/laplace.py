"""Post-hoc Laplace approximation over the LoRA matrices with Kronecker-factored (KFAC) curvature.

Around a trained adapter ``theta*`` (the MAP), each LoRA matrix ``W`` gets the Gaussian
``N(theta*, (F + lambda I)^-1)`` where ``F`` is the Fisher (= GGN for softmax cross-entropy) of the
training data restricted to ``W``, approximated by KFAC (Ritter et al. 2018; for LoRA, Yang et al. 2024,
"Bayesian Low-rank Adaptation for Large Language Models"). The curvature machinery (hooks, factor
accumulation, eigendecompositions, GLM Jacobians) is :mod:`pyro_lora.kfac`; the posterior of one site is a
:class:`~pyro_lora.distributions.KFACNormal`.
"""

import math
import numbers
import warnings

import torch
from tqdm.auto import tqdm

from pyro_lora import distributed
from pyro_lora.calibration import golden_section
from pyro_lora.callers import user_stacklevel
from pyro_lora.checks import check_nonnegative
from pyro_lora.contract import check_guide, entry_checks
from pyro_lora.data import fixed_batches, to_device
from pyro_lora.distributions import KFACNormal
from pyro_lora.evidence import curvature_peaks, evidence_terms, maximise_evidence, precision_config, precision_tensor, site_precision
from pyro_lora.kfac import SiteFactors, accumulate, glm_batch, glm_predict, grid_nll_glm
from pyro_lora.likelihoods import MultipleChoice, is_cloze
from pyro_lora.metrics import nll
from pyro_lora.checks import check_count, check_data_given, check_flag, check_numbers
from pyro_lora.predictive import NonFinitePredictionError, predict
from pyro_lora.sites import check_values

from .base import LoraGuide
from .registry import Fitted, join_notes, method
from .tuning import margin_factor, near_overflow

_LOG_LAMBDA_RANGE = (-25.0, 25.0)  # prior precision search bounds, log scale (exp(25) ~ 7e10)
# A matrix whose largest Fisher eigenvalue is below float32 resolution of the largest of all matrices' has no
# curvature that the data can be said to give it (exactly zero for A while its B is zero)
_FLAT_CURVATURE = torch.finfo(torch.float32).eps
# Per-layer evidence: a matrix whose data determine fewer than this many of its parameters at the floor (MacKay's
# effective number gamma = sum_i g_i / (g_i + lambda)) has its lambda held at gamma_min / |theta*|^2 (see
# LaplaceGuide.uninformed_matrices)
_MIN_EFFECTIVE_PARAMETERS = 0.1


class LaplaceGuide(LoraGuide):
    r"""
    Post-hoc KFAC Laplace approximation over the LoRA sites (the laplace-torch lifecycle)::

        model.write_adapter(map_guide.mean())           # or a peft adapter loaded into model.net
        guide = LaplaceGuide(model, fisher="mc", rank=10)
        guide.fit(train_loader)                          # one forward + backward per batch
        guide.optimize_prior_precision("marglik", per_layer=True)
        pred = pyro_lora.predict(model, guide, test_loader, num_samples=8)   # weight samples
        glm = guide.predict_glm(test_loader, link="probit")                # linearised predictive

    Per LoRA matrix ``q(W) = N(theta*, (G (x) Lambda + lambda I)^-1)`` (see :class:`KFACNormal`), with
    ``G = sum_n g_n g_n^T`` summed over the ``N`` training examples and ``Lambda`` the mean of ``a a^T``
    (activations), so the Kronecker product approximates the total Fisher ``N F``.

    :param model: the :class:`~pyro_lora.LoraModel` with class-level logits (sequence classification or
        multiple choice); its adapter at :meth:`fit` is taken as ``theta*``.
    :param str fisher: ``"mc"`` (one label ``y ~ softmax(f)`` per example, one backward pass) or
        ``"exact"`` (all ``C`` classes weighted by ``p``, through ``C - 1`` backward passes).
    :param int rank: ``k``, rank kept of each ``D x D`` factor (``d_in`` for ``A``, ``d_out`` for ``B``).
    :param prior_precision: ``lambda``: a float, or a dict site -> float or a list of one per layer; default (and
        for the sites a dict leaves out) ``1 / prior**2`` of the model's float prior (the prior its MAP was trained
        under), else 1.0 (with a warning).
    :param str kfac: how token positions enter: ``"reduce"`` (per sequence: mean of the activations,
        sum of the gradients over its tokens; KFAC-reduce, Eschenhagen et al. 2023, the approximation for one label
        per sequence, inexact where a layer's output reaches the logits through one token only) or ``"expand"``
        (every token a separate term, activations averaged over tokens).
    :param int sketch: Nystrom sketch width for the ``D`` side (default ``2 k + 10``).
    """

    fitted_at_head = True  # its curvature (and evidence) was taken at the head

    def __init__(self, model, fisher="mc", rank=10, prior_precision=None, kfac="reduce", sketch=None):
        super().__init__(model)
        if prior_precision is None:
            prior_precision = _model_precision(model)
        elif isinstance(prior_precision, dict) and set(self.sites) - set(prior_precision):  # the rest: the default
            default = _model_precision(model)
            prior_precision = {**{n: default for n in self.sites if n not in prior_precision}, **prior_precision}
        if fisher not in ("mc", "exact"):
            raise ValueError(f"fisher must be 'mc' or 'exact', got {fisher!r}")
        if kfac not in ("reduce", "expand"):
            raise ValueError(f"kfac must be 'reduce' or 'expand', got {kfac!r}")
        rank = check_count(rank, "rank")
        if sketch is not None:
            sketch = check_count(sketch, "sketch", minimum=rank, alternative="at least rank")
        if model.likelihood.event_dims != 0:
            raise ValueError(
                f"LaplaceGuide needs class-level logits [B, C]; {type(model.likelihood).__name__} scores tokens"
            )
        bad = [n for n, s in self.sites.items() if s.kind.role == "between"]
        if bad:
            kinds = sorted({self.sites[n].kind.description for n in bad})
            raise ValueError(f"LaplaceGuide covers LoRA A and B matrices; site(s) {bad} are {' and '.join(kinds)}")
        self.fisher, self.rank, self.kfac, self.sketch = fisher, rank, kfac, sketch
        self._prior_config = precision_config(prior_precision, self.sites)
        device = model.device
        self.factors = torch.nn.ModuleList(
            SiteFactors(site, rank, site_precision(self._prior_config, name, site)) for name, site in self.sites.items()
        ).to(device)
        self.register_buffer("log_likelihood", torch.zeros((), device=device))
        self.register_buffer("num_data", torch.zeros((), device=device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        self._rows = None  # the fit's RowDigest key, to tell a refit over other examples (None: unfitted, or loaded)
        self.register_load_state_dict_post_hook(forget_rows)

    def config(self):
        return {
            "fisher": self.fisher, "rank": self.rank, "prior_precision": self._prior_config, "kfac": self.kfac, "sketch": self.sketch
        }

    def extra_parameters(self):
        return sum(f.extra_numbers() for f in self.factors)

    @property
    def prior_precision(self):
        """Site -> ``lambda`` per layer, ``[L]``."""
        return {name: f.prior_precision for name, f in zip(self.sites, self.factors)}

    def set_prior_precision(self, value):
        """Set ``lambda``: a positive float, or a dict site -> float or ``[L]`` (sites left out keep theirs)."""
        if isinstance(value, dict) and set(value) - set(self.sites):
            raise ValueError(f"unknown site(s) {sorted(set(value) - set(self.sites))}; the sites are {list(self.sites)}")
        new = {}
        for name, f in zip(self.sites, self.factors):
            if isinstance(value, dict) and name not in value:
                continue
            v = precision_tensor(value[name] if isinstance(value, dict) else value).to(f.loc.device)
            if v.numel() not in (1, f.prior_precision.numel()):
                raise ValueError(f"prior precision of site {name!r} needs 1 or {f.prior_precision.numel()} values, got "
                                 f"{v.numel()}")
            new[name] = v.reshape(-1).expand_as(f.prior_precision)
        for name, f in zip(self.sites, self.factors):  # all checked first: a bad value changes nothing
            if name in new:
                f.prior_precision.copy_(new[name])

    # ------------------------------------------------------------------ fitting

    def fit(self, data, progress=True, loc=None):
        """Accumulate the KFAC factors over ``data`` at ``theta*``: the model's current adapter, or ``loc``. A second
        ``fit`` replaces the first (laplace-torch's ``override=True``): give every example in one ``data``. A refit
        over other examples than the earlier fit's is warned (:func:`warn_fitted_rows`); one over the same examples, in
        any order or batching (e.g. at a MAP trained further), is not.

        Per batch: one forward at ``theta*`` with hooks on every LoRA layer, then one backward to the LoRA
        layers' outputs (``C - 1`` for ``fisher="exact"``); the factor sums are batched over layers. Also
        records ``log p(D | theta*)`` and ``N`` (labelled examples) for the evidence.

        :param data: iterable of labelled batches (dicts of tensors).
        :param dict loc: site -> value (``site.shape``) to fit at instead of the adapter (a member of an ensemble).
        :returns: ``self``.
        :raises ValueError: for ``loc`` values that are not the sites' (names, shapes, finite), or a ``DataLoader``
            dropping its last incomplete batch (the curvature is a sum over every example).

        Under ``torch.distributed`` every rank is given the same ``data`` and runs its block of batches;
        the sums (``r x r`` sides, the ``D``-side sketches over the same ``Omega``, traces, ``N``, the
        log-likelihood) are linear in the data, so one ``all_reduce`` makes every rank's factors those of
        one process (with ``fisher="mc"`` the sampled labels differ, as with any other seed).
        """
        check_data_given(data)
        progress = check_flag(progress, "progress")
        previous = earlier_fit(self)
        count, self._rows = self._fit(data, progress, loc)
        warn_fitted_rows(self.model, count, "LaplaceGuide", self._rows, previous)
        return self

    def _fit(self, data, progress, loc):
        """:meth:`fit` without its warnings, which a mixture of Laplaces says once for its components: returns ``N`` and
        the :meth:`~pyro_lora.data.RowDigest.key` of the examples."""
        if loc is not None:
            check_values(self.sites, loc, allow_sample_dim=False)
        loglik, count, rows = accumulate(
            self.model, self.sites, self.factors, data, self.fisher, self.kfac, self.sketch or 2 * self.rank + 10, progress, loc
        )
        self.log_likelihood.fill_(loglik)
        self.num_data.fill_(count)
        self.fitted.fill_(True)
        self.adopt_point_parameters()  # the posterior is of the network as it is now (its head too)
        return count, rows.key()

    # ------------------------------------------------------------------ posterior

    def _check_fitted(self):
        if not bool(self.fitted):
            raise ValueError("LaplaceGuide has no posterior yet: call fit(train_loader) first (or load a fitted guide)")

    def _check_network(self, action):
        """Refuse ``action`` on a network whose head or adapter changed since the fit, as :func:`~pyro_lora.predict`
        does: the Jacobians would be those of another network than the posterior's."""
        self._check_fitted()
        check_guide(self.model, self, action)

    def posterior(self) -> dict[str, KFACNormal]:
        self._check_fitted()
        return {name: f.distribution() for name, f in zip(self.sites, self.factors)}

    def mean(self):
        self._check_fitted()
        return {name: f.loc for name, f in zip(self.sites, self.factors)}

    # ------------------------------------------------------------------ evidence and prior precision

    def log_marginal_likelihood(self, prior_precision=None):
        """Laplace evidence ``log p(D | theta*) - 1/2 sum_W [log det P_W - P log lambda_W + lambda_W |theta*_W|^2]``.

        The sum leaves out matrices with zero curvature (:meth:`flat_matrices`): the likelihood does not depend on
        them, so their exact evidence term is 0 for every ``lambda``. Laplace's ``-lambda |theta*|^2 / 2`` there
        (the log-dets cancel) only says that ``theta*`` is not the prior's mode, and it grows without bound as
        ``lambda -> 0``.

        :param prior_precision: evaluate at this ``lambda`` (as in :meth:`set_prior_precision`) instead of the current one.
        :returns: a 0-dim tensor.
        """
        self._check_fitted()
        if prior_precision is None:
            lam = torch.cat([f.prior_precision for f in self.factors])
        else:
            current = [f.prior_precision.clone() for f in self.factors]
            try:
                self.set_prior_precision(prior_precision)
                lam = torch.cat([f.prior_precision for f in self.factors])
            finally:
                for f, c in zip(self.factors, current):
                    f.prior_precision.copy_(c)
        value, _, _ = self._evidence_terms(lam.double().log())
        return (self.log_likelihood.double() + value.sum()).float()

    def flat_matrices(self):
        """Which LoRA matrices have zero curvature: ``[M]`` bool over all layers of all sites (site order, then
        layer), true where the largest Fisher eigenvalue is at most float32 eps (1.2e-7) times the largest of
        all matrices' (all of them when every Fisher is zero). A LoRA ``B`` that is still zero makes its ``A``'s
        Fisher exactly zero.
        """
        self._check_fitted()
        peaks = curvature_peaks(self.factors)
        return peaks <= _FLAT_CURVATURE * peaks.max()

    def matrix_names(self):
        """``"site (module path)"`` of every LoRA matrix, in the order of :meth:`flat_matrices`'s ``[M]``."""
        return [f"{name} ({path})" for name, site in self.sites.items() for path in site.layers]

    def _flat_names(self, flat):
        """``"site (module path)"`` of each matrix flagged in ``flat [M]``."""
        return [n for n, f in zip(self.matrix_names(), flat.tolist()) if f]

    def _log_precision_floor(self, min_effective_parameters):
        """``[M]`` ``log(gamma_min / |theta*_W|^2)``, clamped to the search range (``theta* = 0``: its top)."""
        sq = torch.cat([f.loc.double().reshape(f.prior_precision.numel(), -1).pow(2).sum(-1) for f in self.factors])
        return (math.log(min_effective_parameters) - sq.log()).clamp(*_LOG_LAMBDA_RANGE)

    def uninformed_matrices(self, min_effective_parameters=_MIN_EFFECTIVE_PARAMETERS):
        """Which LoRA matrices the data barely inform: ``[M]`` bool (order of :meth:`flat_matrices`, which it
        excludes), true where the per-matrix evidence optimum of ``lambda`` lies below the floor
        ``lambda_min = gamma_min / |theta*_W|^2`` (``gamma_min = min_effective_parameters``).

        At the evidence optimum ``lambda |theta*|^2 = gamma``, MacKay's effective number of parameters the data
        determine, ``gamma = sum_i g_i / (g_i + lambda)`` over the matrix's Fisher eigenvalues ``g_i``; the
        evidence's curvature in ``log lambda`` is between ``gamma / 2`` and ``gamma``, so for ``gamma << 1`` it
        pins ``lambda`` to nothing like an e-fold. With little curvature the optimum is ``lambda ~ sqrt(sum g) /
        |theta*|`` and goes to 0 with it (e.g. an ``A`` whose ``B`` is a few steps from peft's zero init): a wide
        prior that swamps a sampled predictive. A matrix is flagged when ``gamma < gamma_min`` at
        ``lambda_min`` (there the evidence still rises as ``lambda`` falls). Scale-free: rescaling a matrix by
        ``c`` scales ``g`` and ``lambda`` by ``1 / c^2`` and leaves ``gamma`` and the flags as they are.
        ``min_effective_parameters=0`` flags nothing.
        """
        self._check_fitted()
        flat = self.flat_matrices()
        if min_effective_parameters <= 0:
            return torch.zeros_like(flat)
        floor = self._log_precision_floor(min_effective_parameters)
        _, slope, _ = self._evidence_terms(floor)  # d evidence / d log lambda at the floor (0 for flat matrices)
        return ~flat & (slope < 0)

    def _evidence_terms(self, log_lam):
        """Per matrix (all layers of all sites, ``[M]``): the prior terms of the evidence and their first
        and second derivatives in ``t = log lambda``; 0 for the matrices of :meth:`flat_matrices`."""
        flat = self.flat_matrices()
        return tuple(x.masked_fill(flat, 0.0) for x in evidence_terms(self.factors, log_lam))

    def optimize_prior_precision(self, method="marglik", per_layer=False, val_loader=None, grid=None, predictive="glm",
                                 num_samples=8, max_iter=100, progress=False,
                                 min_effective_parameters=_MIN_EFFECTIVE_PARAMETERS, refine=True):
        """Choose ``lambda``.

        ``"marglik"``: maximise :meth:`log_marginal_likelihood` in ``log lambda`` by safeguarded Newton steps
        with backtracking, so the evidence never decreases; it is concave in ``lambda``, so the optimum is
        unique. ``per_layer=True`` gives every LoRA matrix (each layer of each site) its own ``lambda``.
        Matrices with zero curvature (:meth:`flat_matrices`) leave the evidence unchanged whatever their
        ``lambda`` (Laplace's formula alone drives it towards 0, a very wide posterior): a warning
        names them, and they keep their ``lambda`` (``per_layer=True``) or get the one fitted on the other
        matrices (``per_layer=False``); with zero curvature everywhere nothing is fitted.
        With ``per_layer=True`` each ``lambda_W`` is kept at least ``min_effective_parameters / |theta*_W|^2``
        (a prior std per entry at most ``|theta*_W| / sqrt(gamma_min)``, 3.2 times the matrix's norm): the
        evidence is maximised under that bound, so a matrix the data barely inform (:meth:`uninformed_matrices`,
        e.g. an ``A`` whose ``B`` is near zero: its optimum goes to 0 with its curvature) is held at it, and a
        warning names those matrices. Elsewhere the bound is inactive and ``lambda`` is the evidence optimum.
        One shared ``lambda`` needs no bound: it solves ``lambda = sum_W gamma_W / sum_W |theta*_W|^2``, whose
        numerator the informed matrices keep away from 0 however flat the others are.
        ``"val_nll"``: one ``lambda`` for all, the grid value with the lowest NLL on ``val_loader`` under the
        GLM probit predictive (one pass: the Jacobians do not depend on ``lambda``) or, with
        ``predictive="samples"``, the sampled predictive with ``num_samples`` (common random numbers; a ``lambda``
        whose predictive overflows is the worst, with a margin and a second set of draws: :func:`search_grid`). ``val_loader``
        is read once into a list of batches, so every pass sees them in the same order (a shuffling ``DataLoader``,
        a generator); a ``DataLoader`` dropping its last incomplete batch is refused, as ``predict`` refuses it.

        With ``refine``, a second grid of 7 values, log-spaced between the best value's neighbours (between it and its
        one neighbour at an end of the grid; :func:`search_grid`), refines it (one more pass). When the lowest NLL is
        still at the grid's smallest or largest value, the optimum may lie beyond the grid: a warning names that edge
        and asks for a wider grid (the edge value is set).

        :param grid: ``lambda`` values for ``"val_nll"`` (default ``logspace(-4, 4, 17)``), finite and positive.
        :param int num_samples: weight samples per ``lambda`` for ``predictive="samples"`` (a positive integer).
        :param int max_iter: at most this many Newton iterations for ``"marglik"`` (a positive integer).
        :param float min_effective_parameters: ``gamma_min`` of the per-layer bound (0: none).
        :returns: the trace: evidence per Newton iteration, or NLL per grid value (the refining grid's after).
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
            before :meth:`fit`, on an unknown ``method`` or ``predictive``, ``"marglik"`` given a
            ``val_loader``, a ``grid`` or ``predictive="samples"`` (it reads none of them), ``"val_nll"`` on a network
            whose head or adapter changed since the fit (as ``predict`` refuses it) or without
            ``val_loader`` or with ``per_layer=True``, a grid value that is not finite and positive (0, negative,
            inf, nan), a ``num_samples`` or ``max_iter`` that is not a positive integer, ``per_layer``, ``refine`` or
            ``progress`` not a bool, a ``min_effective_parameters``
            that is not a finite number ``>= 0``, a ``val_loader`` that drops its last incomplete batch, or a grid NLL
            that is nan; all but the last before ``val_loader`` is read.
        """
        per_layer = check_flag(per_layer, "per_layer")
        progress = check_flag(progress, "progress")
        refine = check_flag(refine, "refine")  # a truthy "no" would refine
        distributed.check_settings("optimize_prior_precision", {  # first: the method decides which ranks run collectives
            "method": method, "per_layer": per_layer, "grid": grid, "predictive": predictive, "num_samples": num_samples,
            "max_iter": max_iter, "min_effective_parameters": min_effective_parameters, "refine": refine})
        self._check_fitted()
        check_prior_search(method, val_loader, grid)
        num_samples = check_count(num_samples, "num_samples")
        max_iter = check_count(max_iter, "max_iter")
        min_effective_parameters = check_nonnegative(min_effective_parameters, "min_effective_parameters")
        if predictive not in ("glm", "samples"):
            raise ValueError(f"predictive must be 'glm' or 'samples', got {predictive!r}")
        if method == "marglik" and predictive != "glm":
            raise ValueError(f"method='marglik' scores no predictive (predictive={predictive!r}): the evidence is of the "
                             "training data; pass method='val_nll' to choose lambda by a predictive's validation NLL")
        if method == "val_nll" and per_layer:
            raise ValueError("method='val_nll' searches one lambda for all layers: use per_layer=False")
        if method == "marglik":
            flat = self.flat_matrices()
            if bool(flat.all()):
                outcome = "keep their lambda: no matrix has curvature, nothing is fitted"
            else:
                outcome = "keep their lambda" if per_layer else "get the lambda fitted on the other matrices"
            if bool(flat.any()):
                warnings.warn(
                    f"LaplaceGuide evidence: zero curvature (largest Fisher eigenvalue at most {_FLAT_CURVATURE:.1e} of "
                    f"the largest) in {', '.join(self._flat_names(flat))}; the data do not constrain these LoRA matrices "
                    f"(the other matrix of their layer is zero, e.g. B at its zero init?), so the evidence leaves them "
                    f"out and they {outcome}",
                    stacklevel=user_stacklevel(),
                )
            if bool(flat.all()):
                return [float(self.log_marginal_likelihood())]
            floor = torch.full_like(flat, _LOG_LAMBDA_RANGE[0], dtype=torch.double)
            if per_layer:
                held = self.uninformed_matrices(min_effective_parameters)
                if bool(held.any()):
                    floor = torch.where(held, self._log_precision_floor(min_effective_parameters), floor)
                    gamma = min_effective_parameters
                    warnings.warn(
                        f"LaplaceGuide evidence: little curvature in {', '.join(self._flat_names(held))}: at the bound "
                        f"lambda = {gamma:g} / |theta*|^2 the data determine fewer than {gamma:g} of each one's "
                        "parameters (effective number sum g_i / (g_i + lambda)), so the evidence alone would take its "
                        "lambda towards 0 with the curvature (too few data, or the other matrix of the layer near zero, "
                        "e.g. B a few steps from its zero init); their lambda is held at that bound (prior std per entry "
                        f"at most {gamma ** -0.5:.2g} |theta*|); uninformed_matrices() flags them",
                        stacklevel=user_stacklevel(),
                    )
            return self._optimize_marglik(per_layer, max_iter, floor)
        grid = prior_precision_grid(grid)
        with entry_checks(self.model, self, "tune lambda on validation data"):  # every rank scores the whole data
            self._check_network("tune lambda on validation data")
        val_loader = fixed_batches(val_loader, f"{type(self).__name__} val_nll", "val_loader")  # each pass the same batches in the same order: common random numbers
        # the samples' second set of draws, for a lambda chosen where others overflowed
        again = None if predictive == "glm" else \
            (lambda lam: self._grid_nll_samples(val_loader, torch.tensor([lam]), num_samples, False, seed=1)[0])
        best, nlls = search_grid(grid, lambda g: self._grid_nll(val_loader, g, predictive, num_samples, progress), refine,
                                 type(self).__name__, again=again)
        self.set_prior_precision(best)
        return nlls

    def _optimize_marglik(self, per_layer, max_iter, floor):
        """Maximise the evidence in ``t = log lambda`` within ``[floor, high]`` (``floor``: ``[M]``, per layer)."""
        lam = torch.cat([f.prior_precision for f in self.factors]).double()
        t = lam.log() if per_layer else lam.log().mean().reshape(1)

        def terms(t):
            v, g, h = self._evidence_terms(t.expand(lam.shape))
            return (v, g, h) if per_layer else (v.sum(0, keepdim=True), g.sum(0, keepdim=True), h.sum(0, keepdim=True))

        low = floor.to(t.device) if per_layer else floor.min().reshape(1).to(t.device)
        high = torch.full_like(low, _LOG_LAMBDA_RANGE[1])
        t, history = maximise_evidence(terms, t.clamp(low, high), low, high, max_iter, self.log_likelihood)
        lam = t.expand(lam.shape).exp().float()
        start = 0
        for f in self.factors:
            f.prior_precision.copy_(lam[start : start + f.prior_precision.numel()])
            start += f.prior_precision.numel()
        return history

    def _grid_nll(self, data, grid, predictive, num_samples, progress):
        """Validation NLL per ``lambda`` of ``grid`` under ``predictive``."""
        if predictive == "glm":
            return self._grid_nll_glm(data, grid.to(self.num_data.device), progress)
        return self._grid_nll_samples(data, grid, num_samples, progress)

    def _grid_nll_glm(self, data, grid, progress):
        return grid_nll_glm(self.model, self.sites, self.factors, data, grid, progress)

    def _grid_nll_samples(self, data, grid, num_samples, progress, seed=0):
        """Validation NLL of the ``num_samples`` weight-sample predictive per ``lambda`` of ``grid``, every one on the
        draws of ``seed``; inf where the predictive is not finite (``lambda`` too small: too wide a posterior)."""
        current = [f.prior_precision.clone() for f in self.factors]
        nlls = []
        try:
            for lam in tqdm(grid.tolist(), desc="val NLL grid", disable=not progress, dynamic_ncols=True):
                self.set_prior_precision(lam)
                with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
                    torch.manual_seed(seed)  # the same noise for every lambda
                    try:
                        pred = predict(self.model, self, data, num_samples=num_samples)
                    except NonFinitePredictionError:  # a lambda this small overflows the logits: too wide, the worst
                        nlls.append(math.inf)
                        continue
                nlls.append(nll(pred.probs, pred.labels))
        finally:
            for f, c in zip(self.factors, current):
                f.prior_precision.copy_(c)
        return nlls

    # ------------------------------------------------------------------ linearised (GLM) predictive

    def glm_logits(self, batch):
        """Linearised logit distribution ``f(x; theta) ~ f(x; theta*) + J (theta - theta*)``: mean ``[N, C]``
        and covariance ``J P^-1 J^T`` ``[N, C, C]``, summed over LoRA matrices (block-diagonal posterior).

        Cost: one forward and ``C`` backward passes to the LoRA layers' outputs, then per matrix and
        example ``O(C T r D + C^2 r D + C^2 r k)`` (``T`` tokens): the Jacobian ``J_c = sum_t s_t l_t^T``
        is contracted in the posterior's eigenbasis, never as a ``P x P`` matrix.

        :raises ValueError: before :meth:`fit`, or where the network's head or adapter changed since (as ``predict``).
        """
        self._check_network("compute GLM logits")
        return self._glm_logits(batch)

    def _glm_logits(self, batch):
        batch = to_device(batch, self.model.device)
        mean, cov = self._glm_batch(batch, [f.prior_precision.unsqueeze(0) for f in self.factors])
        return mean, cov[0]

    def _glm_batch(self, batch, lams):
        """Mean ``[N, C]`` and covariance ``[G, N, C, C]`` for ``G`` prior precisions (``lams``: per site ``[G, L]``)."""
        return glm_batch(self.model, self.sites, self.factors, batch, lams)

    def predict_glm(self, data, link="probit", num_samples=100, keep_samples=False, progress=False):
        """GLM predictive over ``data``: ``p(y | x) = E_{f ~ N(mean, cov)} softmax(f)`` from :meth:`glm_logits`.

        :param link: ``"probit"`` (the pairwise probit :func:`~pyro_lora.kfac.probit`, shift-invariant like
            softmax) or ``"mc"`` (``num_samples`` logit draws per example, each example's own: its estimate moves
            with its place in the data within its Monte Carlo error, :func:`~pyro_lora.kfac.glm_predict`).
        :param int num_samples: logit draws per example for ``link="mc"`` (a positive integer, checked for
            either link as :func:`pyro_lora.predict` checks it).
        :param keep_samples: also return the per-draw probabilities ``[S, N, C]`` of ``num_samples`` logit draws
            (with ``link="probit"``, draws of the same Gaussian for the mutual information; ``probs`` stay the
            probit's).
        :returns: a :class:`~pyro_lora.Prediction`.
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
            on an unknown ``link``, ``num_samples`` not a positive integer, before :meth:`fit`, on a
            network whose head or adapter changed since (as ``predict``), or on empty ``data``.
        """
        check_data_given(data)
        keep_samples = check_flag(keep_samples, "keep_samples")
        progress = check_flag(progress, "progress")
        return glm_predict(data, self._glm_logits, self.model.likelihood.observed, link, num_samples, keep_samples, progress,
                           ready=lambda: self._check_network("predict"), guide=self)


def _model_precision(model) -> float:
    """``1 / prior**2`` of ``model``'s isotropic prior std; 1.0, said, for a prior of distributions."""
    if isinstance(model.prior, (int, float)):
        return 1.0 / float(model.prior) ** 2
    warnings.warn(f"the model's prior is a {type(model.prior).__name__}, not one std: the Laplace's prior precision starts "
                  "at 1.0; pass prior_precision= to match the prior (optimize_prior_precision re-chooses it)", stacklevel=user_stacklevel())
    return 1.0


def forget_rows(guide, incompatible_keys=None) -> None:
    """After ``load_state_dict``: the fit loaded is of examples not saved, never those of the fit it replaced."""
    guide._rows = None


def earlier_fit(guide) -> tuple | None:
    """``(N, rows)`` of ``guide``'s fit (a Laplace's or a last-layer Laplace's), for :func:`warn_fitted_rows` to tell a
    refit over other examples: ``rows`` the :meth:`~pyro_lora.data.RowDigest.key` of its examples, ``None`` for a
    loaded fit (they are not saved); ``None`` before the first fit."""
    return (int(guide.num_data), guide._rows) if bool(guide.fitted) else None


def warn_fitted_rows(model, count: int, who: str, rows: tuple, previous: tuple | None = None) -> None:
    """Warn where a Laplace's curvature summed another number of examples than the model's ``num_data`` (the training
    set its MAP was fitted to): its posterior and evidence are those of ``count`` examples (fitted on part of the
    training set, or on a loader that repeats it), as laplace-torch's would be, which is rarely what is meant.

    Warn where a refit replaced an earlier fit over other examples: ``previous`` is the earlier fit's ``(N, rows)``
    (``None``: no earlier fit; its ``rows`` ``None``: a loaded fit, whose examples are not known), ``rows`` this
    fit's :meth:`~pyro_lora.data.RowDigest.key`. laplace-torch users may expect a second ``fit`` to add its data to
    the first (its ``override=False``), e.g. one half of the training set after the other, of the same size. The same
    examples again, in any order or batching (a refit at a MAP trained further, a re-run cell), say nothing."""
    if previous is not None and previous[1] != rows:
        earlier, known = previous
        which = f"a different set of {count} examples" if known is not None else \
            f"{count} examples (the loaded fit's examples are not saved, so they cannot be compared)"
        warnings.warn(f"{who}.fit replaced the earlier fit over {earlier} examples by one over {which}: a fit replaces, it "
                      f"does not add to the curvature, so the posterior and the evidence are those of these {count} examples "
                      "alone; to fit on all of them, give every example in one loader (e.g. over a "
                      "torch.utils.data.ConcatDataset)", stacklevel=user_stacklevel())
    if model.num_data is not None and count != model.num_data:
        part = "part of" if count < model.num_data else "more than"
        warnings.warn(f"{who}.fit summed the curvature of {count} examples, but the model was built with num_data="
                      f"{model.num_data} (its training set): the posterior and the evidence are those of {count} examples "
                      f"({part} the training set); fit on the whole training set once, or build the model with "
                      f"num_data={count} if these are its data", stacklevel=user_stacklevel())


def check_prior_search(method, val_loader, grid) -> None:
    """Refuse what an ``optimize_prior_precision(method, val_loader, grid)`` would not read, before any data is read:
    an unknown ``method``, ``"marglik"`` (the evidence of the training data) given a ``val_loader`` or a ``grid``,
    ``"val_nll"`` without a ``val_loader``."""
    if method not in ("marglik", "val_nll"):
        raise ValueError(f"method must be 'marglik' or 'val_nll', got {method!r}")
    given = [name for name, v in (("val_loader", val_loader), ("grid", grid)) if v is not None]
    if method == "marglik" and given:
        raise ValueError(f"method='marglik' maximises the evidence of the training data and reads no {' or '.join(given)}: "
                         "pass method='val_nll' to choose lambda on validation data, or leave it out")
    if method == "val_nll" and val_loader is None:
        raise ValueError("method='val_nll' needs val_loader")


def prior_precision_grid(grid=None, dtype=torch.float) -> torch.Tensor:
    """``grid`` (a list, a tuple or a 1-d tensor; one number: a one-value grid) as a tensor of ``dtype`` (default
    ``logspace(-4, 4, 17)``).

    :raises ValueError: for a grid that is no sequence of numbers (a string, a 2-d grid, a bool), an empty grid or a
        value that is not finite and positive in ``dtype``.
    """
    if grid is not None and getattr(grid, "ndim", None) == 0 or isinstance(grid, numbers.Real):
        grid = [grid]  # one number: a one-value grid (a bool is refused below)
    grid = torch.logspace(-4, 4, 17, dtype=dtype) if grid is None else torch.tensor(check_numbers(grid, "grid"), dtype=dtype)
    if grid.numel() == 0 or not bool((torch.isfinite(grid) & (grid > 0)).all()):
        raise ValueError(f"grid must hold finite positive prior precisions ({str(dtype).removeprefix('torch.')}), got "
                         f"{grid.tolist()}")
    return grid


def search_grid(grid, nlls_of, refine=True, who="LaplaceGuide", tol=None, again=None):
    """The ``lambda`` of lowest validation NLL, the search every guide's ``"val_nll"`` shares: ``nlls_of(values) -> [NLL
    per value]`` over ``grid``, then (``refine``) between the best value's neighbours in the grid sorted, each value
    once (a repeated best value is not its own neighbour; at an end of the grid, between it and its one neighbour):
    7 log-spaced values (one more call of ``nlls_of``) or, with ``tol``, a golden-section search in ``log lambda`` until
    the bracket is ``tol`` wide (one value per call: for an NLL that is cheap at any ``lambda``). Returns ``(best, NLLs
    of the grid and then of the 7 refining values, in the order scored)``. Of values tied at the lowest NLL the
    largest is taken (the narrowest posterior: the validation data do not ask for more spread), whatever the grid's
    order or repeats. An NLL equal at every grid value is said (:func:`said_flat`) and not refined; a best value still
    at an end of the grid warns, naming the end (``who`` says whose): the optimum may lie beyond it. An infinite NLL
    (a weight-sample predictive that overflows float32 at that ``lambda``) is the worst value, never chosen, and so is
    every ``lambda`` within a factor :func:`~pyro_lora.guides.tuning.margin_factor` ``(-1)`` (4) of such a one, either
    side (finite on these draws, at the edge of overflowing on others). Where anything
    overflowed and ``again`` is given (``lambda -> NLL`` on a second set of draws), the ``lambda`` chosen is scored
    there too: infinite, it counts as overflowing and the best value left is chosen (and checked) instead; a warning
    says so.

    :raises ValueError: naming the ``lambda`` values where the NLL is nan, or where it is infinite at every grid value
        (no lambda is set), or where no value scored is clear of the overflow margin.
    """
    margin, overflowed, seen = margin_factor(-1), [], []

    def near(lam):  # overflowing, or within the margin of a lambda that overflowed
        return near_overflow(lam, overflowed, margin)

    def scored(values):
        nlls = list(nlls_of(values))
        bad = [g for g, v in zip(values.tolist(), nlls) if math.isnan(v)]
        if bad:
            raise ValueError(f"the validation NLL is nan at lambda = {', '.join(f'{g:g}' for g in bad)}: no lambda was set")
        overflowed.extend(g for g, v in zip(values.tolist(), nlls) if v == math.inf)
        seen.extend(zip(values.tolist(), nlls))
        return nlls

    def lowest(values, nlls):
        nlls = torch.tensor([math.inf if near(g) else v for g, v in zip(values.tolist(), nlls)], dtype=torch.float64)
        return float(values[nlls == nlls.min()].max())

    def clear_of_overflow():
        lams = torch.tensor([g for g, _ in seen], dtype=torch.float64)
        best = lowest(lams, [v for _, v in seen])
        if near(best):
            raise ValueError(f"{who} val_nll: every lambda scored is within a factor {margin:g} of one whose "
                             f"validation predictive overflows (at lambda {max(overflowed):g}, on the search's draws or "
                             f"a second set): no lambda was set; try larger values (above {max(overflowed) * margin:g})")
        return best

    nlls = scored(grid)
    ordered = torch.unique(grid)  # sorted, each value once
    low, high = float(ordered[0]), float(ordered[-1])
    if all(v == math.inf for v in nlls):  # every tie at inf would take the largest lambda as if it were best
        raise ValueError(f"{who} val_nll: the validation predictive is not finite at every lambda from {low:g} to "
                         f"{high:g} (logits overflowing float32 under too wide a posterior: try larger values; or "
                         "validation inputs that are not finite): no lambda was set")
    best = lowest(grid, nlls)
    if near(best):  # every finite grid value within the margin of an overflow: refused, naming it
        clear_of_overflow()
    if said_flat(who, nlls, low, high, best):
        return best, nlls
    if refine and len(ordered) > 1:  # one value is no search
        grid_min = min(math.inf if near(g) else v for g, v in zip(grid.tolist(), nlls))
        i = int((ordered == best).nonzero()[0, 0])
        a, b = float(ordered[max(i - 1, 0)]), float(ordered[min(i + 1, len(ordered) - 1)])
        if tol is None:  # a finer log-spaced grid around the best value: the grid's step is a factor 10^0.5 by default
            fine = torch.logspace(math.log10(a), math.log10(b), 9, dtype=grid.dtype)[1:-1]
            fine_nlls = scored(fine)
            if min(math.inf if near(g) else v for g, v in zip(fine.tolist(), fine_nlls)) < grid_min:
                best = lowest(fine, fine_nlls)
            nlls = nlls + fine_nlls
        else:
            def at(t):
                value = scored(torch.tensor([math.exp(t)], dtype=grid.dtype))[0]
                return math.inf if near(math.exp(t)) else value

            t, value = golden_section(at, math.log(a), math.log(b), tol)
            if value < grid_min:
                best = math.exp(t)
    if overflowed:  # the refinement may have found an overflow next to the best value; then a second set of draws
        best = clear_of_overflow() if near(best) else best
        while again is not None and again(best) == math.inf:
            overflowed.append(best)
            best = clear_of_overflow()
        warnings.warn(
            f"{who} val_nll: the validation predictive overflowed (not finite) at lambda {max(overflowed):g}: a lambda "
            f"within a factor {margin:g} of one that overflows{', or overflowing on a second set of draws,' if again else ''} "
            f"is refused as at the edge of overflowing; lambda = {best:g} is the best value clear of that"
            f"{', finite on a second set of draws too' if again else ''}", stacklevel=user_stacklevel())
    if low < high and best in (low, high) and [g for g in ordered.tolist() if not near(g)] == [best]:
        # the other grid values were refused for the overflow margin, not scored worse: no optimum beyond is implied
        warnings.warn(f"{who} val_nll: lambda = {best:g} is the only grid value (grid {low:g} to {high:g}) clear of "
                      f"the overflow margin, the others overflowing or within a factor {margin:g} of one that did: it is "
                      f"set with no other value to compare; a grid of more values above {max(overflowed) * margin:g} "
                      "searches there", stacklevel=user_stacklevel())
    elif low < high and best in (low, high):
        side, beyond = ("smallest", f"below {low:g} (a wider posterior)") if best == low else \
            ("largest", f"above {high:g} (a narrower posterior, towards the MAP)")
        warnings.warn(
            f"{who} val_nll: the validation NLL is lowest at the {side} grid value lambda = {best:g} (grid "
            f"{low:g} to {high:g}): the optimum may lie beyond the grid; lambda = {best:g} is set, but extend the "
            f"grid {beyond} to find it",
            stacklevel=user_stacklevel(),
        )
    return best, nlls


def said_flat(who, nlls, low, high, best) -> bool:
    """Warn, and return ``True``, where the validation NLL ``nlls`` is one value over a grid from ``low`` to ``high``:
    no lambda is better than another (``best``, the largest, is set), and no optimum lies beyond the grid either."""
    if not (low < high and min(nlls) == max(nlls)):
        return False
    warnings.warn(f"{who} val_nll: the validation NLL is {nlls[0]:.6g} at every lambda from {low:g} to {high:g}: the "
                  f"posterior's spread does not change the validation predictions; lambda = {best:g} is set", stacklevel=user_stacklevel())
    return True


def kfac_likelihood(likelihood):
    """``likelihood`` as the KFAC hooks need it: a cloze likelihood runs one forward per batch (no shared prefix);
    the scores are the same."""
    if is_cloze(likelihood):
        return MultipleChoice(format="cloze", normalize=likelihood.normalize, share_prefix=False)
    return likelihood


def glm_probit(guide, loader, num_samples):
    """The linearised (GLM) predictive with the probit approximation: closed form, no weight samples; 100 logit
    draws of the same Gaussian are kept for the mutual information."""
    return guide.predict_glm(loader, link="probit", keep_samples=True)


glm_probit.uses_samples = False


@method("laplace", bayesian=True, guide=LaplaceGuide, exportable=True, predictive=glm_probit, likelihood=kfac_likelihood)
def laplace(setup):
    """Laplace-LoRA: KFAC Laplace at the MAP, prior precision by the evidence, GLM probit predictive.

    Weight samples from this posterior collapse towards chance on real data (as laplace-torch's do), so the
    table reports the linearised predictive (Yang et al., 2024, "Bayesian Low-rank Adaptation for Large
    Language Models").
    """
    model = setup.lora_model(random="AB")
    guide = LaplaceGuide(model).fit(setup.loader(setup.train), progress=setup.config.progress)
    guide.optimize_prior_precision(method="marglik")
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters())


@method("laplace_val", bayesian=True, guide=LaplaceGuide, exportable=True, predictive=glm_probit, likelihood=kfac_likelihood,
        validation=True, base="laplace")
def laplace_val(setup):
    """Laplace-LoRA with the prior precision by validation NLL of the GLM probit predictive (grid, then refined).

    The ``laplace`` fit with ``lambda`` chosen as the Laplace-LoRA paper's validation variant and laplace-torch's
    ``optimize_prior_precision(method="gridsearch")`` choose it (Yang et al., 2024), on the validation split
    temperature scaling uses.
    """
    return tuned_prior_precision(setup, setup.base_fit())


def tuned_prior_precision(setup, fitted):
    """``fitted`` (a copy of its base's fit) with one ``lambda`` for all by validation NLL over :data:`LAMBDA_GRID`,
    refined (``optimize_prior_precision("val_nll")``); a choice at an end of the grid is said in its note."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an edge of the grid is said in the method's note instead
        fitted.guide.optimize_prior_precision(method="val_nll", val_loader=setup.loader(setup.val), grid=LAMBDA_GRID)
    lam = _shared_prior_precision(fitted.guide)
    if any(math.isclose(lam, edge, rel_tol=1e-5) for edge in (LAMBDA_GRID[0], LAMBDA_GRID[-1])):
        fitted.note = join_notes(fitted.note, f"prior precision {lam:g} at the end of the validation grid "
                                 f"({LAMBDA_GRID[0]:g} to {LAMBDA_GRID[-1]:g})")
    fitted.chosen = {**fitted.chosen, "prior_precision": lam}
    return fitted


def _shared_prior_precision(guide):
    """The one ``lambda`` a validation search set (a mixture sets it on every component)."""
    factors = [f for c in getattr(guide, "components", [guide]) for f in c.factors]
    return float(factors[0].prior_precision[0])


LAMBDA_GRID = [10.0 ** (k / 2) for k in range(-8, 13)]  # 1e-4 to 1e6: the MAP itself near the top
