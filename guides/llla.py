"""Last-layer Laplace (LLLA): a Gaussian over the head's class rows, on top of a point-estimate LoRA.

The LoRA adapter stays the trained MAP (the guide's sites are point masses at it); the posterior is over the rows
of the head that give the ``C`` class logits: a classifier's weight ``W [C, D]`` and bias ``b [C]``, or, for
letter-format multiple choice, the ``lm_head`` rows of the answer-letter tokens (never the whole vocabulary).
With ``phi`` the head's input for an example (a 1 appended when the head has a bias, ``D1 = D + 1`` entries),
its logits are ``f = theta phi``, linear in ``theta [C, D1]``, so the GGN of the softmax likelihood is its exact
Hessian::

    H = sum_n Lambda_n (x) phi_n phi_n^T,   Lambda_n = diag(p_n) - p_n p_n^T,   q(theta) = N(theta*, (H + lambda I)^-1)

over ``P = C D1`` numbers (``hessian="full"``), or its KFAC approximation ``N E[Lambda] (x) E[phi phi^T]``
(``hessian="kfac"``) for large heads. The logits' distribution is then exact: ``N(theta* phi, J Sigma J^T)``.
(Daxberger et al., 2021, "Laplace Redux: Effortless Bayesian Deep Learning"; the last-layer variant of Yang et al.,
2024, "Bayesian Low-rank Adaptation for Large Language Models".)

Where :class:`~pyro_lora.MultipleChoice` passes the head's output ``z`` through known steps ``f = g(z)``, one logit
at a time (Gemma 2's ``final_logit_softcapping``, ``c tanh(z / c)``; a logit scaling:
:func:`~pyro_lora.heads.head_steps`), ``J = diag(g'(z)) (I (x) phi^T)``: ``Lambda_n`` becomes ``G_n Lambda_n G_n``
(``G_n = diag(g'(z_n))``), ``H`` the GGN rather than the exact Hessian, and the logits' distribution the linearised
``N(g(theta* phi), J Sigma J^T)``.
"""

import math
import warnings

import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from pyro_lora import distributed
from pyro_lora.callers import user_stacklevel
from pyro_lora.contract import check_guide, entry_checks
from pyro_lora.data import RowDigest, check_every_example, fixed_batches, to_device
from pyro_lora.evidence import maximise_evidence, precision_tensor
from pyro_lora.heads import class_rows, find_head, head_features, head_rows, head_steps, tied_parameters
from pyro_lora.kfac import glm_predict, probit
from pyro_lora.likelihoods import is_cloze
from pyro_lora.progress import progress_bar
from pyro_lora.metrics import nll
from pyro_lora.checks import check_count, check_data_given, check_flag

from .base import LoraGuide
from .laplace import (_LOG_LAMBDA_RANGE, LAMBDA_GRID, check_prior_search, earlier_fit, forget_rows, glm_probit,
                      prior_precision_grid, search_grid, warn_fitted_rows)
from .registry import Fitted, join_notes, method

_FULL_LIMIT = 8192  # P up to which hessian="auto" keeps the dense GGN (its P x P eigenvectors: 256 MiB in float32)
_VAL_TOL = 1e-3  # golden-section tolerance of "val_nll" in log lambda (0.1% in lambda)


def _one_precision(value) -> torch.Tensor:
    """``value`` as one float64 prior precision, finite and positive (:func:`precision_tensor`)."""
    value = precision_tensor(value, torch.float64)
    if value.numel() != 1:
        raise ValueError(f"last-layer Laplace has one prior precision: give one number, got {value.numel()}")
    return value


class LastLayerLaplaceGuide(LoraGuide):
    r"""
    Post-hoc Laplace approximation over the classification head's class rows; the LoRA stays the MAP::

        model.write_adapter(map_guide.mean())                 # the adapter and head at fit() are theta*
        guide = LastLayerLaplaceGuide(model).fit(train_loader)  # one forward per batch
        guide.optimize_prior_precision("marglik")             # or "val_nll", val_loader=...
        pred = guide.predict_glm(test_loader)                 # probs [N, C]: exact GLM logits, probit link

    ``pyro_lora.predict`` refuses this guide: its site samples are the MAP's LoRA, which carries none of the
    posterior, and so does ``pyro.infer.Predictive``. Its sites are point masses at the adapter, so the Pyro guide
    path under an ELBO, ``sample(S)`` and ``mean()`` work (and ``export_adapter`` writes the MAP LoRA).

    The head is the module ``classifier`` or ``score`` of a sequence classifier (its last ``nn.Linear``, e.g.
    RoBERTa's ``out_proj``; peft's trained copy of it) or the output embedding of a causal LM
    (:func:`~pyro_lora.heads.find_head`); its input ``phi`` is captured during the model's own forward and checked to
    reproduce the logits (:func:`~pyro_lora.heads.head_features`). ``guide.steps`` holds what ``MultipleChoice`` does
    to the head's output (Gemma 2's ``{"final_logit_softcapping": 30.0}``, :func:`~pyro_lora.heads.head_steps`;
    ``{}`` for none): its derivative is carried into the GGN and the logit covariance.

    :param model: the :class:`~pyro_lora.LoraModel`, with :class:`~pyro_lora.SequenceClassification` or letter-format
        :class:`~pyro_lora.MultipleChoice`.
    :param str hessian: ``"full"`` (the exact ``P x P`` GGN, ``P = C (D + 1)``, or ``C D`` without bias), ``"kfac"``
        (``N E[Lambda] (x) E[phi phi^T]``: ``C x C`` and ``D1 x D1`` factors) or ``"auto"`` (full for ``P <= 8192``).
    :param float prior_precision: ``lambda`` of the isotropic prior ``N(0, lambda^-1 I)`` over the head's rows.
    :param str head: the head's module path in ``model.net.named_modules()``, where it is not found by itself.
    :raises ValueError: for cloze multiple choice or token-level likelihoods, sites other than LoRA A and B, a head
        that cannot be found, is no linear layer or carries a peft adapter, answer tokens beyond its rows, or an
        unknown ``hessian``.
    """

    fitted_at_head = True  # a posterior over the head's rows, at their values
    samples_carry_posterior = False
    own_predictive = "guide.predict_glm(loader)"

    def __init__(self, model, hessian="auto", prior_precision=1.0, head=None):
        super().__init__(model)
        likelihood = model.likelihood
        if is_cloze(likelihood):
            raise ValueError(
                "LastLayerLaplaceGuide refuses cloze multiple choice: a cloze score sums the log-softmax over the whole "
                "vocabulary at every token of a choice, no linear function of a few head rows; use the letter format "
                "(MultipleChoice(answer_token_ids, format='letter'), --mc-format letter)"
            )
        if likelihood.event_dims != 0:
            raise ValueError(f"LastLayerLaplaceGuide needs class-level logits [B, C]; {type(likelihood).__name__} scores tokens")
        coded = [n for n, s in self.sites.items() if s.kind.parameter is None]
        if coded:
            raise ValueError(f"LastLayerLaplaceGuide takes its point LoRA from the adapter's A and B: site(s) {coded} have no "
                             "peft parameter to take it from (LoRA-XS cores, ScalaBL scales); build a LoraModel over A and B")
        if hessian not in ("auto", "full", "kfac"):
            raise ValueError(f"hessian must be 'auto', 'full' or 'kfac', got {hessian!r}")
        self.head = head
        linear = find_head(model, head)
        rows = class_rows(likelihood, linear)
        self.tied = tied = tied_parameters(model.net, linear)
        if tied:
            warnings.warn(
                f"the head's weight is tied to the input embeddings ({', '.join(tied)}: tie_word_embeddings): the "
                "posterior is over the answer rows as output rows only, the answer tokens' input embeddings stay at "
                "the MAP; the GGN and the GLM predictive are exact for the model with its head untied at the MAP, not "
                "for the tied one (where a sampled row would also move those tokens wherever the prompt holds them)",
                UserWarning, stacklevel=user_stacklevel())
        self._head = (linear, rows)  # not a submodule: the network's weights are not the guide's
        # what the likelihood does to the head's output (a softcap, a scaling), known by the model's class: its
        # derivative goes into the GGN and the predictive in every dtype, rather than a float32 fit refusing it
        self.steps = head_steps(model, linear)
        # the weight's shape, which the forward uses: peft's copy of a tied head (ensure_weight_tying) swaps its
        # in_features and out_features
        c, d1 = rows.numel(), linear.weight.shape[1] + (linear.bias is not None)
        self.hessian = ("full" if c * d1 <= _FULL_LIMIT else "kfac") if hessian == "auto" else hessian
        device = model.device
        for i, value in enumerate(model.adapter_values().values()):
            self.register_buffer(f"site_{i}", value)
        self.register_buffer("loc", torch.zeros(c, d1, device=device))
        self.register_buffer("prior_precision", torch.ones((), dtype=torch.float64, device=device))
        self.set_prior_precision(prior_precision)
        self.register_buffer("log_likelihood", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("num_data", torch.zeros((), dtype=torch.float64, device=device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        self._rows = None  # the fit's RowDigest key, to tell a refit over other examples (None: unfitted, or loaded)
        self.register_load_state_dict_post_hook(forget_rows)
        # the posterior as eigendecompositions, so that every lambda is cheap: eigenvalues in float64 (log-dets),
        # eigenvectors in float32 (they hold nearly all the numbers)
        shapes = {"eigvals": [c * d1], "eigvecs": [c * d1, c * d1]} if self.hessian == "full" else \
            {"class_eigvals": [c], "class_eigvecs": [c, c], "feature_eigvals": [d1], "feature_eigvecs": [d1, d1]}
        for name, shape in shapes.items():
            dtype = torch.float64 if name.endswith("vals") else torch.float32
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self._eigen = list(shapes)

    def config(self):
        return {"hessian": self.hessian, "prior_precision": float(self.prior_precision), "head": self.head}

    def extra_parameters(self):
        """The numbers the posterior stores: ``P^2 + P`` (full) or ``C^2 + C + D1^2 + D1`` (KFAC), and its one prior
        precision ``lambda`` (fitted, as KFAC Laplace and MoLA count theirs)."""
        return sum(getattr(self, name).numel() for name in self._eigen) + self.prior_precision.numel()

    def set_prior_precision(self, value):
        """Set ``lambda``, a positive finite number.

        :raises ValueError: for anything but one finite positive number.
        """
        self.prior_precision.fill_(float(_one_precision(value)))

    # ------------------------------------------------------------------ the sites: point masses at the MAP LoRA

    def _sites(self):
        return {name: getattr(self, f"site_{i}") for i, name in enumerate(self.sites)}

    def posterior(self):
        return {name: dist.Delta(v, event_dim=v.dim()) for name, v in self._sites().items()}

    def sample(self, num_samples):
        num_samples = check_count(num_samples, "num_samples")
        return {name: v.expand(num_samples, *v.shape) for name, v in self._sites().items()}

    def mean(self):
        return self._sites()

    # ------------------------------------------------------------------ features

    def head_rows(self):
        """The head's rows for the ``C`` classes as they are now, the bias as last column: ``[C, D1]`` float64."""
        return head_rows(*self._head)

    def features(self, batch):
        """The model's logits ``[B, K]`` (float32, ``-inf`` for a missing choice) at the guide's LoRA, and the head's
        input ``phi`` with a 1 appended for a bias, ``[B, D1]`` float64: ``theta* phi``, through ``steps`` (the
        likelihood's softcap or scaling of the head's output, ``{}`` for none), gives the finite logits.

        :raises ValueError: as :func:`~pyro_lora.heads.head_features` (a model that transforms its head's output), or
            where the network changed since the guide was built or fitted (:func:`~pyro_lora.contract.check_guide`).
        """
        check_guide(self.model, self, "compute features")
        return self._features(batch)[:2]

    def _features(self, batch):
        """:meth:`features`, and the logits' slope in the head's output ``g'(z)`` ``[B, K]`` (ones without steps)."""
        logits, phi, slope = head_features(self.model, *self._head, batch, self.mean(), self.steps)
        return logits, torch.cat([phi, torch.ones_like(phi[:, :1])], 1) if self._head[0].bias is not None else phi, slope

    # ------------------------------------------------------------------ fitting

    def fit(self, data, progress=True):
        """The GGN of ``data`` at the model's current adapter and head (``theta*``), in one pass (one forward per batch).
        A second ``fit`` replaces the first: give every example in one ``data``. A refit over other examples than the
        earlier fit's is warned (:func:`~pyro_lora.guides.laplace.warn_fitted_rows`); one over the same examples, in any
        order or batching, is not.

        Records ``log p(D | theta*)`` and ``N`` (labelled examples) for the evidence, and takes the adapter's LoRA as
        the guide's sites. Under ``torch.distributed`` every rank is given the same ``data`` and runs its block of
        batches; the sums are all-reduced.

        :returns: ``self``.
        :raises ValueError: on empty ``data``, a ``DataLoader`` dropping its last incomplete batch (the GGN is a sum over
            every example), a model this guide does not fit (:func:`~pyro_lora.contract.check_guide`), or features that
            do not reproduce the logits (:meth:`features`).
        """
        check_data_given(data)
        progress = check_flag(progress, "progress")
        previous = earlier_fit(self)
        with self._all_or_nothing(adopt=True):  # the head as it is now is what the posterior is over
            with entry_checks(self.model, None, "fit a last-layer Laplace", settings={"hessian": self.hessian}):
                check_every_example(data, "a last-layer Laplace fit")
                check_guide(self.model, self, "fit")
            count, rows = self._fit(data, progress)
        self._rows = rows  # once the fit stands: a failed one leaves the guide, its examples too, as it was
        warn_fitted_rows(self.model, count, "LastLayerLaplaceGuide", rows, previous)
        return self

    def _fit(self, data, progress):
        """The fit, unsaid: returns ``N`` and the :meth:`~pyro_lora.data.RowDigest.key` of the examples."""
        with torch.no_grad():
            for site, value in zip(self._sites().values(), self.model.adapter_values().values()):
                site.copy_(value)
        theta = self.head_rows()
        c, d1 = theta.shape
        opts = {"dtype": torch.float64, "device": theta.device}
        sums = [torch.zeros(c, d1, c, d1, **opts)] if self.hessian == "full" else \
            [torch.zeros(c, c, **opts), torch.zeros(d1, d1, **opts)]
        totals = torch.zeros(2, **opts)  # log p(D | theta*), N
        likelihood = self.model.likelihood
        rows = RowDigest(likelihood.net_inputs)
        bar = tqdm(distributed.split_batches(data), desc="LLLA", disable=not (progress and distributed.is_main()), dynamic_ncols=True)
        with distributed.refused_together("fit a last-layer Laplace"):  # a batch of one rank's block may be refused there alone
            for raw in bar:
                batch = to_device(raw, self.model.device)
                logits, phi, slope = self._features(batch)
                labels = likelihood.observed(batch)
                totals[0] += likelihood.distribution(logits).log_prob(labels).double().sum()
                totals[1] += labels.shape[0]
                rows.add(raw, labels.shape[0])  # the batch as read: no copy back from the device
                p = torch.nn.functional.pad(logits.double(), (0, c - logits.shape[1]), value=-math.inf).softmax(-1)
                g = torch.nn.functional.pad(slope, (0, c - slope.shape[1]))
                lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [B, C, C]; 0 for missing choices
                lam = lam * g[:, :, None] * g[:, None, :]  # G Lambda G: the GGN's in the head's output z
                if self.hessian == "full":
                    sums[0] += torch.einsum("bij,bk,bl->ikjl", lam, phi, phi)  # Lambda (x) phi phi^T, theta row-major
                else:
                    sums[0] += lam.sum(0)
                    sums[1] += phi.T @ phi
        distributed.all_reduce_(sums + [totals, rows.sums])
        if totals[1] == 0:
            raise ValueError("LastLayerLaplaceGuide.fit got no batches: the data is empty")
        with torch.no_grad():
            if self.hessian == "full":
                self._set_eigen("eigvals", "eigvecs", sums[0].view(c * d1, c * d1))
            else:
                self._set_eigen("class_eigvals", "class_eigvecs", sums[0])
                self._set_eigen("feature_eigvals", "feature_eigvecs", sums[1] / totals[1])
            self.loc.copy_(theta)
            self.log_likelihood.fill_(totals[0])
            self.num_data.fill_(totals[1])
            self.fitted.fill_(True)
        return int(totals[1]), rows.key()

    def _set_eigen(self, vals, vecs, matrix):
        e, q = torch.linalg.eigh((matrix + matrix.T) / 2)
        getattr(self, vals).copy_(e.clamp(min=0))  # a PSD matrix: negative values are rounding
        getattr(self, vecs).copy_(q)

    def _check_fitted(self):
        if not bool(self.fitted):
            raise ValueError("LastLayerLaplaceGuide has no posterior yet: call fit(train_loader) first (or load a fitted guide)")

    def _check_head(self):
        """Refuse predictions once the head's rows are no longer the ``theta*`` the posterior is centred on."""
        check_guide(self.model, self, "predict")
        # in loc's dtype, as fit stored it: float32, or float64 after guide.double() (then .float() never matched)
        if not torch.equal(self.head_rows().to(self.loc.dtype), self.loc):
            trained = {id(p) for p in self.model.point_parameters()}
            restore = ("load_guide the saved guide, which restores a trained head" if id(self._head[0].weight) in trained
                       else "reload the base model: an LM head is a base weight, which a saved guide does not restore")
            raise ValueError("the head's rows changed since LastLayerLaplaceGuide.fit: its posterior is centred on other "
                             f"values; fit it again (or {restore})")

    # ------------------------------------------------------------------ the posterior in its eigenbasis

    def _eigenvalues(self):
        """The GGN's eigenvalues ``[P]`` (KFAC: ``N a_i b_j``, in the order of ``U_A (x) U_B``), float64."""
        if self.hessian == "full":
            return self.eigvals
        return (self.class_eigvals[:, None] * self.feature_eigvals[None]).reshape(-1)

    def _inverse(self, lam):
        """``1 / (e + lambda)`` per eigen-direction: ``[P]`` (full) or ``[C, D1]`` (KFAC)."""
        w = (self._eigenvalues() + lam).reciprocal()
        return w if self.hessian == "full" else w.view_as(self.loc)

    def _project(self, phi):
        """``phi [N, D1]`` in the posterior's eigenbasis, float64: ``J_c V`` ``[N, C, P]`` (full) or ``phi U_B``
        ``[N, D1]`` (KFAC). In the eigenvectors' dtype (float32 but after ``guide.double()``): a float64 copy of them would
        cost ``P^2`` numbers per call."""
        if self.hessian == "full":
            return torch.einsum("nd,cdi->nci", phi.to(self.eigvecs.dtype), self.eigvecs.view(*self.loc.shape, -1)).double()
        return (phi.to(self.feature_eigvecs.dtype) @ self.feature_eigvecs).double()

    def _logit_cov(self, m, slope, lam):
        """``J Sigma J^T`` ``[N, K, K]`` from ``m = _project(phi)`` and ``g'(z)`` ``[N, K]``: the head's output
        covariance over the first ``K`` classes, scaled by the slopes."""
        w, k = self._inverse(lam), slope.shape[1]
        if self.hessian == "full":
            cov = torch.einsum("nci,nki,i->nck", m[:, :k], m[:, :k], w)
        else:
            u = self.class_eigvecs.double()[:k]
            cov = torch.einsum("ci,ni,ki->nck", u, m.pow(2) @ w.T, u)
        return cov * slope[:, :, None] * slope[:, None, :]

    def ggn(self):
        """The GGN ``H`` (KFAC: its approximation) as a dense ``[P, P]`` float64 matrix, ``theta`` flattened row-major
        from ``[C, D1]`` (entry ``c D1 + d``; the bias is the last column)."""
        self._check_fitted()
        if self.hessian == "full":
            q = self.eigvecs.double()
            return (q * self.eigvals) @ q.T
        a, b = (getattr(self, f"{k}_eigvecs").double() for k in ("class", "feature"))
        return torch.kron((a * self.class_eigvals) @ a.T, (b * self.feature_eigvals) @ b.T)

    def sample_head(self, num_samples):
        """``num_samples`` draws of the head's rows from ``N(theta*, (H + lambda I)^-1)``: ``[S, C, D1]`` float64."""
        self._check_fitted()
        num_samples = check_count(num_samples, "num_samples")
        z = torch.randn(num_samples, *self.loc.shape, dtype=torch.float64, device=self.loc.device)
        root = self._inverse(self.prior_precision).sqrt()
        # the symmetric root Q diag(root) Q^T z: a draw does not hinge on the eigenvectors eigh picks by the float
        # summation order (batches reordered, or split across ranks), e.g. in the softmax's degenerate shift direction
        if self.hessian == "full":
            q = self.eigvecs.double()
            noise = ((z.reshape(num_samples, -1) @ q) * root) @ q.T
        else:
            a, b = self.class_eigvecs.double(), self.feature_eigvecs.double()
            noise = a @ ((a.T @ z @ b) * root) @ b.T
        return self.loc.double() + noise.view_as(z)

    # ------------------------------------------------------------------ evidence and prior precision

    def _evidence_terms(self, t):
        """The prior terms of the evidence, ``-1/2 [log det(H + lambda I) - P log lambda + lambda |theta*|^2]``, and
        their first and second derivatives in ``t = log lambda`` (``[1]`` each): strictly concave in ``t`` unless
        ``theta* = 0``."""
        e, lam = self._eigenvalues(), t.exp()
        sq, p = self.loc.double().pow(2).sum(), e.numel()
        r = lam[:, None] / (e + lam[:, None])  # lambda / (e + lambda)
        value = -0.5 * ((e + lam[:, None]).log().sum(-1) - p * t + lam * sq)
        return value, -0.5 * (r.sum(-1) - p + lam * sq), -0.5 * ((r * (1 - r)).sum(-1) + lam * sq)

    def log_marginal_likelihood(self, prior_precision=None):
        """The Laplace evidence ``log p(D | theta*) - lambda/2 |theta*|^2 + P/2 log lambda - 1/2 log det(H + lambda I)``
        (nats) at ``prior_precision`` (default: the current ``lambda``).

        :raises ValueError: before :meth:`fit`, or for a ``prior_precision`` that is not one finite positive number.
        """
        self._check_fitted()
        lam = self.prior_precision if prior_precision is None else _one_precision(prior_precision)
        value, _, _ = self._evidence_terms(lam.to(self.loc.device).log().reshape(1))
        return float(self.log_likelihood + value[0])

    def optimize_prior_precision(self, method="marglik", val_loader=None, grid=None, max_iter=100, progress=False):
        """Choose ``lambda``.

        ``"marglik"``: maximise :meth:`log_marginal_likelihood` in ``log lambda`` (within ``e^-25..e^25``) by
        safeguarded Newton steps; it is concave there, so the optimum is unique. ``"val_nll"``: the validation NLL of
        the GLM probit predictive on ``val_loader`` (its features computed once) over ``grid`` (default
        ``logspace(-4, 4, 17)``), then a golden-section search in ``log lambda`` between the neighbours of the best
        grid value, the search :class:`LaplaceGuide`'s shares (:func:`~pyro_lora.guides.laplace.search_grid`: a repeated
        value is not its own neighbour, ties take the largest ``lambda``); a warning says when the optimum is at the
        grid's smallest or largest value (it may lie beyond).

        Holds the validation set's projections: ``N C P`` numbers (full) or ``N D1`` (KFAC).

        :param int max_iter: at most this many Newton iterations (a positive integer).
        :returns: the evidence per Newton iteration, or the validation NLL per grid value (in ascending ``lambda``).
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
            before :meth:`fit`, on an unknown ``method``, ``"marglik"`` given a ``val_loader`` or a
            ``grid``, ``"val_nll"`` without ``val_loader``, on an empty one or a ``DataLoader`` dropping its last
            incomplete batch, a grid value that is not finite and positive, or a grid NLL that is nan.
        """
        progress = check_flag(progress, "progress")
        distributed.check_settings("optimize_prior_precision", {  # first: the method decides which ranks run collectives
            "method": method, "grid": grid, "max_iter": max_iter})
        self._check_fitted()
        check_prior_search(method, val_loader, grid)
        max_iter = check_count(max_iter, "max_iter")
        if method == "marglik":
            low, high = (torch.full((1,), v, dtype=torch.float64, device=self.loc.device) for v in _LOG_LAMBDA_RANGE)
            start = self.prior_precision.log().reshape(1).clamp(low, high)
            t, history = maximise_evidence(self._evidence_terms, start, low, high, max_iter, self.log_likelihood)
            self.set_prior_precision(float(t.exp()))
            return history
        grid = prior_precision_grid(grid, torch.float64).sort().values
        nll_at = self._val_nll(val_loader, progress)
        best, nlls = search_grid(grid, lambda values: [nll_at(lam) for lam in values.tolist()], True,
                                 "LastLayerLaplaceGuide", tol=_VAL_TOL)
        self.set_prior_precision(best)
        return nlls

    def _val_nll(self, val_loader, progress):
        """``lambda -> `` the validation NLL of the GLM probit predictive on ``val_loader``, whose features and
        projections are computed here, once."""
        with entry_checks(self.model, self, "tune lambda on validation data"):  # every rank scores the whole data
            self._check_head()
        val_loader = fixed_batches(val_loader, "LastLayerLaplaceGuide val_nll", "val_loader")  # every rank scores the same whole validation set
        cache, labels = [], []
        for batch in progress_bar(val_loader, desc="LLLA val features", disable=not progress, dynamic_ncols=True):
            logits, phi, slope = self._features(batch)
            cache.append((logits, self._project(phi), slope))
            labels.append(self.model.likelihood.observed(to_device(batch, self.model.device)))
        if not cache:
            raise ValueError("val_loader is empty")
        labels, width = torch.cat(labels), max(logits.shape[1] for logits, _, _ in cache)

        def val_nll(lam):
            probs = [probit(mean, self._logit_cov(m, slope, lam)) for mean, m, slope in cache]
            return nll(torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in probs]), labels)

        return val_nll

    # ------------------------------------------------------------------ the GLM predictive (exact for a linear head)

    def glm_logits(self, batch):
        """The logits' distribution under the posterior: mean ``[B, K]`` (the model's logits, ``-inf`` for a missing
        choice) and covariance ``J Sigma J^T`` ``[B, K, K]`` (0 in a missing choice's row and column), both float64."""
        self._ready()
        return self._glm(batch)

    def _glm(self, batch):
        logits, phi, slope = self._features(batch)
        cov = self._logit_cov(self._project(phi), slope, self.prior_precision)
        missing = torch.isneginf(logits)  # a missing choice's -inf is a constant: no row of J, no variance
        return logits.double(), cov.masked_fill(missing[:, :, None] | missing[:, None, :], 0.0)

    def predict_glm(self, data, link="probit", num_samples=100, keep_samples=False, progress=False):
        """The predictive ``p(y | x) = E_{f ~ N(mean, cov)} softmax(f)`` over ``data`` from :meth:`glm_logits`.

        :param link: ``"probit"`` (the pairwise probit :func:`~pyro_lora.kfac.probit`, shift-invariant like
            softmax) or ``"mc"`` (``num_samples`` logit draws per example).
        :param int num_samples: logit draws for ``link="mc"`` (a positive integer, checked for either link).
        :param keep_samples: also return the per-draw probabilities ``[S, N, C]`` of ``num_samples`` logit draws
            (with ``link="probit"``, draws of the same Gaussian for the mutual information; ``probs`` stay the
            probit's).
        :returns: a :class:`~pyro_lora.Prediction` (probs ``[N, C]``, 0 for missing choices).
        :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
            on an unknown ``link``, ``num_samples`` not a positive integer, before :meth:`fit`, a
            head changed since, or empty ``data``.
        """
        check_data_given(data)
        keep_samples = check_flag(keep_samples, "keep_samples")
        progress = check_flag(progress, "progress")
        return glm_predict(data, self._glm, self.model.likelihood.observed, link, num_samples, keep_samples, progress,
                           desc="LLLA predict", ready=self._ready, guide=self)

    def _ready(self):
        """Refuse to predict before fit, or with a head changed since."""
        self._check_fitted()
        self._check_head()


# cloze scores each choice by the whole vocabulary's log-softmax over its tokens: no head rows hold the answer
@method("llla", bayesian=True, guide=LastLayerLaplaceGuide, exportable=True, predictive=glm_probit, mc_formats=("letter",))
def llla(setup):
    """Last-layer Laplace: a Gaussian over the head's class rows at the MAP, prior precision by the evidence, GLM probit.

    The LoRA stays the MAP; the full GGN (KFAC beyond 8192 numbers) of the head's rows gives the posterior, and the
    logits' distribution is exact for the linear head (Daxberger et al., 2021, "Laplace Redux"; Yang et al., 2024,
    "Bayesian Low-rank Adaptation for Large Language Models"). Cloze multiple choice is refused: use letter format.
    """
    model = setup.lora_model(random="AB")
    guide = LastLayerLaplaceGuide(model).fit(setup.loader(setup.train), progress=setup.config.progress)
    guide.optimize_prior_precision("marglik")
    note = "head tied to the input embeddings: a posterior over its output rows only" if guide.tied else None
    return Fitted(guide=guide, extra_parameters=guide.extra_parameters(), note=note)


@method("llla_val", bayesian=True, guide=LastLayerLaplaceGuide, exportable=True, predictive=glm_probit, validation=True,
        base="llla", mc_formats=("letter",))
def llla_val(setup):
    """Last-layer Laplace with the prior precision by validation NLL (grid, then golden section), GLM probit.

    The ``llla`` fit (Daxberger et al., 2021; Yang et al., 2024), with ``lambda`` minimising the validation split's NLL
    of the GLM probit predictive over ``laplace_val``'s grid instead of maximising the evidence; a ``lambda``
    at an end of the grid is said in the method's note. Cloze multiple choice is refused: use letter format.
    """
    fitted = setup.base_fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an end of the grid is said in the method's note instead
        fitted.guide.optimize_prior_precision("val_nll", val_loader=setup.loader(setup.val), grid=LAMBDA_GRID)
    lam = float(fitted.guide.prior_precision)
    if any(math.isclose(lam, edge, rel_tol=1e-5) for edge in (LAMBDA_GRID[0], LAMBDA_GRID[-1])):
        fitted.note = join_notes(fitted.note, f"prior precision {lam:g} at the end of the validation grid "
                                 f"({LAMBDA_GRID[0]:g} to {LAMBDA_GRID[-1]:g})")
    fitted.chosen = {**fitted.chosen, "prior_precision": lam}
    return fitted
