"""MAP: a point estimate of every LoRA site, i.e. plain LoRA fine-tuning through the Pyro model; and the two
baselines without a posterior that every table holds beside it: zero-shot and temperature scaling."""

import pyro.distributions as dist
import torch

from pyro_lora.calibration import fit_temperature, scale_prediction
from pyro_lora.checks import check_count
from pyro_lora.likelihoods import SequenceClassification
from pyro_lora.predictive import predict

from .base import LoraGuide
from .registry import Fitted, method


class MAPGuide(LoraGuide):
    """``q(theta) = delta(theta - theta_MAP)``; SVI with it maximises ``log p(D | theta) + log p(theta)``.

    :param model: the :class:`~pyro_lora.LoraModel`.
    :param dict init: site -> initial value (``site.shape``); defaults to the adapter's current weights,
        never zeros (A = B = 0 is a saddle).
    """

    deterministic = True

    def __init__(self, model, init=None):
        super().__init__(model)
        init = model.initial_values(init)
        self.locs = torch.nn.ParameterList([torch.nn.Parameter(init[name].detach().clone().float()) for name in self.sites])

    def posterior(self):
        return {name: dist.Delta(loc, event_dim=loc.dim()) for name, loc in zip(self.sites, self.locs)}

    def sample(self, num_samples):
        num_samples = check_count(num_samples, "num_samples")
        return {name: loc.expand(num_samples, *loc.shape) for name, loc in zip(self.sites, self.locs)}

    def mean(self):
        return dict(zip(self.sites, self.locs))


@method("zeroshot", bayesian=False, tasks=("multiple_choice",))
def zeroshot(setup):
    """The base model without its adapter, needing a causal LM: the row every fine-tuned method must beat."""
    if isinstance(setup.likelihood, SequenceClassification):
        raise ValueError("zeroshot needs a causal LM: an encoder's classification head is untrained without fine-tuning")

    def run(records):
        with setup.net.disable_adapter():
            return predict(setup.model, None, setup.loader(records), keep_samples=True)

    return Fitted(run, point_estimate=True)


@method("map", bayesian=False, guide=MAPGuide, exportable=True, ts=False)
def map_estimate(setup):
    """Plain LoRA fine-tuning (the MAP every other method starts from)."""
    return Fitted(guide=setup.map_guide, is_map=True)


@method("temperature", bayesian=False, validation=True, ts=False)
def temperature(setup):
    """Temperature scaling of the MAP, fitted on the validation split: the cheap non-Bayesian baseline. ``T`` is fitted
    on, and applied to, the predictive's float64 log-probabilities (``Prediction.log_probs``), not its float32
    probabilities, whose zeros no temperature moves.

    When the fit has no optimum inside its bounds (e.g. a validation split the MAP gets all right), the note
    of :func:`~pyro_lora.calibration.fit_temperature` goes into the method's rows (Guo et al., 2017).
    """
    val = predict(setup.model, setup.map_guide, setup.loader(setup.val))
    # from the exact float64 log-probabilities: float32 probabilities hold a 0 for a choice 103 nats behind, which no T moves
    t, note = fit_temperature(val.log_probs, val.labels, kind="logits", return_info=True)

    def run(records):
        return scale_prediction(predict(setup.model, setup.map_guide, setup.loader(records)), t)

    return Fitted(run, None, 1, note, point_estimate=True, chosen={"temperature": t})
