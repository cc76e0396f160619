"""Post-hoc Laplace approximation over the LoRA matrices with Kronecker-factored (KFAC) curvature.

Around a trained adapter ``theta*`` (the MAP), each LoRA matrix ``W`` gets the Gaussian
``N(theta*, (F + lambda I)^-1)`` where ``F`` is the Fisher (= GGN for softmax cross-entropy) of the
training data restricted to ``W``, approximated by KFAC: ``F ~ G (x) Lambda``, the second moments of the
matrix's output gradients and input activations. Written in the canonical orientation ``W: [r, D]``
(``A`` as it is, ``B`` transposed), one factor is ``r x r`` (kept dense) and the other ``D x D``
(``d_in`` for ``A``, ``d_out`` for ``B``), kept as ``U diag(s) U^T + sigma (I - U U^T)``: rank ``k``
from a streaming Nystrom sketch plus the remaining trace spread evenly over the complement, so the
posterior keeps an exact Kronecker eigenbasis and memory does not grow with the data.

The activations and gradients come from forward hooks on the peft LoRA layers while the network runs
at ``theta*`` through the core's weight hand-off: the layer input ``x`` and the gradient ``g`` of its
output ``y = W0 x + s B A x`` give everything, ``dL/dA = s B^T g x^T`` and ``dL/dB = s g (A x)^T``.
"""

import math
import time
import warnings

import torch
from pyro.distributions import TorchDistribution, constraints
from tqdm.auto import tqdm

from pyro_lora import distributed
from pyro_lora.metrics import nll
from pyro_lora.predictive import Prediction, _positive_int, predict
from pyro_lora.sites import per_layer
from pyro_lora.training import to_device

from .base import LoraGuide

_LOG_LAMBDA_RANGE = (-25.0, 25.0)  # prior precision search bounds, log scale (exp(25) ~ 7e10)
# A matrix whose largest Fisher eigenvalue is below float32 resolution of the largest of all matrices' has no
# curvature that the data can be said to give it (exactly zero for A while its B is zero)
_FLAT_CURVATURE = torch.finfo(torch.float32).eps
# Per-layer evidence: a matrix whose data determine fewer than this many of its parameters at the floor (MacKay's
# effective number gamma = sum_i g_i / (g_i + lambda)) has its lambda held at gamma_min / |theta*|^2 (see
# LaplaceGuide.uninformed_matrices)
_MIN_EFFECTIVE_PARAMETERS = 0.1


class KFACNormal(TorchDistribution):
    r"""
    Gaussian over a (stacked) LoRA site with Kronecker-factored precision, per layer ``l``:
    ``P_l = E_l (x) Lambda_l + lambda_l I`` in the canonical row-major orientation ``W: [r, D]``, with
    ``E = V diag(e) V^T`` (``r x r``) and ``Lambda = U diag(s) U^T + sigma (I - U U^T)`` (``U: [D, k]``).
    Its eigenvectors are ``v_i (x) u_j`` (eigenvalue ``e_i s_j + lambda``) and ``v_i (x) w`` for ``w``
    orthogonal to ``U`` (``e_i sigma + lambda``), so sampling, ``log_prob`` and the variance cost
    ``O(r D k)`` per layer; no ``rD x rD`` matrix is formed.

    :param loc: mean, the site's shape ``[L, rows, cols]`` (or ``[rows, cols]``).
    :param small_vecs: ``V``, ``[L, r, r]``; ``small_vals``: ``e >= 0``, ``[L, r]``.
    :param large_vecs: ``U`` with orthonormal columns, ``[L, D, k]``; ``large_vals``: ``s >= 0``,
        ``[L, k]``; ``large_rest``: ``sigma >= 0``, ``[L]``.
    :param prior_precision: ``lambda > 0``, ``[L]``.
    :param bool transposed: the site holds ``W^T`` (LoRA ``B``: ``[L, D, r]``).
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc, small_vecs, small_vals, large_vecs, large_vals, large_rest, prior_precision, transposed):
        self.loc = loc
        self.small_vecs, self.small_vals = small_vecs, small_vals
        self.large_vecs, self.large_vals, self.large_rest = large_vecs, large_vals, large_rest
        self.prior_precision = prior_precision
        self.transposed = transposed
        super().__init__(torch.Size(), loc.shape, validate_args=False)

    def _canonical(self, x):
        """``[*S, *event]`` -> ``[*S, L, r, D]``."""
        x = x if len(self.event_shape) == 3 else x.unsqueeze(-3)
        return x.transpose(-1, -2) if self.transposed else x

    def _site(self, x):
        x = x.transpose(-1, -2) if self.transposed else x
        return x if len(self.event_shape) == 3 else x.squeeze(-3)

    def _eigenvalues(self):
        """Precision eigenvalues: ``[L, r, k]`` on ``v_i (x) u_j`` and ``[L, r]`` on the complement."""
        lam = self.prior_precision
        top = self.small_vals.unsqueeze(-1) * self.large_vals.unsqueeze(-2) + lam[:, None, None]
        rest = self.small_vals * self.large_rest.unsqueeze(-1) + lam[:, None]
        return top, rest

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        top, rest = self._eigenvalues()
        u2 = self.large_vecs.pow(2)  # [L, D, k]
        # Var W_ad = sum_i V_ai^2 (sum_j U_dj^2 / top_ij + (1 - |U_d|^2) / rest_i)
        per_i = (u2 @ top.reciprocal().mT).mT + (1 - u2.sum(-1)).unsqueeze(-2) / rest.unsqueeze(-1)  # [L, r, D]
        return self._site(self.small_vecs.pow(2) @ per_i)

    def rsample(self, sample_shape=torch.Size()):
        top, rest = self._eigenvalues()
        L, r, D = self.large_vecs.shape[0], self.small_vecs.shape[-1], self.large_vecs.shape[-2]
        shape = torch.Size(sample_shape)
        z1 = torch.randn(shape + top.shape, device=top.device, dtype=top.dtype)
        z2 = torch.randn(shape + (L, r, D), device=top.device, dtype=top.dtype)
        u = self.large_vecs
        # W = V [(z1 / sqrt(top)) U^T + diag(rest^-1/2) z2 (I - U U^T)]
        inner = (z1 * top.rsqrt()) @ u.mT + rest.rsqrt().unsqueeze(-1) * (z2 - (z2 @ u) @ u.mT)
        return self.loc + self._site(self.small_vecs @ inner)

    def log_prob(self, value):
        top, rest = self._eigenvalues()
        D, k = self.large_vecs.shape[-2:]
        m = self.small_vecs.mT @ self._canonical(value - self.loc)  # V^T dW: [*S, L, r, D]
        t = m @ self.large_vecs  # [*S, L, r, k]
        t2 = t.pow(2)
        quad = (t2 * top).sum((-1, -2)) + ((m.pow(2).sum(-1) - t2.sum(-1)) * rest).sum(-1)
        logdet = top.log().sum((-1, -2)) + (D - k) * rest.log().sum(-1)
        n = top.shape[-2] * D
        return (-0.5 * (quad - logdet + n * math.log(2 * math.pi))).sum(-1)


class _SiteFactors(torch.nn.Module):
    """Buffers of one site's posterior: its mean, the two Kronecker factors' eigendecompositions, ``lambda``."""

    def __init__(self, site, rank, prior_precision):
        super().__init__()
        self.matrix = site.matrix
        self.transposed = site.matrix == "B"
        layers = site.shape[0] if site.stacked else 1
        rows, cols = site.shape[-2:]
        r, d = (cols, rows) if self.transposed else (rows, cols)
        k = min(rank, d)
        self.register_buffer("loc", torch.zeros(site.shape))
        self.register_buffer("small_vecs", torch.eye(r).expand(layers, r, r).clone())
        self.register_buffer("small_vals", torch.zeros(layers, r))
        self.register_buffer("large_vecs", torch.zeros(layers, d, k))
        self.register_buffer("large_vals", torch.zeros(layers, k))
        self.register_buffer("large_rest", torch.zeros(layers))
        self.register_buffer("prior_precision", torch.as_tensor(prior_precision, dtype=torch.float).expand(layers).clone())

    def distribution(self, prior_precision=None):
        lam = self.prior_precision if prior_precision is None else prior_precision
        return KFACNormal(
            self.loc, self.small_vecs, self.small_vals, self.large_vecs, self.large_vals, self.large_rest, lam, self.transposed
        )

    def eigenvalues(self):
        """Fisher eigenvalues (without ``lambda``): ``[L, r*k]`` each once, ``[L, r]`` each ``D - k`` times."""
        top = (self.small_vals.unsqueeze(-1) * self.large_vals.unsqueeze(-2)).flatten(1)
        return top, self.small_vals * self.large_rest.unsqueeze(-1), self.large_vecs.shape[-2] - self.large_vecs.shape[-1]

    def extra_numbers(self):
        return sum(b.numel() for n, b in self.named_buffers() if n != "loc")


class _Accumulator:
    """Running KFAC sums of one site: dense ``sum s s^T`` (``r x r``), and for the ``D`` side a Nystrom
    sketch ``Y = (sum l l^T) Omega`` plus its exact trace. ``Y`` is linear in the data, so streaming is exact.
    """

    def __init__(self, factors, sketch, generator):
        layers, r, _ = factors.small_vecs.shape
        d = factors.large_vecs.shape[-2]
        dev = factors.loc.device
        self.small = torch.zeros(layers, r, r, device=dev)
        gauss = torch.randn(d, min(d, sketch), generator=generator, device=dev)
        self.omega = torch.linalg.qr(gauss).Q  # [D, l], orthonormal columns
        self.sketch = torch.zeros(layers, d, self.omega.shape[-1], device=dev)
        self.trace = torch.zeros(layers, device=dev)
        self.count = 0

    def update(self, small, large, count):
        """``small: [L, m, r]``, ``large: [L, m', D]`` vectors; ``count`` activation vectors seen."""
        self.small += small.mT @ small
        self.sketch += large.mT @ (large @ self.omega)
        self.trace += large.pow(2).sum((-1, -2))
        self.count += count

    def finish(self, factors):
        """Normalise the activation side to a mean, eigendecompose both factors into ``factors``."""
        if self.count == 0:
            raise ValueError("fit got no data: the loader is empty")
        small, sketch, trace = self.small, self.sketch, self.trace
        if factors.transposed:  # B: the r x r side holds the activations A x
            small = small / self.count
        else:  # A: the D side holds the layer inputs x
            sketch, trace = sketch / self.count, trace / self.count
        e, v = torch.linalg.eigh(small.double())
        vals, vecs = _nystrom(sketch, self.omega, factors.large_vecs.shape[-1])
        d, k = vecs.shape[-2:]
        rest = (trace.double() - vals.sum(-1)).clamp(min=0) / (d - k) if d > k else torch.zeros_like(trace, dtype=torch.double)
        factors.small_vals.copy_(e.clamp(min=0))
        factors.small_vecs.copy_(v)
        factors.large_vals.copy_(vals)
        factors.large_vecs.copy_(vecs)
        factors.large_rest.copy_(rest)


def _nystrom(sketch, omega, k):
    """Top-``k`` eigenpairs of the Nystrom approximation ``Y (Omega^T Y)^+ Y^T`` of a PSD matrix ``K``
    from ``Y = K Omega`` (Tropp et al. 2017, stabilised by a shift ``nu``): ``[L, k]``, ``[L, D, k]``.
    The approximation is ``<= K``, so the trace remainder stays non-negative.
    """
    y = sketch.double()
    om = omega.double()
    nu = 1e-6 * y.flatten(1).norm(dim=-1).clamp(min=1e-30)[:, None, None]  # above fp32 accumulation noise
    y = y + nu * om
    w, q = torch.linalg.eigh(om.mT @ y)
    w = w.clamp(min=0)
    keep = w > 1e-12 * w.amax(-1, keepdim=True)
    f = y @ (q * torch.where(keep, w.clamp(min=1e-300).rsqrt(), torch.zeros_like(w)).unsqueeze(-2))
    u, s, _ = torch.linalg.svd(f, full_matrices=False)
    vals = (s.pow(2) - nu[..., 0]).clamp(min=0)
    return vals[:, :k], u[:, :, :k]  # SVD orders singular values descending


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
    :param prior_precision: ``lambda``: a float, or a dict site -> float or a list of one per layer.
    :param str kfac: how token positions enter: ``"reduce"`` (per sequence: mean of the activations,
        sum of the gradients over its tokens; right for one label per sequence) or ``"expand"`` (every
        token a separate term, activations averaged over tokens).
    :param int sketch: Nystrom sketch width for the ``D`` side (default ``2 k + 10``).
    """

    def __init__(self, model, fisher="mc", rank=10, prior_precision=1.0, kfac="reduce", sketch=None):
        super().__init__(model)
        if fisher not in ("mc", "exact"):
            raise ValueError(f"fisher must be 'mc' or 'exact', got {fisher!r}")
        if kfac not in ("reduce", "expand"):
            raise ValueError(f"kfac must be 'reduce' or 'expand', got {kfac!r}")
        rank = _positive_int(rank, "rank")
        if sketch is not None:
            sketch = _positive_int(sketch, "sketch", f"at least rank = {rank}")
            if sketch < rank:
                raise ValueError(f"sketch must be an int >= rank ({rank}), got {sketch!r}")
        if model.likelihood.event_dims != 0:
            raise ValueError(
                f"LaplaceGuide needs class-level logits [B, C]; {type(model.likelihood).__name__} scores tokens"
            )
        bad = [n for n, s in self.sites.items() if s.matrix not in ("A", "B")]
        if bad:
            raise ValueError(f"LaplaceGuide covers LoRA A and B matrices; site(s) {bad} are LoRA-XS cores")
        self.fisher, self.rank, self.kfac, self.sketch = fisher, rank, kfac, sketch
        self._prior_config = _json_precision(prior_precision, self.sites)
        device = model.device
        self.factors = torch.nn.ModuleList(
            _SiteFactors(site, rank, _site_precision(self._prior_config, name, site)) for name, site in self.sites.items()
        ).to(device)
        self.register_buffer("log_likelihood", torch.zeros((), device=device))
        self.register_buffer("num_data", torch.zeros((), device=device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))

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
            v = torch.as_tensor(value[name] if isinstance(value, dict) else value, dtype=torch.float, device=f.loc.device)
            if v.numel() not in (1, f.prior_precision.numel()) or not bool((v > 0).all()):
                raise ValueError(f"prior precision of site {name!r} must be positive: 1 or {f.prior_precision.numel()} values")
            new[name] = v.reshape(-1).expand_as(f.prior_precision)
        for name, f in zip(self.sites, self.factors):  # all checked first: a bad value changes nothing
            if name in new:
                f.prior_precision.copy_(new[name])

    # ------------------------------------------------------------------ fitting

    def fit(self, data, progress=True):
        """Accumulate the KFAC factors over ``data`` at the model's current adapter ``theta*``.

        Per batch: one forward at ``theta*`` with hooks on every LoRA layer, then one backward to the LoRA
        layers' outputs (``C - 1`` for ``fisher="exact"``); the factor sums are batched over layers. Also
        records ``log p(D | theta*)`` and ``N`` (labelled examples) for the evidence.

        :param data: iterable of labelled batches (dicts of tensors).
        :returns: ``self``.

        Under ``torch.distributed`` every rank is given the same ``data`` and runs its block of batches;
        the sums (``r x r`` sides, the ``D``-side sketches over the same ``Omega``, traces, ``N``, the
        log-likelihood) are linear in the data, so one ``all_reduce`` makes every rank's factors those of
        one process (with ``fisher="mc"`` the sampled labels differ, as with any other seed).
        """
        _check_one_forward(self.model)
        model = self.model
        loc = {name: v.float() for name, v in model.adapter_values().items()}
        gen = torch.Generator(device=model.device).manual_seed(0)
        acc = [_Accumulator(f, self.sketch or 2 * self.rank + 10, gen) for f in self.factors]
        loglik = torch.zeros((), device=model.device, dtype=torch.double)
        count = 0
        bar = tqdm(distributed.split_batches(data), desc="KFAC", disable=not (progress and distributed.is_main()), dynamic_ncols=True)
        with _eval(model.net):
            weights = self._layer_weights(loc)
            for batch in bar:
                batch = to_device(batch, model.device)
                labels = model.likelihood.observed(batch)
                logits, inputs, outputs = self._forward(batch, loc)
                loglik += model.likelihood.distribution(logits.detach()).log_prob(labels).double().sum()
                count += labels.shape[0]
                grads = _output_grads(logits, outputs, self._fisher_vectors(logits.detach()))
                with torch.no_grad():  # the recorded inputs of later layers still require grad
                    for stacked in self._stacked(inputs, grads, batch):
                        x, g, n = self._reduce(*stacked[1:])
                        for i in stacked[0]:
                            acc[i].update(*self._kfac_vectors(i, x, g, weights[i]), n)
        counts = torch.tensor([a.count for a in acc] + [count], dtype=torch.double, device=model.device)
        distributed.all_reduce_([t for a in acc for t in (a.small, a.sketch, a.trace)] + [loglik, counts])
        for a, c in zip(acc, counts.tolist()):
            a.count = int(c)
        count = int(counts[-1])
        with torch.no_grad():
            for f, a, name in zip(self.factors, acc, self.sites):
                f.loc.copy_(loc[name])
                a.finish(f)
            self.log_likelihood.fill_(loglik.item())
            self.num_data.fill_(count)
            self.fitted.fill_(True)
        return self

    def _fisher_vectors(self, logits):
        """Backward vectors ``v [K, B, C]``: the gradient ``p - e_y`` of ``-log p_y`` for one ``y ~ p`` (MC,
        ``K = 1``), or ``K = C - 1`` vectors with ``sum_k v_k v_k^T = diag(p) - p p^T = E_y[(p - e_y)(p - e_y)^T]``.
        """
        p = torch.softmax(logits.float(), -1)
        if self.fisher == "mc":
            y = torch.distributions.Categorical(probs=p).sample()
            return (p - torch.eye(p.shape[-1], device=p.device)[y]).unsqueeze(0)
        # the logit Fisher has rank C - 1 (constant shifts leave softmax unchanged): C - 1 backward passes
        p = p.double()
        w, q = torch.linalg.eigh(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))
        return (q[..., 1:] * w[..., 1:].clamp(min=0).sqrt().unsqueeze(-2)).permute(2, 0, 1).float()

    def _forward(self, batch, loc):
        """Logits at ``loc`` and, per LoRA layer, its input and (grad-requiring) output."""
        inputs, outputs = {}, {}

        def hook(path):
            def record(module, args, out):
                if not out.requires_grad:  # frozen backbone: make the output a leaf we can differentiate to
                    out.requires_grad_()
                inputs[path], outputs[path] = args[0], out

            return record

        handles = [layer.register_forward_hook(hook(path)) for path, layer in self.model.layers.items()]
        try:
            with torch.enable_grad():
                logits = self.model.logits(batch, loc)
        finally:
            for h in handles:
                h.remove()
        return logits.float(), inputs, outputs

    def _layer_weights(self, loc):
        """Per site: the other LoRA matrix of its layers (``[L, d_out, r]`` for A, ``[L, r, d_in]`` for B) and the
        scaling ``s`` (``[L, 1, 1]``)."""
        model = self.model
        values = per_layer(self.sites, loc)
        out = []
        for site in self.sites.values():
            other = "B" if site.matrix == "A" else "A"
            mats, scales = [], []
            for path in site.layers:
                layer = model.layers[path]
                own = (layer.lora_B if other == "B" else layer.lora_A)[model.adapter].weight
                mats.append(values[path].get(other, own).detach().float())
                scales.append(float(layer.scaling[model.adapter]))
            out.append((torch.stack(mats), torch.tensor(scales, device=model.device)[:, None, None]))
        return out

    def _stacked(self, inputs, grads, batch):
        """Group sites by their layers; yield (site indices, x ``[L, N, T, d_in]``, g ``[K, L, N, T, d_out]``,
        mask ``[N, T]`` or None)."""
        groups = {}
        for i, site in enumerate(self.sites.values()):
            groups.setdefault(site.layers, []).append(i)
        for layers, idx in groups.items():
            shapes = {tuple(inputs[p].shape) for p in layers}
            if len(shapes) > 1:
                raise ValueError(
                    f"the LoRA layers of site {list(self.sites)[idx[0]]!r} see inputs of different shapes {sorted(shapes)} "
                    f"(e.g. BERT's pooler beside its token layers: {list(layers)}): KFAC stacks a site's layers; build the "
                    "model with group='matrix', or leave those layers out of target_modules"
                )
            x = torch.stack([inputs[p] for p in layers]).float()
            g = torch.stack([grads[p] for p in layers], 1).float()
            if x.dim() == 3:  # [L, N, d]: no token dim
                x, g = x.unsqueeze(-2), g.unsqueeze(-2)
            mask = batch.get("attention_mask")
            mask = mask.to(x.dtype) if mask is not None and tuple(mask.shape) == tuple(x.shape[1:3]) else None
            yield idx, x, g, mask

    def _reduce(self, x, g, mask):
        """Token positions -> KFAC terms: x ``[L, n, d_in]``, g ``[K, L, n, d_out]``, and ``n`` activation vectors."""
        if self.kfac == "reduce":
            if mask is None:
                x, g = x.mean(-2), g.sum(-2)
            else:
                w = mask.unsqueeze(-1)
                x = (x * w).sum(-2) / w.sum(-2).clamp(min=1)
                g = (g * w).sum(-2)
        elif mask is None:
            x, g = x.flatten(1, 2), g.flatten(2, 3)
        else:
            keep = mask.bool()
            x, g = x[:, keep], g[:, :, keep]
        return x, g, x.shape[1]

    def _kfac_vectors(self, i, x, g, weights):
        """Canonical ``[r, D]`` vectors of site ``i``: small ``[L, m, r]``, large ``[L, m', D]``.

        A: small = ``s B^T g`` (gradient w.r.t. ``A x``), large = ``x``; B^T: small = ``A x``, large = ``s g``.
        """
        other, scale = weights
        if self.factors[i].matrix == "A":
            small = (g @ other) * scale  # [K, L, n, r]
            return small.transpose(0, 1).flatten(1, 2), x
        return x @ other.mT, (g * scale).transpose(0, 1).flatten(1, 2)

    # ------------------------------------------------------------------ posterior

    def _check_fitted(self):
        if not bool(self.fitted):
            raise ValueError("LaplaceGuide has no posterior yet: call fit(train_loader) first (or load a fitted guide)")

    def posterior(self):
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
        peaks = []
        for f in self.factors:
            top, rest, mult = f.eigenvalues()
            peak = top.amax(-1)
            peaks.append(torch.maximum(peak, rest.amax(-1)) if mult > 0 else peak)
        peaks = torch.cat(peaks).double()
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
        |theta*|`` and goes to 0 with it: an ``A`` whose ``B`` is a few steps from peft's zero init got a prior std
        of 61, which swamps a sampled predictive. A matrix is flagged when ``gamma < gamma_min`` at
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
        lam = log_lam.exp()
        vals, d1, d2 = [], [], []
        start = 0
        for f in self.factors:
            top, rest, mult = f.eigenvalues()
            lf = lam[start : start + top.shape[0]]
            start += top.shape[0]
            top, rest = top.double(), rest.double()
            p = f.loc[0].numel() if f.loc.dim() == 3 else f.loc.numel()
            sq = f.loc.double().pow(2).flatten(-2).sum(-1).reshape(-1)
            a, b = top + lf[:, None], rest + lf[:, None]
            logdet = a.log().sum(-1) + mult * b.log().sum(-1)
            s1 = a.reciprocal().sum(-1) + mult * b.reciprocal().sum(-1)
            s2 = a.pow(-2).sum(-1) + mult * b.pow(-2).sum(-1)
            vals.append(-0.5 * (logdet - p * lf.log() + lf * sq))
            g = -0.5 * (s1 - p / lf + sq)  # d/d lambda
            h = -0.5 * (p / lf.pow(2) - s2)  # d2/d lambda2
            d1.append(lf * g)
            d2.append(lf.pow(2) * h + lf * g)
        flat = self.flat_matrices()
        return tuple(torch.cat(x).masked_fill(flat, 0.0) for x in (vals, d1, d2))

    def optimize_prior_precision(self, method="marglik", per_layer=False, val_loader=None, grid=None, predictive="glm",
                                 num_samples=8, max_iter=100, progress=False,
                                 min_effective_parameters=_MIN_EFFECTIVE_PARAMETERS):
        """Choose ``lambda``.

        ``"marglik"``: maximise :meth:`log_marginal_likelihood` in ``log lambda`` by safeguarded Newton steps
        with backtracking, so the evidence never decreases; it is concave in ``lambda``, so the optimum is
        unique. ``per_layer=True`` gives every LoRA matrix (each layer of each site) its own ``lambda``.
        Matrices with zero curvature (:meth:`flat_matrices`) leave the evidence unchanged whatever their
        ``lambda`` (Laplace's formula alone drives it towards 0, a posterior std in the hundreds): a warning
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
        ``predictive="samples"``, the sampled predictive with ``num_samples`` (common random numbers).

        When the lowest NLL is at the grid's smallest or largest value, the optimum may lie beyond the grid: a
        warning names that edge and asks for a wider grid (the edge value is still set).

        :param grid: ``lambda`` values for ``"val_nll"`` (default ``logspace(-4, 4, 17)``), finite and positive.
        :param int num_samples: weight samples per ``lambda`` for ``predictive="samples"`` (a positive integer).
        :param int max_iter: at most this many Newton iterations for ``"marglik"`` (a positive integer).
        :param float min_effective_parameters: ``gamma_min`` of the per-layer bound (0: none).
        :returns: the trace: evidence per Newton iteration, or NLL per grid value.
        :raises ValueError: before :meth:`fit`, on an unknown ``method`` or ``predictive``, ``"val_nll"`` without
            ``val_loader`` or with ``per_layer=True``, a grid value that is not finite and positive (0, negative,
            inf, nan), a ``num_samples`` or ``max_iter`` that is not a positive integer, or a grid NLL that is nan.
        """
        self._check_fitted()
        num_samples = _positive_int(num_samples, "num_samples")
        max_iter = _positive_int(max_iter, "max_iter")
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
                    stacklevel=2,
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
                        stacklevel=2,
                    )
            return self._optimize_marglik(per_layer, max_iter, floor)
        if method != "val_nll":
            raise ValueError(f"method must be 'marglik' or 'val_nll', got {method!r}")
        if val_loader is None:
            raise ValueError("method='val_nll' needs val_loader")
        if per_layer:
            raise ValueError("method='val_nll' searches one lambda for all layers: use per_layer=False")
        if predictive not in ("glm", "samples"):
            raise ValueError(f"predictive must be 'glm' or 'samples', got {predictive!r}")
        grid = torch.logspace(-4, 4, 17) if grid is None else torch.as_tensor(grid, dtype=torch.float).reshape(-1)
        if grid.numel() == 0 or not bool((torch.isfinite(grid) & (grid > 0)).all()):
            raise ValueError(
                f"grid must hold finite positive prior precisions (float32), got {grid.tolist()}"
            )
        if predictive == "glm":
            nlls = self._grid_nll_glm(val_loader, grid.to(self.num_data.device), progress)
        else:
            nlls = self._grid_nll_samples(val_loader, grid, num_samples, progress)
        values = torch.tensor(nlls, dtype=torch.double)
        if bool(values.isnan().any()):
            bad = [g for g, v in zip(grid.tolist(), nlls) if math.isnan(v)]
            raise ValueError(f"the validation NLL is nan at lambda = {', '.join(f'{g:g}' for g in bad)}: no lambda was set")
        best = float(grid[int(values.argmin())])
        low, high = float(grid.min()), float(grid.max())
        if low < high and best in (low, high):
            side, beyond = ("smallest", f"below {low:g} (a wider posterior)") if best == low else \
                ("largest", f"above {high:g} (a narrower posterior, towards the MAP)")
            warnings.warn(
                f"LaplaceGuide val_nll: the validation NLL is lowest at the {side} grid value lambda = {best:g} (grid "
                f"{low:g} to {high:g}): the optimum may lie beyond the grid; lambda = {best:g} is set, but extend the "
                f"grid {beyond} to find it",
                stacklevel=2,
            )
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
        t = t.clamp(low, high)
        value, grad, hess = terms(t)
        history = [float(self.log_likelihood + value.sum())]
        for _ in range(max_iter):
            # Newton where concave in t, else a unit step uphill; at most 3 e-folds per iteration
            step = torch.where(hess < 0, -grad / hess.clamp(max=-1e-30), grad.sign()).clamp(-3, 3)
            step = torch.where(((t <= low) & (step < 0)) | ((t >= high) & (step > 0)), torch.zeros_like(step), step)
            for _ in range(40):  # backtracking, per matrix
                candidate = (t + step).clamp(low, high)
                new = terms(candidate)
                worse = new[0] < value
                if not bool(worse.any()):
                    break
                step = torch.where(worse, step / 2, step)
            t = torch.where(new[0] >= value, candidate, t)
            value, grad, hess = terms(t)
            history.append(float(self.log_likelihood + value.sum()))
            held = ((t <= low) & (grad < 0)) | ((t >= high) & (grad > 0))  # at a bound, pushing outwards
            if bool(((grad.abs() <= 1e-6 * (1 + value.abs())) | held).all()) or bool((step.abs() < 1e-10).all()):
                break
        lam = t.expand(lam.shape).exp().float()
        start = 0
        for f in self.factors:
            f.prior_precision.copy_(lam[start : start + f.prior_precision.numel()])
            start += f.prior_precision.numel()
        return history

    def _grid_nll_glm(self, data, grid, progress):
        total, count = torch.zeros(grid.numel(), dtype=torch.double), 0
        lams = [grid[:, None].expand(-1, f.prior_precision.numel()) for f in self.factors]
        for batch in tqdm(data, desc="val NLL grid", disable=not progress, dynamic_ncols=True):
            batch = to_device(batch, self.model.device)
            labels = self.model.likelihood.observed(batch)
            mean, cov = self._glm_batch(batch, lams)
            probs = _probit(mean, cov)  # [G, N, C]
            p_true = probs.gather(-1, labels.expand(grid.numel(), -1).unsqueeze(-1))
            total -= p_true.clamp(min=1e-12).log().sum((-1, -2)).double().cpu()
            count += labels.shape[0]
        if count == 0:
            raise ValueError("val_loader is empty")
        return (total / count).tolist()

    def _grid_nll_samples(self, data, grid, num_samples, progress):
        current = [f.prior_precision.clone() for f in self.factors]
        nlls = []
        try:
            for lam in tqdm(grid.tolist(), desc="val NLL grid", disable=not progress, dynamic_ncols=True):
                self.set_prior_precision(lam)
                with torch.random.fork_rng(devices=[self.model.device] if self.model.device.type == "cuda" else []):
                    torch.manual_seed(0)  # the same noise for every lambda
                    pred = predict(self.model, self, data, num_samples=num_samples)
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
        """
        self._check_fitted()
        batch = to_device(batch, self.model.device)
        mean, cov = self._glm_batch(batch, [f.prior_precision.unsqueeze(0) for f in self.factors])
        return mean, cov[0]

    def _glm_batch(self, batch, lams):
        """Mean ``[N, C]`` and covariance ``[G, N, C, C]`` for ``G`` prior precisions (``lams``: per site ``[G, L]``)."""
        model = self.model
        _check_one_forward(model)
        loc = {name: f.loc for name, f in zip(self.sites, self.factors)}
        with _eval(model.net):
            weights = self._layer_weights(loc)
            logits, inputs, outputs = self._forward(batch, loc)
            n, c = logits.shape
            eye = torch.eye(c, device=logits.device).unsqueeze(1).expand(c, n, c)
            grads = _output_grads(logits, outputs, eye)
        cov = logits.new_zeros(lams[0].shape[0], n, c, c)
        with torch.no_grad():
            for idx, x, g, mask in self._stacked(inputs, grads, batch):
                if x.shape[1] != n:  # cloze: K rows per example, whose Jacobian sums over all their tokens
                    k = x.shape[1] // n
                    x = x.reshape(x.shape[0], n, k * x.shape[2], x.shape[3])
                    g = g.reshape(*g.shape[:2], n, k * g.shape[3], g.shape[4])
                    mask = None if mask is None else mask.reshape(n, -1)
                if mask is not None:
                    g = g * mask.unsqueeze(-1)
                for i in idx:
                    cov += self._glm_site_cov(i, x, g, weights[i], lams[i])
        return logits.detach(), cov

    def _glm_site_cov(self, i, x, g, weights, lam):
        """``J P^-1 J^T`` of site ``i``'s matrices: ``[G, N, C, C]``. x ``[L, N, T, d_in]``, g ``[C, L, N, T, d_out]``."""
        f = self.factors[i]
        other, scale = weights
        if f.matrix == "A":
            small, large = (g @ other.unsqueeze(1)) * scale.unsqueeze(1), x
        else:
            small, large = x @ other.mT.unsqueeze(1), g * scale.unsqueeze(1)
        small = small @ f.small_vecs.unsqueeze(1)  # V^T s per token
        m = small.mT @ large  # V^T J_c: [C, L, N, r, D]
        t = m @ f.large_vecs.unsqueeze(1)  # [C, L, N, r, k]
        top = f.small_vals.unsqueeze(-1) * f.large_vals.unsqueeze(-2)  # [L, r, k]
        rest = f.small_vals * f.large_rest.unsqueeze(-1)  # [L, r]
        w_top = (top.unsqueeze(0) + lam[:, :, None, None]).reciprocal()  # [G, L, r, k]
        w_rest = (rest.unsqueeze(0) + lam[:, :, None]).reciprocal()  # [G, L, r]
        gram = torch.einsum("clnid,elnid->celni", m, m) - torch.einsum("clnij,elnij->celni", t, t)
        return torch.einsum("clnij,elnij,glij->gnce", t, t, w_top) + torch.einsum("celni,gli->gnce", gram, w_rest)

    def predict_glm(self, data, link="probit", num_samples=100, keep_samples=False, progress=False):
        """GLM predictive over ``data``: ``p(y | x) = E_{f ~ N(mean, cov)} softmax(f)`` from :meth:`glm_logits`.

        :param link: ``"probit"`` (``softmax(mean / sqrt(1 + pi/8 diag(cov)))``) or ``"mc"`` (``num_samples``
            logit draws per example).
        :param int num_samples: logit draws per example for ``link="mc"`` (a positive integer, checked for
            either link as :func:`pyro_lora.predict` checks it).
        :param keep_samples: with ``link="mc"``, also return the per-draw probabilities ``[S, N, C]``.
        :returns: a :class:`~pyro_lora.Prediction`.
        :raises ValueError: on an unknown ``link``, ``num_samples`` not a positive integer, ``keep_samples`` with
            the probit link, before :meth:`fit`, or on empty ``data``.
        """
        if link not in ("probit", "mc"):
            raise ValueError(f"link must be 'probit' or 'mc', got {link!r}")
        num_samples = _positive_int(num_samples, "num_samples")
        if keep_samples and link != "mc":
            raise ValueError("keep_samples needs link='mc' (the probit link draws no samples)")
        self._check_fitted()
        start = time.perf_counter()
        probs, labels = [], []
        for batch in tqdm(data, desc="GLM predict", disable=not progress, dynamic_ncols=True):
            batch = to_device(batch, self.model.device)
            mean, cov = self.glm_logits(batch)
            if link == "probit":
                p = _probit(mean, cov.unsqueeze(0))
            else:
                w, q = torch.linalg.eigh(cov)
                root = q * w.clamp(min=0).sqrt().unsqueeze(-2)  # cov = root root^T
                z = torch.randn(num_samples, *mean.shape, 1, device=mean.device)
                p = torch.softmax(mean + (root @ z).squeeze(-1), -1)
            probs.append(p)
            labels.append(self.model.likelihood.observed(batch))
        if not probs:
            raise ValueError("predict_glm got no batches: the data is empty")
        width = max(p.shape[-1] for p in probs)
        sample_probs = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in probs], 1).cpu()
        return Prediction(
            probs=sample_probs.mean(0),
            labels=torch.cat(labels).cpu(),
            sample_probs=sample_probs if keep_samples else None,
            seconds=time.perf_counter() - start,
        )


def _probit(mean, cov):
    """Probit approximation ``softmax(mean / sqrt(1 + pi/8 var))``; mean ``[N, C]``, cov ``[G, N, C, C]`` -> ``[G, N, C]``."""
    var = cov.diagonal(dim1=-2, dim2=-1).clamp(min=0)
    return torch.softmax(mean / (1 + math.pi / 8 * var).sqrt(), -1)


def _output_grads(logits, outputs, vectors):
    """``vectors^T d logits / d y`` for every recorded layer output ``y``: path -> ``[K, *y.shape]``.

    One backward pass per vector (``K`` of them; the graph is kept between them).
    """
    paths, ys = list(outputs), list(outputs.values())
    k = vectors.shape[0]
    grads = [
        torch.autograd.grad(logits, ys, vectors[j], retain_graph=j < k - 1, allow_unused=True, materialize_grads=True)
        for j in range(k)
    ]
    return {p: torch.stack([gs[i] for gs in grads]) for i, p in enumerate(paths)}


class _eval:
    """Run the network in eval mode (no dropout), restoring its mode afterwards."""

    def __init__(self, net):
        self.net = net

    def __enter__(self):
        self.was_training = self.net.training
        self.net.eval()

    def __exit__(self, *exc):
        self.net.train(self.was_training)


def _json_precision(value, sites):
    """Validate a constructor ``prior_precision`` and return it JSON-able (float or dict of float / list)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(sites))
        if unknown:
            raise ValueError(f"prior_precision names unknown site(s) {unknown}; the sites are {list(sites)}")
        out = {k: torch.as_tensor(v, dtype=torch.float).tolist() for k, v in value.items()}
        checks = [torch.as_tensor(v) for v in out.values()]
    else:
        out = float(value)
        checks = [torch.as_tensor(out)]
    if not all(bool((c > 0).all()) for c in checks):
        raise ValueError(f"prior_precision must be positive, got {value!r}")
    return out


def _site_precision(config, name, site):
    layers = site.shape[0] if site.stacked else 1
    v = torch.as_tensor(config.get(name, 1.0) if isinstance(config, dict) else config, dtype=torch.float).reshape(-1)
    if v.numel() not in (1, layers):
        raise ValueError(f"prior_precision of site {name!r} needs 1 or {layers} values, got {v.numel()}")
    return v.expand(layers)


def _check_one_forward(model):
    """The hooks see one forward per batch: the cloze shared-prefix path runs two (question, then choices)."""
    lik = model.likelihood
    if getattr(lik, "format", None) == "cloze" and lik.share_prefix:
        raise ValueError("LaplaceGuide needs MultipleChoice(format='cloze', share_prefix=False): its hooks read one forward per batch")
