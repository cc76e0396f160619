"""ScalaBL: a diagonal Gaussian over the log singular values of each LoRA ``A``, trained with SVI.

``q(z) = N(m, diag(sigma^2))`` over the ``[L, 1, r]`` log-scale sites of a :class:`~pyro_lora.ScalaBLModel`
(``exp(z)`` scales ``A``'s rows, its singular directions at the rotation); ``A`` and ``B`` are point estimates trained
alongside, so the rows drift from orthogonal. The KL
to the model's ``N(0, prior^2)`` is closed form under :class:`~pyro.infer.TraceMeanField_ELBO`.
"""

from pyro_lora.contract import check_model
from pyro_lora.scalabl import ScalaBLModel

from .meanfield import MeanFieldGuide, prior_variance
from .registry import method
from .tuning import tempered_fit


class ScalaBLGuide(MeanFieldGuide):
    r"""
    ScalaBL's posterior: ``q(z_{l,i}) = N(m_{l,i}, sigma_{l,i}^2)`` for each layer ``l`` and rank direction
    ``i``; ``z = 0`` (the mean at initialisation) is the LoRA as trained. ``r`` random numbers per layer,
    so the stochastic part costs one ``[B, T, r]`` elementwise product per layer.

    A mean-field Gaussian restricted to the subspace: the parametrisation (std, its learning-rate scale)
    is :class:`MeanFieldGuide`'s; the initial std is ``init_scale`` times the prior's std.

    Example::

        model = ScalaBLModel(net, SequenceClassification(), prior=1.0, num_data=len(train))
        guide = ScalaBLGuide(model)
        fit(model, guide, loader, epochs=3, lr=1e-3, elbo=TraceMeanField_ELBO())
        predict(model, guide, test_loader, num_samples=8)

    :param model: a :class:`~pyro_lora.ScalaBLModel` (every site an ``S`` site).
    :param str std: ``"softplus"`` or ``"square"``.
    :param float init_scale: initial std relative to the prior's std.
    :param float std_lr_scale: how fast Adam moves the stds relative to the means.
    :param dict init: site -> initial mean ``[L, 1, r]``; default zero.
    :param float temperature: the posterior temperature (:class:`MeanFieldGuide`'s).
    """

    def __init__(self, model, std="softplus", init_scale=0.1, std_lr_scale=10.0, init=None, temperature=1.0):
        check_model(model, "build ScalaBLGuide")  # before its sites are read
        other = [n for n, s in model.sites.items() if s.matrix != "S"]
        if other:
            raise ValueError(
                f"ScalaBLGuide needs a ScalaBLModel, whose sites are all log-scale (S) sites; got {other}: "
                "build the model with pyro_lora.ScalaBLModel(net, likelihood, ...)"
            )
        super().__init__(model, std=std, init_scale=init_scale, std_lr_scale=std_lr_scale, init=init, temperature=temperature)

    def _initial_std(self, model, name, loc):
        """``init_scale *`` the prior's std, whatever ``init``: a log scale's size says nothing about its spread (the
        mean-field rule, relative to the mean's RMS, gave a warm start a hundredfold narrower posterior)."""
        prior = prior_variance(model, self.sites[name], type(self).__name__).sqrt().to(loc)
        return (self.init_scale * prior).expand_as(loc)

    def extra_parameters(self):
        """Means and stds of the ``z`` sites: all this guide adds to a point-estimate LoRA."""
        return 2 * sum(loc.numel() for loc in self.locs)

    def config(self):
        return {"std": self.std, "init_scale": self.init_scale, "std_lr_scale": self.std_lr_scale, "temperature": self.temperature}


@method("scalabl", bayesian=True, guide=ScalaBLGuide, model=ScalaBLModel, trains=True)
def scalabl(setup):
    """ScalaBL: the MAP rotated to A's singular basis, a Gaussian over A's log singular values, SVI with A and B."""
    setup.restore()
    model = ScalaBLModel(setup.net, setup.likelihood, num_data=len(setup.train), prior=setup.config.prior_scale)
    return setup.svi(model, ScalaBLGuide(model))


@method("scalabl_val", bayesian=True, guide=ScalaBLGuide, model=ScalaBLModel, validation=True, base="scalabl", tempered=True)
def scalabl_val(setup):
    """ScalaBL with a posterior temperature chosen by validation NLL (every std times sqrt(T))."""
    return tempered_fit(setup)
