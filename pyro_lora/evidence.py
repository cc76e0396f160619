"""The Laplace evidence of a Kronecker-factored posterior, and the prior precisions it chooses.

For a Gaussian posterior ``N(theta*, P^-1)`` with ``P = F + lambda I`` (the KFAC Fisher ``F`` of
:mod:`pyro_lora.kfac`), the Laplace approximation of the evidence (MacKay 1992; Immer et al. 2021) is
``log p(D | theta*) - 1/2 sum_W [log det P_W - p_W log lambda_W + lambda_W |theta*_W|^2]`` over the LoRA
matrices ``W`` (``p_W`` entries each). With the factors' eigenvalues ``g_i`` it costs ``O(r k)`` per matrix
and is concave in ``lambda``; :func:`maximise_evidence` maximises it in ``log lambda``.
"""

from __future__ import annotations

import torch

from .sites import Site

__all__ = ["curvature_peaks", "evidence_terms", "maximise_evidence", "precision_config", "site_precision"]



def precision_tensor(value, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A prior precision (a number, or one per layer) as a ``dtype`` tensor (the dtype the guide holds it in).

    :raises ValueError: unless every entry is a positive finite number in ``dtype`` (``inf`` made the evidence nan;
        ``True`` is a slip, not 1; 1e-300 is 0 in float32).
    """
    flat = value.reshape(-1).tolist() if hasattr(value, "reshape") else value
    flat = flat if isinstance(flat, (list, tuple)) else [flat]
    try:
        v = torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError, RuntimeError):
        v = None
    if v is None or any(isinstance(x, bool) for x in flat) or not bool((torch.isfinite(v) & (v > 0)).all()):
        raise ValueError(f"a prior precision must be a positive finite number (or one per layer) in {dtype}, got "
                         f"{value!r}")
    return v


def precision_config(value, sites: dict):
    """Validate a ``prior_precision`` (a float, or a dict site -> float or one per layer) and return it JSON-able.

    :raises ValueError: for unknown sites or values that are not positive finite numbers.
    """
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(sites))
        if unknown:
            raise ValueError(f"prior_precision names unknown site(s) {unknown}; the sites are {list(sites)}")
        return {k: precision_tensor(v).tolist() for k, v in value.items()}
    v = precision_tensor(value)
    if v.numel() != 1:
        raise ValueError(f"prior_precision must be one number, or a dict site -> number or one per layer; got {value!r}")
    return float(v)


def site_precision(config, name: str, site: Site) -> torch.Tensor:
    """``lambda`` of site ``name`` from a :func:`precision_config` (a dict names every site): ``[L]``.

    :raises ValueError: if the site's entry has neither 1 nor ``L`` values.
    """
    layers = site.shape[0] if site.stacked else 1
    v = torch.as_tensor(config[name] if isinstance(config, dict) else config, dtype=torch.float).reshape(-1)
    if v.numel() not in (1, layers):
        raise ValueError(f"prior_precision of site {name!r} needs 1 or {layers} values, got {v.numel()}")
    return v.expand(layers)


def curvature_peaks(factors) -> torch.Tensor:
    """The largest Fisher eigenvalue of every LoRA matrix: ``[M]`` (all layers of all sites), float64."""
    peaks = []
    for f in factors:
        top, rest, mult = f.eigenvalues()
        peak = top.amax(-1)
        peaks.append(torch.maximum(peak, rest.amax(-1)) if mult > 0 else peak)
    return torch.cat(peaks).double()


def evidence_terms(factors, log_lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per matrix (``[M]``, all layers of all sites) at ``log_lam`` ``[M]``: the prior terms of the Laplace
    evidence ``-1/2 [log det P - p log lambda + lambda |theta*|^2]`` and their first and second derivatives
    in ``t = log lambda``."""
    lam = log_lam.exp()
    vals, d1, d2 = [], [], []
    start = 0
    for f in factors:
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
    return tuple(torch.cat(x) for x in (vals, d1, d2))


def maximise_evidence(terms, t: torch.Tensor, low: torch.Tensor, high: torch.Tensor, max_iter: int, offset):
    """Maximise ``terms(t) -> (value, gradient, hessian)`` (elementwise in ``t``) within ``[low, high]`` by
    safeguarded Newton steps with backtracking, so no value ever decreases.

    :param offset: added to ``value.sum()`` in the history (the log-likelihood).
    :returns: ``(t, history)``: the optimum and the evidence per iteration.
    """
    value, grad, hess = terms(t)
    history = [float(offset + value.sum())]
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
        history.append(float(offset + value.sum()))
        held = ((t <= low) & (grad < 0)) | ((t >= high) & (grad > 0))  # at a bound, pushing outwards
        if bool(((grad.abs() <= 1e-6 * (1 + value.abs())) | held).all()) or bool((step.abs() < 1e-10).all()):
            break
    return t, history
