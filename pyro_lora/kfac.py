"""Kronecker-factored (KFAC) curvature of the LoRA matrices, for the Laplace approximation.

Each LoRA matrix ``W`` gets the Fisher (= GGN for softmax cross-entropy) of the training data restricted to
``W``, approximated by KFAC (Martens & Grosse 2015; for the Laplace approximation Ritter et al. 2018):
``F ~ G (x) Lambda``, the second moments of the matrix's output gradients and input activations. Written
in the canonical orientation ``W: [r, D]`` (``A`` as it is, ``B`` transposed), one factor is ``r x r``
(kept dense) and the other ``D x D`` (``d_in`` for ``A``, ``d_out`` for ``B``), kept as
``U diag(s) U^T + sigma (I - U U^T)``: rank ``k`` from a streaming Nystrom sketch (Tropp et al. 2017) plus
the remaining trace spread evenly over the complement, so the posterior
(:class:`~pyro_lora.distributions.KFACNormal`) keeps an exact Kronecker eigenbasis and memory does not
grow with the data.

The activations and gradients come from forward hooks on the peft LoRA layers while the network runs at
``theta*`` through the weight hand-off: the layer input ``x`` and the gradient ``g`` of its output
``y = W0 x + s B A x`` give everything, ``dL/dA = s B^T g x^T`` and ``dL/dB = s g (A x)^T``.

The same hooks give the Jacobians of the linearised (GLM) predictive (:func:`glm_batch`), contracted in
the posterior's eigenbasis.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator

import torch
from torch.utils.checkpoint import CheckpointError
from tqdm.auto import tqdm

from . import distributed
from .data import RowDigest, check_every_example, fixed_batches, to_device
from .distributions import KFACNormal
from .kinds import down_kind, up_kind
from .likelihoods import is_cloze
from .metrics import check_labels
from .model import full_precision, sequence_first_family
from .checks import check_count, check_not_inference_mode
from .handoff import ForeignCheckpointError
from .hooks import SKIPPED
from .contract import entry_checks
from .modes import eval_mode
from .predictive import SEED_RANGE, Prediction, batch_labels, pad_choices
from .progress import progress_bar
from .sites import Site, per_layer
from .callers import user_stacklevel

__all__ = [
    "Accumulator",
    "SiteFactors",
    "accumulate",
    "check_one_forward",
    "fisher_vectors",
    "glm_batch",
    "glm_probs",
    "grid_nll",
    "grid_nll_glm",
    "nystrom",
    "output_grads",
    "probit",
]


class SiteFactors(torch.nn.Module):
    """Buffers of one site's posterior: its mean, the two Kronecker factors' eigendecompositions, ``lambda``.

    :param site: the :class:`~pyro_lora.sites.Site` (an ``A`` or ``B`` site).
    :param int rank: ``k``, the rank kept of the ``D x D`` factor.
    :param prior_precision: ``lambda``, a float or ``[L]``.
    """

    def __init__(self, site: Site, rank: int, prior_precision):
        super().__init__()
        self.matrix = site.matrix
        self.transposed = site.kind.role == "up"  # B is held as W^T
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

    def distribution(self, prior_precision: torch.Tensor | None = None) -> KFACNormal:
        """The site's posterior, at ``prior_precision`` (``[L]``) instead of the stored ``lambda`` if given."""
        lam = self.prior_precision if prior_precision is None else prior_precision
        return KFACNormal(
            self.loc, self.small_vecs, self.small_vals, self.large_vecs, self.large_vals, self.large_rest, lam, self.transposed
        )

    def eigenvalues(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Fisher eigenvalues (without ``lambda``): ``[L, r*k]`` each once, ``[L, r]`` each ``D - k`` times."""
        top = (self.small_vals.unsqueeze(-1) * self.large_vals.unsqueeze(-2)).flatten(1)
        return top, self.small_vals * self.large_rest.unsqueeze(-1), self.large_vecs.shape[-2] - self.large_vecs.shape[-1]

    def extra_numbers(self) -> int:
        """Numbers held beside the mean."""
        return sum(b.numel() for n, b in self.named_buffers() if n != "loc")


class Accumulator:
    """Running KFAC sums of one site: dense ``sum s s^T`` (``r x r``), and for the ``D`` side a Nystrom
    sketch ``Y = (sum l l^T) Omega`` plus its exact trace. ``Y`` is linear in the data, so streaming is exact.

    :param factors: the site's :class:`SiteFactors` (shapes, device).
    :param int sketch: sketch width ``l`` (at most ``D``).
    :param generator: draws the Gaussian test matrix ``Omega``.
    """

    def __init__(self, factors: SiteFactors, sketch: int, generator: torch.Generator):
        layers, r, _ = factors.small_vecs.shape
        d = factors.large_vecs.shape[-2]
        dev = factors.loc.device
        self.small = torch.zeros(layers, r, r, device=dev)
        gauss = torch.randn(d, min(d, sketch), generator=generator, device=dev)
        self.omega = torch.linalg.qr(gauss).Q  # [D, l], orthonormal columns
        self.sketch = torch.zeros(layers, d, self.omega.shape[-1], device=dev)
        self.trace = torch.zeros(layers, device=dev)
        self.count = 0

    def update(self, small: torch.Tensor, large: torch.Tensor, count: int) -> None:
        """``small: [L, m, r]``, ``large: [L, m', D]`` vectors; ``count`` activation vectors seen."""
        self.small += small.mT @ small
        self.sketch += large.mT @ (large @ self.omega)
        self.trace += large.pow(2).sum((-1, -2))
        self.count += count

    def finish(self, factors: SiteFactors) -> None:
        """Normalise the activation side to a mean, eigendecompose both factors into ``factors``.

        :raises ValueError: if no data was accumulated.
        """
        if self.count == 0:
            raise ValueError("fit got no data: the loader is empty")
        small, sketch, trace = self.small, self.sketch, self.trace
        if factors.transposed:  # B: the r x r side holds the activations A x
            small = small / self.count
        else:  # A: the D side holds the layer inputs x
            sketch, trace = sketch / self.count, trace / self.count
        e, v = torch.linalg.eigh(small.double())
        vals, vecs = nystrom(sketch, self.omega, factors.large_vecs.shape[-1])
        d, k = vecs.shape[-2:]
        rest = (trace.double() - vals.sum(-1)).clamp(min=0) / (d - k) if d > k else torch.zeros_like(trace, dtype=torch.double)
        factors.small_vals.copy_(e.clamp(min=0))
        factors.small_vecs.copy_(v)
        factors.large_vals.copy_(vals)
        factors.large_vecs.copy_(vecs)
        factors.large_rest.copy_(rest)


def nystrom(sketch: torch.Tensor, omega: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


# --------------------------------------------------------------------------- hooks and per-layer vectors


def fisher_vectors(logits: torch.Tensor, fisher: str) -> torch.Tensor:
    """Backward vectors ``v [K, B, C]``: the gradient ``p - e_y`` of ``-log p_y`` for one ``y ~ p``
    (``fisher="mc"``, ``K = 1``), or (``"exact"``) ``K = C - 1`` vectors with
    ``sum_k v_k v_k^T = diag(p) - p p^T = E_y[(p - e_y)(p - e_y)^T]``.
    """
    # -inf is a missing choice of a multiple-choice batch; nan or +inf made eigh die in a raw "failed to converge"
    if bool((logits.isnan() | (logits == math.inf)).any()):
        raise ValueError("the network's logits at the posterior mean hold nan or inf on a batch the curvature is taken "
                         "from (NaN weights, or a forward that overflowed, e.g. a half-precision base): no Fisher can be "
                         "taken from them; predict(model, None, data) shows the network's own output")
    p = torch.softmax(logits.float(), -1)
    if fisher == "mc":
        y = torch.distributions.Categorical(probs=p).sample()
        return (p - torch.eye(p.shape[-1], device=p.device)[y]).unsqueeze(0)
    # the logit Fisher has rank C - 1 (constant shifts leave softmax unchanged): C - 1 backward passes
    p = p.double()
    w, q = torch.linalg.eigh(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))
    return (q[..., 1:] * w[..., 1:].clamp(min=0).sqrt().unsqueeze(-2)).permute(2, 0, 1).float()


_HALF_BACKWARD_SCALE = 2.0**12  # float16 backward vectors scaled up, as a loss scaler does, then divided back out

_FOREIGN_CHECKPOINT = (
    "{what}: torch's activation checkpointing applied outside transformers "
    "(torch.utils.checkpoint, checkpoint_wrapper, apply_activation_checkpointing) hides a layer's output from the "
    "Jacobians a Laplace takes (its curvature came out 0, its predictive the MAP's); remove it (transformers' own, "
    "net.gradient_checkpointing_enable(), is switched off for the fit)")


def record_layers(model, batch: dict, loc: dict) -> tuple[torch.Tensor, dict, dict]:
    """Logits ``[B, C]`` at ``loc`` and, per LoRA layer (module path), its input and (grad-requiring) output.

    :raises ValueError: for a layer run without autograd inside the forward (a reentrant activation checkpoint applied
        outside transformers: its output would be a leaf the logits do not depend on, every Jacobian 0)."""
    inputs, outputs = {}, {}

    def hook(path):
        def record(module, args, out):
            if not torch.is_grad_enabled():  # the forward runs under enable_grad: something switched it off around the layer
                raise ValueError(_FOREIGN_CHECKPOINT.format(what=f"the LoRA layer {path} ran with autograd off inside "
                                                                 "the network's forward"))
            if path in inputs:
                raise ValueError(
                    f"the LoRA layer {path} runs more than once in one forward (a module shared across depths, as "
                    "ALBERT's layers are): KFAC factors and GLM Jacobians take one input and output per layer, so they "
                    "would keep its last application only; a Laplace over a network that reuses a LoRA layer is not "
                    "supported")
            if not out.requires_grad:  # frozen backbone: make the output a leaf we can differentiate to
                out.requires_grad_()
            # the input detached: it holds no graph, which is freed with the logits and outputs once the grads are taken
            inputs[path], outputs[path] = args[0].detach(), out

        return record

    handles = [layer.register_forward_hook(hook(path)) for path, layer in model.layers.items()]
    try:
        with torch.enable_grad():
            logits = model.logits(batch, loc)
    except ForeignCheckpointError:  # the hand-off saw a layer run with autograd off before the hook above could
        raise ValueError(_FOREIGN_CHECKPOINT.format(what="a LoRA layer ran with autograd off inside the network's "
                                                         "forward")) from None
    finally:
        for h in handles:
            h.remove()
    _check_recorded(model, batch, inputs)
    return logits.float(), inputs, outputs


def _check_recorded(model, batch: dict, inputs: dict) -> None:
    """Every LoRA layer ran once, on inputs whose first dim is the batch's rows (the cloze LM head, on the scored
    tokens only, is :func:`rows_per_choice`'s to refuse)."""
    missing = [p for p in model.layers if p not in inputs]
    if missing:
        raise ValueError(
            f"the LoRA layer {missing[0]} did not run in this batch's forward ({len(missing)} such layer(s)): a Laplace "
            "has no curvature for it and would leave its posterior at the prior. Where the layer does not run (a vision "
            "tower's layers under target_modules='all-linear' given text-only batches), leave it out of target_modules; "
            f"where it does, the forward hook recording it was skipped: {SKIPPED}")
    ids = batch.get("input_ids", batch.get("inputs_embeds"))
    if ids is None or is_cloze(model.likelihood):
        return
    for path, x in inputs.items():
        if x.dim() < 2 or x.shape[0] != ids.shape[0]:
            raise ValueError(
                f"the LoRA layer {path} reads inputs of shape {tuple(x.shape)}, whose first dim is not the batch's "
                f"{ids.shape[0]} rows (a network that runs it sequence-first, or on rows of its own): KFAC and the GLM "
                "group a layer's inputs by example and would mix the examples; leave it out of target_modules")


def output_grads(logits: torch.Tensor, outputs: dict, vectors: torch.Tensor, rows_per_choice: bool = False) -> dict:
    """``vectors^T d logits / d y`` for every recorded layer output ``y``: path -> ``[K, *y.shape]``; a non-reentrant
    activation checkpoint applied outside transformers, whose recomputation in backward fails, is refused by name.

    One backward pass per vector (``K`` of them; the graph is kept between them). With ``rows_per_choice``
    (cloze: row ``b * C + c`` of every ``y`` is choice ``c`` of example ``b`` run alone), one backward pass of
    the summed logits gives each row its own choice's gradient, and vector ``k`` weighs row ``(b, c)`` by
    ``vectors[k, b, c]``: the same result in one pass instead of ``K``.

    Where the outputs are float16, each backward runs on the vectors scaled by ``2**12`` (as a loss scaler scales the
    loss; the grads come back float32, divided by it): unscaled, small gradients fell to float16's subnormals or 0,
    shrinking the curvature (68% on a tiny BERT whose head had std 2e-4). A scale whose gradients overflow is
    lowered 16-fold until they are finite.
    """
    paths, ys = list(outputs), list(outputs.values())
    k = vectors.shape[0]
    half = any(y.dtype == torch.float16 for y in ys)

    def grad(v, retain):
        scale = _HALF_BACKWARD_SCALE if half else 1.0
        while True:
            grads = backward(v * scale if half else v, retain or scale > 1)
            if scale == 1 or all(bool(torch.isfinite(g).all()) for g in grads):
                return [g.float() / scale for g in grads] if half else grads
            scale = max(1.0, scale / 16)

    def backward(v, retain):
        try:
            return torch.autograd.grad(logits, ys, v, retain_graph=retain, allow_unused=True, materialize_grads=True)
        except RuntimeError as error:  # CheckpointError is one: a recomputation outside the forward's hooks and hand-off
            reentrant = "use_reentrant=True" in str(error)  # a reentrant checkpoint (around layers without LoRA) refuses .grad
            if not (isinstance(error, (CheckpointError, ForeignCheckpointError)) or reentrant):
                raise
            raise ValueError(_FOREIGN_CHECKPOINT.format(what=f"an activation checkpoint failed under the Laplace's "
                                                             f"Jacobians ({str(error).splitlines()[0]})")) from None

    if rows_per_choice:
        rows = vectors.shape[1:].numel()
        grads = grad(torch.ones_like(logits), False)
        weights = vectors.reshape(k, rows)
        return {p: weights.view(k, rows, *[1] * (g.dim() - 1)) * g for p, g in zip(paths, grads)}
    grads = [grad(vectors[j], j < k - 1) for j in range(k)]
    return {p: torch.stack([gs[i] for gs in grads]) for i, p in enumerate(paths)}


def layer_weights(model, sites: dict, loc: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per site: the other LoRA matrix of its layers (``[L, d_out, r]`` for A, ``[L, r, d_in]`` for B) and the
    scaling ``s`` (``[L, 1, 1]``)."""
    values = per_layer(sites, loc)
    out = []
    for site in sites.values():
        other = up_kind() if site.kind.role == "down" else down_kind()
        mats, scales = [], []
        for path in site.layers:
            layer = model.layers[path]
            own = getattr(layer, other.parameter)[model.adapter].weight
            mats.append(values[path].get(other.letter, own).detach().float())
            scales.append(float(layer.scaling[model.adapter]))
        out.append((torch.stack(mats), torch.tensor(scales, device=model.device)[:, None, None]))
    return out


def stack_layers(sites: dict, inputs: dict, grads: dict, batch: dict) -> Iterator[tuple]:
    """Group sites by their layers; yield (site indices, x ``[L, N, T, d_in]``, g ``[K, L, N, T, d_out]``,
    mask ``[N, T]`` or None).

    :raises ValueError: if the layers of one site see inputs of different shapes.
    """
    groups = {}
    for i, site in enumerate(sites.values()):
        groups.setdefault(site.layers, []).append(i)
    for layers, idx in groups.items():
        shapes = {tuple(inputs[p].shape) for p in layers}
        if len(shapes) > 1:
            raise ValueError(
                f"the LoRA layers of site {list(sites)[idx[0]]!r} see inputs of different shapes {sorted(shapes)} "
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


def reduce_tokens(x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None, kfac: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token positions -> KFAC terms: x ``[L, n, d_in]``, g ``[K, L, n, d_out]``, and ``n`` activation vectors.

    ``kfac="reduce"``: per sequence, the mean of the activations and the sum of the gradients over its tokens;
    ``"expand"``: every (unmasked) token a separate term.
    """
    if kfac == "reduce":
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


def kfac_vectors(factors: SiteFactors, x: torch.Tensor, g: torch.Tensor, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical ``[r, D]`` vectors of a site: small ``[L, m, r]``, large ``[L, m', D]``.

    A: small = ``s B^T g`` (gradient w.r.t. ``A x``), large = ``x``; B^T: small = ``A x``, large = ``s g``.
    """
    other, scale = weights
    if not factors.transposed:
        small = (g @ other) * scale  # [K, L, n, r]
        return small.transpose(0, 1).flatten(1, 2), x
    return x @ other.mT, (g * scale).transpose(0, 1).flatten(1, 2)


def check_one_forward(model) -> None:
    """The hooks see one forward per batch, whose LoRA layers read ``[N, T, d]``: the cloze shared-prefix path runs
    two (question, then choices), and a sequence-first family (:func:`~pyro_lora.model.sequence_first_family`)
    reads ``[T, N, d]``, which passes every shape check where ``T = N``.

    :raises ValueError: for ``MultipleChoice(format="cloze", share_prefix=True)`` or a sequence-first network.
    """
    lik = model.likelihood
    if is_cloze(lik) and lik.share_prefix:
        raise ValueError("LaplaceGuide needs MultipleChoice(format='cloze', share_prefix=False): its hooks read one forward per batch")
    family = sequence_first_family(model.net)
    if family:
        raise ValueError(f"a {family} network runs LoRA layers sequence-first ([tokens, batch, d]): KFAC and the GLM "
                         "group a layer's inputs by example and would mix the examples; a Laplace over it is not supported")


def rows_per_choice(model, batch: dict, outputs: dict) -> bool:
    """Whether the network runs each (example, choice) pair as its own row: the cloze format (one forward per
    batch, :func:`check_one_forward`), whose ``C`` logits of an example come from ``C`` separate rows; then every
    LoRA layer's output (``outputs``: path -> tensor) must be ``[rows, T, d]`` as ``batch["input_ids"]`` is ``[rows, T]``.

    :raises ValueError: naming a LoRA layer that sees other rows (LoRA on the LM head, which the cloze score runs on
        the scored tokens only, ``[M, d]``): its Jacobians would be assigned to the wrong choices.
    """
    if not is_cloze(model.likelihood):
        return False
    rows = tuple(batch["input_ids"].shape)
    for path, y in outputs.items():
        if tuple(y.shape[:2]) != rows or y.dim() != 3:
            raise ValueError(
                f"LoRA layer {path!r} has outputs of shape {tuple(y.shape)}, not one row per (question, choice) and token "
                f"({rows[0]} x {rows[1]} of the cloze batch): the cloze score runs the LM head on the scored tokens only, "
                "so a Laplace over its LoRA cannot tell the choices apart; leave the LM head out of target_modules (or "
                "use the letter format)"
            )
    return True


def _cloze_terms(x, g, mask, choice_mask, kfac: str):
    """A cloze batch's rows (``x [L, N C, T, d_in]``, ``g [K, L, N C, T, d_out]``, ``mask [N C, T]`` or None; choice
    ``c`` of question ``b`` in row ``b C + c``) as :func:`reduce_tokens`'s sequences. ``"reduce"``: one per question,
    its ``C`` rows' tokens together, as one sequence's tokens are: a question's Fisher is ``J^T H J`` over all its
    choices' scores, whose cross-choice terms cancel the direction moving every score alike (choices alike carry no
    curvature); per row they were dropped, and two identical choices, whose likelihood is constant, gave curvature.
    ``"expand"``: every token its own term, as for a sequence. The filler row of a missing choice (``choice_mask``
    ``[N, C]`` False) is no data: its tokens stay out of the factors."""
    n, c = choice_mask.shape
    keep = choice_mask.to(x.dtype)[:, :, None].expand(n, c, x.shape[-2])  # [N, C, T]
    if mask is not None:
        keep = keep * mask.view(n, c, -1)
    if kfac == "reduce":
        return (x.reshape(x.shape[0], n, -1, x.shape[-1]), g.reshape(*g.shape[:2], n, -1, g.shape[-1]),
                keep.reshape(n, -1))
    rows = choice_mask.bool().flatten()
    return x[:, rows], g[:, :, rows], keep.reshape(n * c, -1)[rows]


# --------------------------------------------------------------------------- fitting the factors


def accumulate(model, sites: dict, factors, data, fisher: str, kfac: str, sketch: int, progress: bool = True,
               loc: dict | None = None) -> tuple[float, int]:
    """Fill ``factors`` (one :class:`SiteFactors` per site) with the KFAC factors of ``data`` at ``theta*``: ``loc``
    (site -> value), else the model's current adapter.

    Per batch: one forward at ``theta*`` with hooks on every LoRA layer, then one backward to the LoRA
    layers' outputs (``C - 1`` for ``fisher="exact"``, but one for cloze); the factor sums are batched over layers. Under
    ``torch.distributed`` every rank runs its block of batches and the sums (linear in the data) are
    all-reduced, so every rank ends with the factors of one process.

    :param fisher: ``"mc"`` or ``"exact"`` (:func:`fisher_vectors`); ``kfac``: ``"reduce"`` or ``"expand"``
        (:func:`reduce_tokens`); ``sketch``: Nystrom sketch width.
    :returns: ``(log p(D | theta*), N, rows)``, ``N`` the number of labelled examples and ``rows`` their
        :class:`~pyro_lora.data.RowDigest` (every rank's).
    :raises ValueError: on empty ``data``, a ``DataLoader`` dropping its last incomplete batch (the curvature is a sum
        over every example), or a likelihood that runs two forwards per batch.
    """
    # the guide's own settings too (its fisher, sketch, each factor's rank): ranks built with others each summed their
    # own kind of curvature into one posterior, or sent sums of other sizes (gloo aborted)
    settings = {"fisher": fisher, "kfac": kfac, "sketch": sketch, "rank": [f.large_vecs.shape[-1] for f in factors]}
    with entry_checks(model, None, "fit a Laplace", handed=loc is not None, settings=settings):  # else the adapter's LoRA weights are read
        check_every_example(data, "a Laplace fit")
        check_one_forward(model)
        check_not_inference_mode("fit a Laplace", "the Laplace curvature is a gradient")
    if loc is not None:  # handed, so the ranks' check above skipped the LoRA weights: each rank's block at its own loc
        distributed.check_same(dict(loc), "values to fit the Laplace at (loc)", "give every rank the same loc (the same "
                               "guide's mean(), after it is loaded or trained alike on every rank)")
    loc = model.initial_values(loc)
    gen = torch.Generator(device=model.device).manual_seed(0)
    acc = [Accumulator(f, sketch, gen) for f in factors]
    loglik = torch.zeros((), device=model.device, dtype=torch.double)
    count, rows = 0, RowDigest(model.likelihood.net_inputs)
    bar = tqdm(distributed.split_batches(data), desc="KFAC", disable=not (progress and distributed.is_main()), dynamic_ncols=True)
    with eval_mode(model.net):
        weights = layer_weights(model, sites, loc)
        with distributed.refused_together("fit a Laplace"):  # a batch of one rank's block may be refused there alone
            for raw in bar:
                batch = to_device(raw, model.device)
                labels = model.likelihood.observed(batch)
                logits, inputs, outputs = record_layers(model, batch, loc)
                loglik += model.likelihood.distribution(logits.detach()).log_prob(labels).double().sum()
                count += labels.shape[0]
                rows.add(raw, labels.shape[0])  # the batch as read: no copy back from the device
                cloze = rows_per_choice(model, batch, outputs)
                grads = output_grads(logits, outputs, fisher_vectors(logits.detach(), fisher), cloze)
                del logits, outputs  # a float16 backward kept the graph for its retries: freed before the next forward
                # the sums stay float32 under a user's autocast
                with torch.no_grad(), full_precision(model.device):
                    for idx, x, g, mask in stack_layers(sites, inputs, grads, batch):
                        if cloze:
                            x, g, mask = _cloze_terms(x, g, mask, batch["choice_mask"], kfac)
                        x, g, n = reduce_tokens(x, g, mask, kfac)
                        for i in idx:
                            acc[i].update(*kfac_vectors(factors[i], x, g, weights[i]), n)
    counts = torch.tensor([a.count for a in acc] + [count], dtype=torch.double, device=model.device)
    distributed.all_reduce_([t for a in acc for t in (a.small, a.sketch, a.trace)] + [loglik, counts, rows.sums])
    for a, c in zip(acc, counts.tolist()):
        a.count = int(c)
    with torch.no_grad():
        for f, a, name in zip(factors, acc, sites):
            f.loc.copy_(loc[name])
            a.finish(f)
    return loglik.item(), int(counts[-1]), rows


# --------------------------------------------------------------------------- linearised (GLM) predictive


def glm_batch(model, sites: dict, factors, batch: dict, lams: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearised logits of ``batch`` around the factors' means: mean ``[N, C]`` and covariance
    ``J P^-1 J^T`` ``[G, N, C, C]`` for ``G`` prior precisions (``lams``: per site ``[G, L]``), summed over
    LoRA matrices (block-diagonal posterior).

    One forward and ``C`` backward passes to the LoRA layers' outputs (one for cloze, whose choices run as rows of
    their own: :func:`output_grads`), then per matrix and example
    ``O(C T r D + C^2 r D + C^2 r k)`` (``T`` tokens): the Jacobian ``J_c = sum_t s_t l_t^T`` is contracted
    in the posterior's eigenbasis, never formed as a ``P x P`` matrix.
    """
    check_one_forward(model)
    check_not_inference_mode("compute GLM logits", "the GLM's Jacobians are gradients")
    loc = {name: f.loc for name, f in zip(sites, factors)}
    with eval_mode(model.net):
        weights = layer_weights(model, sites, loc)
        logits, inputs, outputs = record_layers(model, batch, loc)
        n, c = logits.shape
        eye = torch.eye(c, device=logits.device).unsqueeze(1).expand(c, n, c)
        grads = output_grads(logits, outputs, eye, rows_per_choice(model, batch, outputs))
        mean = logits.detach()
        del logits, outputs  # a float16 backward kept the graph for its retries: freed before the covariances
    # float64 sums: where most of the variance shifts every logit alike, the probit's S_cc + S_kk - 2 S_ck cancels it,
    # and float32 sums of that variance had already rounded the differences away (a variance of -0.008 for 0.014)
    cov = mean.new_zeros(lams[0].shape[0], n, c, c, dtype=torch.double)
    with torch.no_grad(), full_precision(model.device):
        for idx, x, g, mask in stack_layers(sites, inputs, grads, batch):
            if x.shape[1] != n:  # cloze: K rows per example, whose Jacobian sums over all their tokens
                k = x.shape[1] // n
                x = x.reshape(x.shape[0], n, k * x.shape[2], x.shape[3])
                g = g.reshape(*g.shape[:2], n, k * g.shape[3], g.shape[4])
                mask = None if mask is None else mask.reshape(n, -1)
            if mask is not None:
                g = g * mask.unsqueeze(-1)
            for i in idx:
                cov += glm_site_cov(factors[i], x, g, weights[i], lams[i])
    return mean, cov


def glm_site_cov(f: SiteFactors, x: torch.Tensor, g: torch.Tensor, weights, lam: torch.Tensor) -> torch.Tensor:
    """``J P^-1 J^T`` of one site's matrices: ``[G, N, C, C]`` float64 (the products of float32 terms are exact
    there). x ``[L, N, T, d_in]``, g ``[C, L, N, T, d_out]``, ``lam`` ``[G, L]``."""
    other, scale = weights
    if not f.transposed:
        small, large = (g @ other.unsqueeze(1)) * scale.unsqueeze(1), x
    else:
        small, large = x @ other.mT.unsqueeze(1), g * scale.unsqueeze(1)
    small = small @ f.small_vecs.to(small.dtype).unsqueeze(1)  # V^T s per token (a guide.double()'s V: as the terms)
    m = (small.mT @ large).double()  # V^T J_c: [C, L, N, r, D]
    # the residual |m|^2 - |U^T m|^2 carries the largest weight 1 / (rest + lambda): float32's U, orthonormal to 1e-7,
    # moved Var(f_c - f_k) by 13% at lambda 1e-4, so U is orthonormalised in float64 first
    t = m @ torch.linalg.qr(f.large_vecs.double()).Q.unsqueeze(1)  # [C, L, N, r, k]
    top = f.small_vals.double().unsqueeze(-1) * f.large_vals.double().unsqueeze(-2)  # [L, r, k]
    rest = f.small_vals.double() * f.large_rest.double().unsqueeze(-1)  # [L, r]
    w_top = (top.unsqueeze(0) + lam.double()[:, :, None, None]).reciprocal()  # [G, L, r, k]
    w_rest = (rest.unsqueeze(0) + lam.double()[:, :, None]).reciprocal()  # [G, L, r]
    gram = torch.einsum("clnid,elnid->celni", m, m) - torch.einsum("clnij,elnij->celni", t, t)
    return torch.einsum("clnij,elnij,glij->gnce", t, t, w_top) + torch.einsum("celni,gli->gnce", gram, w_rest)


def probit(mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Pairwise probit approximation of ``E softmax(f)``, ``f ~ N(mean, cov)`` (Lu, Ie & Sha 2020, mean-field with the
    pairwise covariances): ``p_c ∝ 1 / sum_k exp(-(m_c - m_k) / sqrt(1 + pi/8 Var(f_c - f_k)))``, normalised.
    Like softmax, it ignores a shift of every logit (cloze scores are sums of log-probabilities, far below 0); for two
    classes it is MacKay's probit ``sigmoid(m / sqrt(1 + pi/8 var))`` of the logit difference. mean ``[N, C]`` (or
    ``[K, N, C]``), cov ``[G, N, C, C]`` (or ``[G, K, N, C, C]``) -> ``[G, N, C]`` (or ``[G, K, N, C]``) in the
    inputs' promoted dtype; ``-inf`` marks a missing choice (probability 0), a difference whose variance overflowed
    (an infinite entry) counts as infinitely uncertain (a tie), and a nan stays nan."""
    return torch.softmax(_probit_scores(mean, cov), -1).to(torch.promote_types(mean.dtype, cov.dtype))


def _probit_scores(mean, cov):
    """The float64 unnormalised log-probabilities of :func:`probit` (``-inf`` at missing choices): its
    ``log_softmax`` is the predictive's log, exact where its float32 probabilities underflow."""
    # float64: where most of the variance shifts every logit alike, S_cc + S_kk - 2 S_ck cancels it, and in float32
    # the rounding of a variance of 1e7 alone moved probabilities by 0.1
    missing = torch.isneginf(mean)
    m, cov = mean.double().masked_fill(missing, 0), cov.double()
    var = cov.diagonal(dim1=-2, dim2=-1)
    diff_var = (var.unsqueeze(-1) + var.unsqueeze(-2) - 2 * cov).clamp(min=0)
    inf = torch.isinf(var)
    overflow = inf.unsqueeze(-1) | inf.unsqueeze(-2) | torch.isinf(cov)
    diff_var = diff_var.masked_fill(overflow, math.inf)  # inf - inf would be nan
    z = (m.unsqueeze(-1) - m.unsqueeze(-2)) / (1 + math.pi / 8 * diff_var).sqrt()  # [.., c, k]: f_c - f_k scaled
    # a missing k never beats a real c (its term is 0); a missing c gets probability 0 below
    z = z.masked_fill(missing.unsqueeze(-2), math.inf)
    score = -torch.logsumexp(-z, -1)  # log 1 / sum_k exp(-z_ck); the k = c term is exp(0) = 1
    return score.masked_fill(missing, -math.inf)


def glm_probs(mean: torch.Tensor, cov: torch.Tensor, link: str, num_samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Class probabilities of logits ``N(mean, cov)`` (mean ``[N, C]``, cov ``[N, C, C]``): ``[1, N, C]`` by the
    probit approximation (``link="probit"``), or ``[S, N, C]`` from ``num_samples`` logit draws (``"mc"``; the normal
    draws from ``generator``, on its device, else the global RNG of ``mean``'s). With ``K`` Gaussians (mean
    ``[K, N, C]``, cov ``[K, N, C, C]``): ``[1, K, N, C]`` or ``[S, K, N, C]``. Probabilities in ``mean``'s dtype.

    :raises ValueError: for ``"mc"`` with a covariance that is not finite."""
    return _glm_probs(mean, cov, link, num_samples, generator)[0]


def _glm_probs(mean, cov, link, num_samples, generator=None):
    """:func:`glm_probs` and, of the same draws, their float64 log (``-inf`` at missing choices): the probit's
    ``log_softmax`` of its float64 scores, or each logit draw's float64 ``log_softmax``."""
    num_samples = check_count(num_samples, "num_samples")  # unused by the probit, refused all the same
    if link == "probit":
        score = _probit_scores(mean, cov.unsqueeze(0))
        return torch.softmax(score, -1).to(mean.dtype), torch.log_softmax(score, -1)
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"the logit covariance is not finite (largest variance {float(cov.diagonal(dim1=-2, dim2=-1).max()):.3g}"
                         f" in {cov.dtype}): a prior precision this small overflows the posterior covariance; use a "
                         "larger one (or link='probit', whose limit is the uniform predictive)")
    # softmax ignores a shift of every logit, so that direction is left out before the root, in float64: a head whose
    # rows move together (bounded by the prior alone) would otherwise swamp the other variances in rounding
    c = cov.shape[-1]
    center = torch.eye(c, dtype=torch.double, device=cov.device) - 1.0 / c
    w, q = torch.linalg.eigh(center @ cov.double() @ center)
    # the symmetric root (centred cov = root root^T): a draw does not hinge on the eigenvectors eigh picks
    root = ((q * w.clamp(min=0).sqrt().unsqueeze(-2)) @ q.mT).to(mean.dtype)
    z = torch.randn(num_samples, *mean.shape, 1, dtype=mean.dtype, generator=generator,
                    device=mean.device if generator is None else generator.device).to(mean.device)
    f = mean + (root @ z).squeeze(-1)
    return torch.softmax(f, -1), torch.log_softmax(f.double(), -1)


def _check_gaussians(mean, cov, desc):
    """Refuse logits that are nan or ``+inf`` and a covariance with a nan among the real choices (``-inf`` marks a
    missing choice): neither is the overflow of a small prior precision, which the predictive handles."""
    bad = torch.isnan(mean) | torch.isposinf(mean)
    if bool(bad.any()):
        raise ValueError(f"{desc}: the model's logits are not finite ({int(bad.sum())} of {mean.numel()} are nan or +inf, in "
                         f"{mean.dtype}): its forward pass overflowed (a float16 base?) or its inputs are broken; the GLM "
                         "predictive needs finite logits")
    real = ~torch.isneginf(mean)
    nan = torch.isnan(cov) & real.unsqueeze(-1) & real.unsqueeze(-2)
    if bool(nan.any()):
        raise ValueError(f"{desc}: the logit covariance holds nan ({int(nan.sum())} entries among the real choices): the "
                         "posterior or the Jacobians are broken (a nan prior precision or curvature?); refit the guide")


def _probit_draws(mean, cov, num_samples, generator):
    """``glm_probs(mean, cov, "mc", ...)`` flattened to ``[S K, N, C]``, or ``None`` where the covariance overflows the
    float32 draws (not finite, or a root beyond float32: a nan probability otherwise)."""
    if not bool(torch.isfinite(cov).all()):
        return None
    p = glm_probs(mean, cov, "mc", num_samples, generator).reshape(-1, *mean.shape[-2:])
    return p if bool(torch.isfinite(p).all()) else None


# the probit's departure from the GLM predictive is checked against this many logit draws per example, on the first
# PROBIT_CHECK_EXAMPLES examples of a call of at most PROBIT_CHECK_CLASSES classes (the draws cost S C^2 per example);
# a gap beyond PROBIT_GAP is warned of (the draws' own error on a probability is at most 0.5 / sqrt(1000) = 0.016)
PROBIT_CHECK_DRAWS, PROBIT_CHECK_EXAMPLES, PROBIT_CHECK_CLASSES, PROBIT_GAP = 1000, 256, 64, 0.1


def _probit_drift(mean, cov, probs, generator, drift):
    """Add to ``drift`` (examples checked, examples whose probit ``probs`` ``[N, C]`` are more than :data:`PROBIT_GAP`
    from :data:`PROBIT_CHECK_DRAWS` logit draws of the same Gaussians, the largest gap) this batch's count, up to
    :data:`PROBIT_CHECK_EXAMPLES` examples in all; more than :data:`PROBIT_CHECK_CLASSES` classes, and a covariance the
    draws cannot hold (:func:`_probit_draws`: the probit's limit there is the uniform predictive), are passed over."""
    room = PROBIT_CHECK_EXAMPLES - drift[0]
    if room <= 0 or mean.shape[-1] > PROBIT_CHECK_CLASSES:
        return
    drawn = _probit_draws(mean[..., :room, :], cov[..., :room, :, :], PROBIT_CHECK_DRAWS, generator)
    if drawn is None:
        return
    gap = (drawn.mean(0) - probs[:room]).abs().amax(-1)  # [N]
    drift[0] += gap.numel()
    drift[1] += int((gap > PROBIT_GAP).sum())
    drift[2] = max(drift[2], float(gap.max()))


def glm_predict(data, logits_of, observed, link="probit", num_samples=100, keep_samples=False, progress=False,
                desc="GLM predict", ready=None, guide=None) -> Prediction:
    """The GLM predictive ``p(y | x) = E_{f ~ N(mean, cov)} softmax(f)`` over ``data``, what Laplace's and last-layer
    Laplace's ``predict_glm`` share: ``logits_of(batch) -> (mean [N, C], cov [N, C, C])``, ``observed(batch)`` the
    labels (not asked of a batch without: unlabelled data gives ``labels`` ``None``, as :func:`~pyro_lora.predict`);
    ``ready()`` (the guide's own checks) runs after the arguments are checked, before any batch, in
    :func:`~pyro_lora.contract.entry_checks` of ``guide`` (the guide whose posterior ``logits_of`` reads) where one is
    given: under ``torch.distributed`` every rank scores the whole data, so a rank holding another network or guide
    would return its own predictive, and the ranks are compared first. A uniform mixture of
    ``K`` Gaussians per example (mean ``[K, N, C]``, cov ``[K, N, C, C]``) averages the ``K`` predictives; its draws
    with ``keep_samples`` are ``[S K, N, C]``. The ``"mc"`` link's logit draws come from a CPU generator seeded by one
    draw of the global RNG (reproducible under ``torch.manual_seed``), rank 0's under ``torch.distributed``, so every
    rank returns one predictive; they are each example's own, taken in the data's order, so unlike
    :func:`~pyro_lora.predict`'s weight draws (shared by every example) an example's estimate moves with its place in
    the data (batching, order) within its Monte Carlo error. With the probit link, ``keep_samples`` keeps ``num_samples`` logit
    draws of the same Gaussians (what the mutual information needs; from a CPU generator of their own, seeded 0 per
    call) while ``probs`` stay the probit's; where a covariance overflows them (not finite, or a variance beyond
    float32's range squared) it keeps none (``sample_probs`` None) and warns. ``log_probs`` is the float64 log of the
    same predictive, computed before any float32 rounding: the probit's float64 ``log_softmax``, or the logsumexp of the
    draws' float64 ``log_softmax`` minus ``log(S K)``. The probit is compared with :data:`PROBIT_CHECK_DRAWS` logit draws
    of the same Gaussians per example (a CPU generator of their own, seeded 0; :func:`_probit_drift`'s examples), and a
    probability more than :data:`PROBIT_GAP` away from theirs is warned of: with a large, anisotropic logit covariance
    (a small prior precision) the probit flattens the predictive, with many classes it understates the top one, and
    ``link="mc"`` follows it. ``seconds`` leaves that check out.

    :raises ValueError: for settings that differ across ranks (under ``torch.distributed``, on every rank, first);
        on an unknown ``link``, ``num_samples`` not a positive integer, empty ``data`` (or a
        ``DataLoader`` dropping its last incomplete batch), logits that
        are nan or ``+inf``, a covariance with a nan, a predictive that is not finite (an overflowing covariance), or
        labelled batches mixed with unlabelled ones.
    """
    settings = {"link": link, "num_samples": num_samples, "keep_samples": keep_samples}
    # every check inside the block: one that refuses on some ranks only (a loader dropping its last batch there) is
    # raised on every rank, not left for the others to meet in the next collective
    with entry_checks(guide.model, guide, "predict") if guide is not None else distributed.refused_together("predict"):
        distributed.check_settings("predict_glm", settings)  # first: it decides which collectives follow
        if link not in ("probit", "mc"):
            raise ValueError(f"link must be 'probit' or 'mc', got {link!r}")
        num_samples = check_count(num_samples, "num_samples")
        check_every_example(data, desc)
        if ready is not None:
            ready()
    if distributed.is_distributed():  # every rank predicts the whole data: a rank's part, or its own data, is refused
        data = fixed_batches(data, desc)
    start = time.perf_counter()
    probs, logs, draws, labels = [], [], [], []
    # logit draws come from a CPU generator of their own: the same on every device. The probit's (for the MI) are
    # seeded 0 and leave the global RNG alone; "mc"'s by one draw of the global RNG (reproducible under
    # torch.manual_seed, fresh each call), rank 0's under torch.distributed, where every rank scores the whole data
    # and so must return one predictive (predict's broadcast seed)
    if link == "mc":
        seed = distributed.broadcast_parameters([torch.randint(SEED_RANGE, ())])[0]
        generator = torch.Generator().manual_seed(int(seed))
    else:
        generator = torch.Generator().manual_seed(0) if keep_samples else None
    overflow, drift, checking = None, [0, 0, 0.0], 0.0  # examples checked, examples off, largest gap; its seconds
    checks = torch.Generator().manual_seed(0) if link == "probit" else None
    for batch in progress_bar(data, desc=desc, disable=not progress, dynamic_ncols=True):
        y = batch_labels(observed, batch, labels, desc)  # None for an unlabelled batch: the predictive needs none
        mean, cov = logits_of(batch)
        mean = mean.float()
        _check_gaussians(mean, cov, desc)
        # a mixture's components: equal weights
        p, log_p = (x.reshape(-1, *mean.shape[-2:]) for x in _glm_probs(mean, cov, link, num_samples, generator))
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"{desc}: the predictive is not finite (largest logit variance {float(cov.diagonal(dim1=-2, dim2=-1).max()):.3g}"
                f" in {cov.dtype}): a prior precision this small overflows the posterior covariance; use a larger one"
            )
        probs.append(p.mean(0))
        if checks is not None:
            tick = time.perf_counter()
            _probit_drift(mean, cov, probs[-1], checks, drift)
            checking += time.perf_counter() - tick
        logs.append(torch.logsumexp(log_p, 0) - math.log(log_p.shape[0]))
        if keep_samples and overflow is None:
            drawn = p if link == "mc" else _probit_draws(mean, cov, num_samples, generator)
            if drawn is None:
                overflow = float(cov.diagonal(dim1=-2, dim2=-1).max())  # the probit copes (uniform); draws cannot
            else:
                draws.append(drawn)
        labels.append(None if y is None else check_labels(y, p.shape[-2], p.shape[-1]))
    if not probs:
        raise ValueError("predict_glm got no batches: the data is empty")
    if drift[1]:
        warnings.warn(f"{desc}: the probit link's probabilities are up to {drift[2]:.2f} from {PROBIT_CHECK_DRAWS} draws of "
                      f"the same logit Gaussians on {drift[1]} of the {drift[0]} examples checked (more than {PROBIT_GAP}):"
                      " the probit departs from the GLM predictive (flattening it where the logit covariance is large "
                      "and anisotropic, a small prior precision; understating the top class among many); link='mc' "
                      "follows it", stacklevel=user_stacklevel())
    if overflow is not None:
        warnings.warn(f"{desc}: the logit covariance (largest variance {overflow:.3g}) overflows float32 logit draws: the "
                      "probit predictive is kept, but no logit draws, so its mutual information is n/a; a larger prior "
                      "precision avoids this", stacklevel=user_stacklevel())
    width = max(p.shape[-1] for p in probs)

    def pad(parts, value=0.0):  # batches of fewer choices get columns of probability 0 (log-probability -inf)
        return torch.cat([pad_choices(p, width, value) for p in parts], -2).cpu()

    kept = keep_samples and overflow is None
    labels = None if labels[0] is None else torch.cat(labels).cpu()  # unlabelled data: none, as predict's
    return Prediction(probs=pad(probs), labels=labels, sample_probs=pad(draws) if kept else None,
                      seconds=time.perf_counter() - start - checking, log_probs=pad(logs, -math.inf))


def grid_nll_glm(model, sites: dict, factors, data, grid: torch.Tensor, progress: bool = False) -> list[float]:
    """Mean NLL over ``data`` of the GLM probit predictive at each of the ``G`` prior precisions ``grid``
    (one shared ``lambda``), in one pass: the Jacobians do not depend on ``lambda``.

    :raises ValueError: on empty ``data``.
    """
    lams = [grid[:, None].expand(-1, f.prior_precision.numel()) for f in factors]
    return grid_nll(model, data, grid.numel(), lambda batch: probit(*glm_batch(model, sites, factors, batch, lams)), progress)


def grid_nll(model, data, size: int, probs_of, progress: bool = False) -> list[float]:
    """Mean NLL over ``data`` of ``size`` predictives at once: ``probs_of(batch) -> [size, N, C]`` (e.g. one per
    prior precision of a grid), the labels by ``model.likelihood``.

    :raises ValueError: on empty ``data``.
    """
    total, count = torch.zeros(size, dtype=torch.double), 0
    for batch in progress_bar(data, desc="val NLL grid", disable=not progress, dynamic_ncols=True):
        batch = to_device(batch, model.device)
        labels = model.likelihood.observed(batch)
        probs = probs_of(batch)  # [G, N, C]
        labels = check_labels(labels, probs.shape[-2], probs.shape[-1]).to(probs.device)
        p_true = probs.gather(-1, labels.expand(size, -1).unsqueeze(-1))
        total -= p_true.clamp(min=1e-12).log().sum((-1, -2)).double().cpu()
        count += labels.shape[0]
    if count == 0:
        raise ValueError("val_loader is empty")
    return (total / count).tolist()
