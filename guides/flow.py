r"""Bayesian-LoRA: inducing weights under a Kronecker prior, a masked autoregressive flow over them, and
Matheron-rule sampling of the LoRA matrices.

Per LoRA matrix ``W: [m, n]`` a small inducing matrix ``U: [M_r, M_c]`` is jointly Gaussian with ``W``:
the augmented matrix ``[[U, .], [., W]]`` is matrix-normal with row covariance
``sigma_p^2 [[Z_r Z_r^T + D_r^2, Z_r], [Z_r^T, I_m]]`` and column covariance ``[[Z_c Z_c^T + D_c^2, Z_c], [Z_c^T, I_n]]``.
So ``p(W) = N(0, sigma_p^2 I)`` -- exactly the model's isotropic prior, whatever ``Z, D`` are --,
``p(U) = MN(0, sigma_p^2 K_r, K_c)`` with ``K = Z Z^T + D^2`` (:class:`~pyro_lora.MatrixNormalKronecker`), and
``p(W | U) = N(T_r U T_c, Sigma)`` with ``T_r = Z_r^T K_r^{-1}``, ``T_c = K_c^{-1} Z_c`` and
``Sigma = sigma_p^2 (I - P_r (x) P_c)``, ``P = Z^T K^{-1} Z``.

The posterior is ``q(U) q(W | U)``: ``q(U)`` a diagonal Gaussian pushed through a masked affine autoregressive
flow (row-wise, batched over the stacked layers), and ``q(W | U) = N(W_map + T_r (U - U_0) T_c, lambda^2 Sigma)``
with ``U_0`` the flow's image of the base mean and ``lambda`` small and learnable. A draw uses Matheron's rule
with a joint prior draw ``(U~, W~)``: ``W = W_map + T_r (U - U_0) T_c + lambda (W~ - T_r U~ T_c)``, so with zero
variance (``q(U)`` a point, ``lambda = 0``) ``W = W_map``: exactly the LoRA.
"""

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms.utils import clamp_preserve_gradients

from pyro_lora.checks import check_count, check_flag, check_initial_stds, check_positive
from pyro_lora.distributions import MatrixNormalKronecker

from .base import DensityDelta, LoraGuide
from .meanfield import POST_HOC_PRIOR, post_hoc_note
from .registry import method
from .tuning import tempered_fit


class FlowGuide(LoraGuide):
    r"""
    Bayesian-LoRA posterior: per LoRA matrix an inducing matrix ``U`` (default ``9 x 9``) with a flow posterior,
    the matrix itself drawn from the conditional Gaussian by Matheron's rule (see the module docstring).

    **The ELBO Pyro computes.** The model is unchanged: its weight sites keep the isotropic prior
    ``N(0, sigma_p^2)``, which is the augmented prior's marginal, so ``U`` is an auxiliary variable and
    ``log p(y) >= E_q[log p(y | W) + log p(W) + log p(U | W) - log q(U) - log q(W | U)]`` with the reverse
    model ``p(U | W)`` of the augmented prior. The guide samples ``U`` as an auxiliary site
    (``infer={"is_auxiliary": True}``, log-density ``log q(U)`` through the flow) and each weight site as a
    :class:`~pyro.distributions.Delta` at the drawn ``W`` with
    ``log_density = log p(W) - log p(U) + log q(W | U) - log p(W | U)`` at the draw, so that the model's ``log p(W)``
    leaves each draw's exact log-weight ``log p(y, W) + log p(U | W) - log q(U) - log q(W | U)``: an unbiased weight of
    ``p(y)``, which :class:`~pyro.infer.Importance` and :class:`~pyro.infer.RenyiELBO` weigh draws by.
    :class:`~pyro.infer.Trace_ELBO` averages it; :class:`~pyro.infer.TraceMeanField_ELBO` takes the conditional part
    in closed form, its mean over ``q(W | U)`` (as it takes a Gaussian's KL):

    ``loss = -E[log p(y | W)] + [log q(U) - log p(U)] + 1/2 [mn (lambda^2 - 1 - log lambda^2) + maha_Sigma(W_map - T_r U_0 T_c)]``,

    i.e. expected NLL + one-sample ``KL(q(U) || p(U))`` + closed-form conditional KL; ``Trace_ELBO``'s estimate has
    the same mean and the conditional KL's one-draw estimate's noise. ``Z, D`` change only the auxiliary construction,
    never the model's prior on ``W``, so learning them keeps the bound valid.

    The model needs a float prior (``LoraModel(prior=sigma_p)``): that is the ``sigma_p`` of the augmentation.

    Example::

        model = LoraModel(net, SequenceClassification(), random="A", prior=0.1, num_data=len(train))
        guide = FlowGuide(model)                      # inducing (9, 9), flow depth 1
        fit(model, guide, loader, epochs=3, lr=1e-3, elbo=TraceMeanField_ELBO())  # the conditional KL in closed form
        predict(model, guide, test_loader, num_samples=8)

    :param model: the :class:`~pyro_lora.LoraModel`, with a float prior.
    :param inducing: ``(M_r, M_c)``, the inducing matrix's shape.
    :param int depth: number of flow layers (0: a Gaussian ``q(U)``); they alternate row-wise and column-wise.
    :param int hidden: the MADE's hidden width (default ``3 D + 1``, Pyro's, ``D`` its input width).
    :param float init_scale: ``q(U)``'s initial std relative to the prior std of each ``U`` entry.
    :param float init_lambda: initial conditional noise scale ``lambda``.
    :param float max_lambda: ``lambda = max_lambda * sigmoid(c rho)``.
    :param float std_lr_scale: ``c``: the scale parameters are ``softplus(c rho)`` / ``sigmoid(c rho)``, so
        Adam moves them ``c`` times faster than the means (as in :class:`~pyro_lora.guides.meanfield.MeanFieldGuide`).
    :param bool share_basis: the wide side's basis ``Z`` (``d_in`` for A, ``d_out`` for B: ``M x 4096`` at 7B)
        is shared by the layers of a stacked site; ``False`` gives one per layer (17x the extra parameters at 7B).
    :param dict init: site -> ``W_map`` (``site.shape``); default the adapter's current weights.
    :param bool learn_loc: ``False`` keeps ``W_map`` at ``init`` (post-hoc VI around a trained LoRA: SVI learns
        the inducing posterior, ``Z``, ``D`` and ``lambda`` only; how ``pyro-lora compare`` runs it).
    :param float temperature: the posterior temperature ``T > 0`` of prediction: every draw's deviation from
        ``W_map`` times ``sqrt(T)`` (for a Gaussian ``q`` exactly the tempered ``q^(1/T)``, as
        :class:`~pyro_lora.guides.meanfield.MeanFieldGuide`'s; through the flow a scaling of the posterior's spread,
        not of its density). SVI trains at ``T = 1``; the ``flow_val`` method chooses ``T`` by validation NLL.
    :raises ValueError: for a model without a float prior, settings out of range, or an ``init_scale`` whose initial
        ``q(U)`` stds float32 cannot compute a log-density for (:func:`~pyro_lora.checks.check_initial_stds`).
    """

    def __init__(
        self,
        model,
        inducing=(9, 9),
        depth=1,
        hidden=None,
        init_scale=1e-2,
        init_lambda=1e-3,
        max_lambda=0.03,
        std_lr_scale=10.0,
        share_basis=True,
        init=None,
        learn_loc=True,
        temperature=1.0,
    ):
        super().__init__(model)
        self.set_temperature(temperature)
        if not isinstance(model.prior, (int, float)):
            raise ValueError(
                "FlowGuide needs the model's isotropic prior, LoraModel(prior=<float>): its inducing prior has "
                f"that marginal on W; got prior={model.prior!r}"
            )
        if not (isinstance(inducing, (tuple, list)) and len(inducing) == 2):
            raise ValueError(f"inducing must be two positive ints, got {inducing!r}")
        inducing = tuple(check_count(i, "each of inducing") for i in inducing)
        depth = check_count(depth, "depth", minimum=0)
        if hidden is not None:
            hidden = check_count(hidden, "hidden")
        init_lambda, max_lambda = check_positive(init_lambda, "init_lambda"), check_positive(max_lambda, "max_lambda")
        if not 0 < init_lambda < max_lambda <= 1:
            raise ValueError(f"need 0 < init_lambda < max_lambda <= 1, got {init_lambda} and {max_lambda}")
        init_scale, std_lr_scale = check_positive(init_scale, "init_scale"), check_positive(std_lr_scale, "std_lr_scale")
        self.inducing, self.depth, self.hidden = inducing, int(depth), hidden
        self.init_scale, self.init_lambda, self.max_lambda = init_scale, float(init_lambda), float(max_lambda)
        self.std_lr_scale, self.share_basis, self.learn_loc = float(std_lr_scale), check_flag(share_basis, "share_basis"), check_flag(learn_loc, "learn_loc")
        self.prior_scale = float(model.prior)
        init = model.initial_values(init)
        self.parts = torch.nn.ModuleList([self._part(site, init[name].detach().float()) for name, site in self.sites.items()])
        for name, part in zip(self.sites, self.parts):
            check_initial_stds(F.softplus(part.c * part.u_rho.detach()),
                               f"init_scale={init_scale:g} times the prior std {self.prior_scale:g} for {name}'s q(U)",
                               "choose an init_scale (or a prior std) nearer 1")

    def _part(self, site, loc):
        wide = {"A": "col", "B": "row"}.get(site.matrix) if self.share_basis else None
        loc = loc if site.stacked else loc.unsqueeze(0)
        return _Inducing(
            loc, self.inducing, self.depth, self.hidden, wide, self.prior_scale,
            self.init_scale, self.init_lambda, self.max_lambda, self.std_lr_scale, self.learn_loc,
        )

    def posterior(self):
        raise NotImplementedError(
            "FlowGuide's q(W) has no closed-form density (a flow over U mixed through p(W | U)): use the guide "
            "itself as a Pyro guide, sample(S) or mean()"
        )

    def set_temperature(self, value):
        """Set the posterior temperature ``T`` of :meth:`sample` (deviations from ``W_map`` times ``sqrt(T)``).

        :raises ValueError: unless ``T`` is a finite positive number.
        """
        self.temperature = check_positive(value, "temperature")

    def forward(self, *args, kl_weight=1.0, **kwargs):
        """Pyro guide: an auxiliary site ``"<site>.U"`` and a Delta weight site per model site (ELBO in the class docstring).

        :raises ValueError: at a posterior temperature other than 1: its ELBO is that of the untempered ``q``.
        """
        if self.temperature != 1.0:
            raise ValueError(f"FlowGuide at temperature {self.temperature:g}: the Pyro guide path (SVI, Predictive) is the "
                             "untempered posterior, whose ELBO the class docstring gives; set_temperature(1.0) to train, "
                             "and predict with pyro_lora.predict (sample(S) applies the temperature)")
        values = {}
        with poutine.scale(scale=kl_weight):
            for (name, site), part in zip(self.sites.items(), self.parts):
                f = part.factors()
                u0 = part.flow_image(part.u_loc)
                u = pyro.sample(f"{name}.U", part.q_u().to_event(1), infer={"is_auxiliary": True})
                noise = part.prior_noise(())
                w = part.draw(u, u0, f, noise).reshape(site.shape)
                relative = self.model.prior_distribution(site).log_prob(w) - part.log_p_u(u, f).sum()
                values[name] = pyro.sample(name, DensityDelta(
                    w, relative + part.log_ratio_conditional(u0, f, noise).sum(), event_dim=w.dim(),
                    mean_field_log_density=relative + part.kl_conditional(u0, f).sum()))
        return values

    def sample(self, num_samples):
        num_samples = check_count(num_samples, "num_samples")
        out = {}
        for (name, site), part in zip(self.sites.items(), self.parts):
            f = part.factors()
            u = part.q_u().rsample((num_samples,))
            w = part.draw(u, part.flow_image(part.u_loc), f)
            if self.temperature != 1.0:
                w = part.loc + math.sqrt(self.temperature) * (w - part.loc)
            out[name] = w.reshape(num_samples, *site.shape)
        return out

    def mean(self):
        """The zero-variance path ``W_map`` (the posterior mean when ``q(U)`` is Gaussian, ``depth=0``)."""
        return {name: part.loc.reshape(site.shape) for (name, site), part in zip(self.sites.items(), self.parts)}

    def q_inducing(self, name):
        """``q(U)`` of site ``name`` at the parameters as they are now (build another after they change): batch ``[L]``,
        event ``(M_r, M_c)``; untempered, as SVI trains it."""
        return self.parts[list(self.sites).index(name)].q_u()

    def p_inducing(self, name):
        """``p(U)`` of site ``name``, a :class:`~pyro_lora.MatrixNormalKronecker` with batch ``[L]``."""
        part = self.parts[list(self.sites).index(name)]
        return part.p_u(part.factors())

    def lambdas(self):
        """Conditional noise scale ``lambda`` per site, of the posterior SVI trains (at most ``max_lambda``): name ->
        ``[L]``. At a temperature ``T`` (:meth:`set_temperature`) the draws of :meth:`sample` carry ``sqrt(T) lambda``."""
        return {name: part.factors()["lam"] for name, part in zip(self.sites, self.parts)}

    @torch.no_grad()
    def kl_terms(self, num_samples=16):
        """Per site, summed over layers: ``(KL(q(U) || p(U))`` from ``num_samples`` draws, the closed-form conditional KL).

        :raises ValueError: at a posterior temperature other than 1, whose draws these KLs do not describe (they are the
            posterior's that SVI trains, at ``T = 1``).
        """
        if self.temperature != 1.0:  # read after flow_val's tuning, they would pass for the tempered posterior's
            raise ValueError(f"kl_terms: FlowGuide at temperature {self.temperature:g}; its KLs are those of the "
                             "posterior SVI trains, at temperature 1, not of the tempered one it predicts with: "
                             "set_temperature(1.0) first to read them")
        num_samples = check_count(num_samples, "num_samples")
        out = {}
        for name, part in zip(self.sites, self.parts):
            f = part.factors()
            q = part.q_u()
            u = q.rsample((num_samples,))
            kl_u = (q.log_prob(u) - part.log_p_u(u, f)).sum(-1).mean()
            out[name] = (kl_u, part.kl_conditional(part.flow_image(part.u_loc), f).sum())
        return out

    def extra_parameters(self):
        """Everything but ``W_map`` (which is the LoRA itself): inducing posteriors, flows, bases, ``D``, ``lambda``."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.endswith(".loc"))

    def config(self):
        return {
            "inducing": list(self.inducing),
            "depth": self.depth,
            "hidden": self.hidden,
            "init_scale": self.init_scale,
            "init_lambda": self.init_lambda,
            "max_lambda": self.max_lambda,
            "std_lr_scale": self.std_lr_scale,
            "share_basis": self.share_basis,
            "learn_loc": self.learn_loc,
            "temperature": self.temperature,
        }


class _Inducing(torch.nn.Module):
    """The inducing-weight posterior of one stacked site ``W: [L, m, n]`` (an unstacked site has ``L = 1``)."""

    def __init__(self, loc, inducing, depth, hidden, wide, prior_scale, init_scale, init_lambda, max_lambda, c, learn_loc):
        super().__init__()
        L, m, n = loc.shape
        mr, mc = inducing
        self.sigma, self.max_lambda, self.c = prior_scale, max_lambda, c
        like = dict(dtype=loc.dtype, device=loc.device)
        self.loc = torch.nn.Parameter(loc.clone(), requires_grad=learn_loc)  # W_map
        # the bases start where the adapter acts: the row side from W's columns, the column side from its rows
        self.z_row = torch.nn.Parameter(_basis(loc.mT, mr, shared=wide == "row"))  # [(L,) M_r, m]
        self.z_col = torch.nn.Parameter(_basis(loc, mc, shared=wide == "col"))  # [(L,) M_c, n]
        self.d_row = torch.nn.Parameter(torch.full((L, mr), float(_softplus_inv(0.5)) / c, **like))
        self.d_col = torch.nn.Parameter(torch.full((L, mc), float(_softplus_inv(0.5)) / c, **like))
        self.lam = torch.nn.Parameter(torch.full((L,), math.log(init_lambda / (max_lambda - init_lambda)) / c, **like))
        self.u_loc = torch.nn.Parameter(torch.zeros(L, mr, mc, **like))
        with torch.no_grad():  # q(U)'s std: init_scale times the prior std of each entry, sigma sqrt(K_r[ii] K_c[jj])
            f = self.factors()
            var = f["k_row"].diagonal(dim1=-2, dim2=-1)[..., :, None] * f["k_col"].diagonal(dim1=-2, dim2=-1)[..., None, :]
            self.u_rho = torch.nn.Parameter(_softplus_inv(init_scale * prior_scale * var.sqrt()) / c)
        # flow layers: row-wise (over the M_c entries of each row), then column-wise, alternating
        self.flows = torch.nn.ModuleList(
            [BatchedAffineAutoregressive(L, mc if k % 2 == 0 else mr, hidden, transpose=k % 2 == 1) for k in range(depth)]
        ).to(**like)

    def factors(self):
        """``Z``, ``D``, ``K = Z Z^T + D^2`` with Cholesky ``chol`` (both float64), ``T_r = Z_r^T K_r^-1``,
        ``T_c = K_c^-1 Z_c``, ``lambda``."""
        L = self.loc.shape[0]
        rho = self.c * self.lam
        out = {"lam": self.max_lambda * torch.sigmoid(rho), "log_lam": math.log(self.max_lambda) + F.logsigmoid(rho)}
        for side, z, d in (("row", self.z_row, self.d_row), ("col", self.z_col, self.d_col)):
            z = z.expand(L, *z.shape[-2:])
            d = F.softplus(self.c * d)
            # K is rank-deficient but for D^2 where M exceeds its side (9 inducing rows for a rank-8 A): once D shrinks,
            # a float32 Cholesky fails or log p(U) loses hundreds of nats, so K, its factor and solves are float64
            z64 = z.double()
            k = z64 @ z64.mT + torch.diag_embed(d.double().pow(2))
            chol = torch.linalg.cholesky(k)
            out.update({f"z_{side}": z, f"d_{side}": d, f"k_{side}": k, f"chol_{side}": chol})
            out[f"t_{side}"] = torch.cholesky_solve(z64, chol).to(z.dtype)  # K^-1 Z
        out["t_row"] = out["t_row"].mT  # Z_r^T K_r^-1: [L, m, M_r]
        return out

    def q_u(self):
        # the flows' cache is keyed on the tensor alone (as Pyro's transforms key theirs), so a draw scored again after
        # the parameters moved (by any optimiser: a fused or ClippedAdam step leaves no trace on them) was read through
        # the old parameters, 18 nats off; a new q(U) starts from none, its own draws then cached within its step
        for flow in self.flows:
            flow.clear_cache()
        base = dist.Normal(self.u_loc, F.softplus(self.c * self.u_rho)).to_event(2)
        return dist.TransformedDistribution(base, list(self.flows)) if len(self.flows) else base

    def flow_image(self, x):
        """``x`` through the flows, bypassing their caches: through ``__call__`` a second call with the same ``x`` (the
        ``u_loc`` parameter) returned the first call's output, detached if that ran under no_grad, stale if the
        parameters changed since; and q(U)'s log-density reads the cache of the last draw."""
        for t in self.flows:
            x = t.image(x)[0]
        return x

    def p_u(self, f):
        """``p(U) = MN(0, sigma^2 K_r, K_c)``; each ``Z Z^T`` enters as a factor of rank ``<= M``."""
        row, col = _small_factor(f["z_row"]), _small_factor(f["z_col"])
        zeros = self.u_loc.new_zeros(self.u_loc.shape)
        return MatrixNormalKronecker(zeros, self.sigma * row, self.sigma * f["d_row"], col, f["d_col"])

    def log_p_u(self, u, f):
        """``log p(U)`` of ``u: [*S, L, M_r, M_c]`` -> ``[*S, L]``, from the Cholesky factors ``L`` of ``K_r``, ``K_c`` in ``f``:
        ``-1/2 [||L_r^-1 U L_c^-T||^2 / sigma^2 + log det(sigma^2 K_r (x) K_c) + M_r M_c log 2 pi]``. The SVI step's path:
        :meth:`p_u`'s ``log_prob`` gives the same without reusing ``f``'s factors (a QR of the wide basis per call)."""
        mr, mc = u.shape[-2:]
        a = torch.linalg.solve_triangular(f["chol_row"], u.double(), upper=False)  # L_r^-1 U, float64 as the factors
        b = torch.linalg.solve_triangular(f["chol_col"], a.mT, upper=False)  # (L_r^-1 U L_c^-T)^T
        half_logdet = (mc * f["chol_row"].diagonal(dim1=-2, dim2=-1).log().sum(-1)
                       + mr * f["chol_col"].diagonal(dim1=-2, dim2=-1).log().sum(-1) + mr * mc * math.log(self.sigma))
        log_p = -0.5 * b.pow(2).sum((-2, -1)) / self.sigma**2 - half_logdet - 0.5 * mr * mc * math.log(2 * math.pi)
        return log_p.to(u.dtype)

    def prior_noise(self, lead):
        """The standard normal blocks ``Xi = [[E, E12], [E21, E22]]`` (``[*lead, L, m, n]``, ``[.., m, M_c]``,
        ``[.., M_r, n]``, ``[.., M_r, M_c]``) of a joint prior draw: ``sigma F_r Xi F_c^T``, ``F = [[I, 0], [Z, D]]``, is
        the augmented matrix ``[[W~, .], [., U~]]``."""
        L, m, n = self.loc.shape
        mr, mc = self.u_loc.shape[-2:]
        like = dict(dtype=self.loc.dtype, device=self.loc.device)
        return tuple(torch.randn(*lead, L, rows, cols, **like) for rows, cols in ((m, n), (m, mc), (mr, n), (mr, mc)))

    def draw(self, u, u0, f, noise=None):
        """Matheron: ``W = W_map + lambda W~ + T_r (U - U_0 - lambda U~) T_c`` with ``(U~, W~ = sigma E)`` the joint prior
        draw of ``noise`` (:meth:`prior_noise`; a fresh one by default).

        :param u: ``[*S, L, M_r, M_c]``. :returns: ``[*S, L, m, n]``.
        """
        noise = self.prior_noise(u.shape[:-3]) if noise is None else noise
        lam = f["lam"][:, None, None]
        u_prior = _u_block(noise, f["z_row"], f["z_col"], f["d_row"], f["d_col"])
        return self.loc + lam * self.sigma * noise[0] + f["t_row"] @ (u - u0 - lam * self.sigma * u_prior) @ f["t_col"]

    def _precision(self, f):
        """``x -> sigma^2 Sigma^-1 x`` for float64 ``x: [*S, L, m, n]``, and ``G_r``, ``G_c``.

        ``Sigma^-1 = sigma^-2 (I + Phi^T (I - C_r (x) C_c)^-1 Phi)`` with ``Phi = G_r (x) G_c``, ``G = chol(K)^-1 Z``,
        ``C = G G^T`` (Woodbury): one ``M_r M_c``-square Cholesky per layer, no ``mn``-square matrix. Float64 as the
        factors: ``I - C`` is near-singular where ``K`` is (``D`` small against ``Z Z^T``).
        """
        g_row = torch.linalg.solve_triangular(f["chol_row"], f["z_row"].double(), upper=False)
        g_col = torch.linalg.solve_triangular(f["chol_col"], f["z_col"].double(), upper=False)
        mr, mc = g_row.shape[-2], g_col.shape[-2]
        c = torch.einsum("lij,lkm->likjm", g_row @ g_row.mT, g_col @ g_col.mT).flatten(-4, -3).flatten(-2)
        chol = torch.linalg.cholesky(torch.eye(c.shape[-1], dtype=c.dtype, device=c.device) - c)

        def apply(x):
            y = (g_row @ x @ g_col.mT).flatten(-2)[..., None]
            v = torch.cholesky_solve(y, chol.expand(*y.shape[:-2], *chol.shape[-2:]))
            return x + g_row.mT @ v.reshape(*y.shape[:-2], mr, mc) @ g_col

        return apply, g_row, g_col

    def _offset(self, u0, f):
        """``delta = W_map - T_r U_0 T_c``, the mean of ``q(W | U)`` less that of ``p(W | U)`` (whatever ``U``), float64."""
        return (self.loc - f["t_row"] @ u0 @ f["t_col"]).double()

    def kl_conditional(self, u0, f):
        """``KL(q(W|U) || p(W|U)) = 1/2 [mn (lambda^2 - 1 - log lambda^2) + maha_Sigma(delta)]`` per layer ``[L]``, with
        ``delta`` :meth:`_offset`: the mean of :meth:`log_ratio_conditional` over ``q(W | U)``."""
        m, n = self.loc.shape[-2:]
        delta = self._offset(u0, f)
        maha = (delta * self._precision(f)[0](delta)).sum((-2, -1)) / self.sigma**2
        lam, log_lam = f["lam"], f["log_lam"]
        return 0.5 * (m * n * (lam.pow(2) - 1 - 2 * log_lam) + maha.to(lam.dtype))

    def log_ratio_conditional(self, u0, f, noise):
        """``log q(W | U) - log p(W | U)`` at the draw ``W`` of ``noise`` (:meth:`draw`, any ``U``), per layer ``[*S, L]``:
        ``-mn log lambda - 1/2 (1 - lambda^2) maha_Sigma(eps) + lambda delta' Sigma^-1 eps + 1/2 maha_Sigma(delta)``, with
        ``eps = W~ - T_r U~ T_c ~ N(0, Sigma)`` the draw's residual (``W = E_q[W | U] + lambda eps``) and ``delta``
        :meth:`_offset`. The exact per-draw log-ratio an importance weight needs; :meth:`kl_conditional` is its mean.
        ``eps`` is rebuilt in float64 from the noise, ``sigma (E - G_r^T chol_r^-1 (U~ / sigma) chol_c^-T G_c)``, not
        from the float32 draw: ``Sigma^-1`` magnifies its rounding where ``K`` is near-singular."""
        m, n = self.loc.shape[-2:]
        noise = tuple(x.double() for x in noise)
        zr, zc, dr, dc = (f[k].double() for k in ("z_row", "z_col", "d_row", "d_col"))
        a = torch.linalg.solve_triangular(f["chol_row"], _u_block(noise, zr, zc, dr, dc), upper=False)
        a = torch.linalg.solve_triangular(f["chol_col"], a.mT, upper=False).mT  # chol_r^-1 (U~ / sigma) chol_c^-T
        precision, g_row, g_col = self._precision(f)
        eps = noise[0] - g_row.mT @ a @ g_col  # eps / sigma
        scaled = precision(eps)  # sigma Sigma^-1 eps
        delta = self._offset(u0, f)
        maha_eps = (eps * scaled).sum((-2, -1))
        cross = (delta * scaled).sum((-2, -1)) / self.sigma
        maha_delta = (delta * precision(delta)).sum((-2, -1)) / self.sigma**2
        lam, log_lam = f["lam"].double(), f["log_lam"].double()
        out = -m * n * log_lam - 0.5 * (1 - lam.pow(2)) * maha_eps + lam * cross + 0.5 * maha_delta
        return out.to(f["lam"].dtype)


class BatchedAffineAutoregressive(TransformModule):
    r"""
    Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive` (inverse-autoregressive direction:
    ``y = mu(x) + exp(log_sigma(x)) * x``, ``log|det J| = sum log_sigma``), batched over ``L`` stacked layers,
    each with its own one-hidden-layer MADE, applied to every row of a ``[..., L, R, D]`` input (``transpose``:
    to every column). Starts as the identity (zero output layer). Sampling and the log-density of its own
    samples cost one MADE pass (cached); inverting a foreign value costs ``D`` passes.

    :param int layers: ``L``. :param int dim: ``D``, the autoregressive width. :param int hidden: MADE width (``3 D + 1``).
    """

    domain = constraints.independent(constraints.real, 2)
    codomain = constraints.independent(constraints.real, 2)
    bijective = True
    sign = +1

    def __init__(self, layers, dim, hidden=None, transpose=False, log_scale_min_clip=-5.0, log_scale_max_clip=3.0):
        super().__init__(cache_size=1)
        hidden = hidden or 3 * dim + 1
        self.dim, self.transpose = dim, transpose
        self.log_scale_min_clip, self.log_scale_max_clip = log_scale_min_clip, log_scale_max_clip
        bound = 1 / math.sqrt(dim)
        self.w1 = torch.nn.Parameter(torch.empty(layers, hidden, dim).uniform_(-bound, bound))
        self.b1 = torch.nn.Parameter(torch.zeros(layers, hidden))
        self.w2 = torch.nn.Parameter(torch.zeros(layers, 2 * dim, hidden))
        self.b2 = torch.nn.Parameter(torch.zeros(layers, 2 * dim))
        # MADE degrees: inputs 1..D, hidden 1..D-1 cyclically; output d sees inputs < d only
        deg_in = torch.arange(1, dim + 1)
        deg_hidden = torch.arange(hidden) % max(1, dim - 1) + 1
        self.register_buffer("mask1", (deg_hidden[:, None] >= deg_in[None, :]).float(), persistent=False)
        self.register_buffer("mask2", (deg_in.repeat(2)[:, None] > deg_hidden[None, :]).float(), persistent=False)
        self._cached_log_scale = None

    def made(self, x):
        """``x: [..., L, R, D]`` -> ``(mu, log_sigma)``, each ``[..., L, R, D]``, output ``d`` depending on ``x_{<d}``."""
        h = torch.relu(torch.einsum("...lrd,lhd->...lrh", x, self.w1 * self.mask1) + self.b1[:, None, :])
        out = torch.einsum("...lrh,loh->...lro", h, self.w2 * self.mask2) + self.b2[:, None, :]
        mu, log_scale = out.split(self.dim, -1)
        return mu, clamp_preserve_gradients(log_scale, self.log_scale_min_clip, self.log_scale_max_clip)

    def image(self, x):
        """``y = mu(x) + exp(log_sigma(x)) x`` and ``log_sigma``, touching no cache."""
        x = x.mT if self.transpose else x
        mu, log_scale = self.made(x)
        y = mu + log_scale.exp() * x
        return (y.mT if self.transpose else y), log_scale

    def clear_cache(self):
        """Forget the last ``(x, y)`` pair and its log-scales."""
        self._cached_x_y, self._cached_log_scale = (None, None), None

    def _call(self, x):
        y, self._cached_log_scale = self.image(x)
        return y

    def _inverse(self, y):
        y = y.mT if self.transpose else y
        x = torch.zeros_like(y)
        for d in range(self.dim):  # x_d needs x_{<d}: D sequential MADE passes
            mu, log_scale = self.made(x)
            x = x.clone()
            x[..., d] = (y[..., d] - mu[..., d]) * torch.exp(-log_scale[..., d])
        self._cached_log_scale = log_scale
        return x.mT if self.transpose else x

    def __getstate__(self):
        # the caches hold tensors of the last forward's graph, which deepcopy (a variant's copy of its base's fit)
        # and pickling refuse: a copy starts with empty ones, as after __init__
        state = super().__getstate__()
        state["_cached_x_y"], state["_cached_log_scale"] = (None, None), None
        return state

    def log_abs_det_jacobian(self, x, y):
        x_old, y_old = self._cached_x_y
        if x is not x_old or y is not y_old:
            self(x)  # refreshes the cache and the log-scales
        return self._cached_log_scale.sum((-2, -1))


def _u_block(noise, zr, zc, dr, dc):
    """``U~ / sigma = Z_r E Z_c^T + Z_r E12 D_c + D_r E21 Z_c^T + D_r E22 D_c``: the U block of the augmented draw of
    ``noise`` (:meth:`_Inducing.prior_noise`)."""
    eps, e12, e21, e22 = noise
    return (zr @ eps + dr[..., None] * e21) @ zc.mT + (zr @ e12 + dr[..., None] * e22) * dc[..., None, :]


def _basis(x, size, shared=False):
    """``[L, size, dim]`` unit rows (``[size, dim]`` if ``shared``): the top right-singular directions of
    ``x: [L, k, dim]`` (of all ``L * k`` vectors at once if ``shared``), completed by random orthonormal ones while
    ``dim`` allows, then by random unit rows."""
    if shared:
        return _basis(x.reshape(1, -1, x.shape[-1]), size)[0]
    dim = x.shape[-1]
    top = torch.linalg.svd(x, full_matrices=False).Vh[..., : min(size, dim), :]
    rand = torch.randn(*x.shape[:-2], size, dim, dtype=x.dtype, device=x.device)
    q = torch.linalg.qr(torch.cat([top, rand], -2).mT).Q.mT[..., : min(size, dim), :]  # keeps span(top) first
    extra = rand[..., : size - q.shape[-2], :]
    return torch.cat([q, extra / extra.norm(dim=-1, keepdim=True)], -2)


def _small_factor(z):
    """A factor ``F`` with ``F F^T = Z Z^T`` and at most ``M`` columns (``Z: [..., M, dim]``)."""
    if z.shape[-1] <= z.shape[-2]:
        return z
    return torch.linalg.qr(z.mT).R.mT


def _softplus_inv(y):
    y = torch.as_tensor(y, dtype=torch.float32)
    return y + torch.log(-torch.expm1(-y))  # inverse of softplus, stable for small y


@method("flow", bayesian=True, guide=FlowGuide, exportable=True, trains=True)
def flow(setup):
    """Bayesian-LoRA: inducing matrices with a MAF posterior over A and B, fitted post hoc around the MAP.

    ``W_map`` fixed, as for mean-field; ``q(U)`` starts at 0.1 of the prior std (from the guide's default 0.01 it
    stays too narrow to move the MAP's calibration) (Yang et al., 2024, "Bayesian-LoRA").
    """
    model = setup.lora_model(random="AB", prior=POST_HOC_PRIOR)
    guide = FlowGuide(model, init_scale=0.1, std_lr_scale=setup.std_lr_scale(), learn_loc=False)
    return post_hoc_note(setup, setup.svi(model, guide, train_network=False))


@method("flow_val", bayesian=True, guide=FlowGuide, exportable=True, validation=True, base="flow", tempered=True)
def flow_val(setup):
    """Bayesian-LoRA with a posterior temperature chosen by validation NLL (every draw's deviation from the MAP
    times sqrt(T)), as ``meanfield_val`` tempers mean-field."""
    return tempered_fit(setup)
