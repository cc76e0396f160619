"""The method registry: every method of ``pyro-lora compare``, ``fit`` and ``evaluate`` is one decorated recipe.

A recipe turns the shared, trained MAP (a *setup*, :class:`pyro_lora.experiments.setup.Setup`) into a
:class:`Fitted` method; its metadata says what the application layer needs to know about it, so no code
switches on method names::

    @method("meanfield", bayesian=True, guide=MeanFieldGuide, exportable=True)
    def meanfield(setup):
        model = setup.lora_model(random="AB")
        return setup.svi(model, MeanFieldGuide(model))

A new method is its guide file, one recipe and one export line in :mod:`pyro_lora.guides`.
"""

import importlib.util
import math
import numbers
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from importlib.metadata import entry_points

import torch

from pyro_lora.likelihoods import MC_FORMATS
from pyro_lora.model import LoraModel
from pyro_lora.predictive import Prediction, predict

from .base import LoraGuide

TASKS = ("classification", "multiple_choice")
# what a method was given besides the training split: the two settings a table must not mix
NO_VALIDATION, VALIDATION_TUNED = "no validation data", "validation-tuned"


@dataclass
class Fitted:
    """A fitted method: ``predict(records) -> Prediction``, and the numbers its posterior adds to its point estimate.

    ``predict`` may be left out when ``guide`` is given: the method's registered predictive then scores the guide.
    """

    predict: Optional[Callable] = None
    guide: object = None
    extra_parameters: int = 0
    note: Optional[str] = None  # what a reader of its rows must know (e.g. temperature scaling fell back to T = 1)
    # one set of weights (MAP, zero-shot, temperature scaling): its mutual information is exactly 0, not missing.
    # None: the guide's ``deterministic`` (False without a guide)
    point_estimate: Optional[bool] = None
    # the shared MAP itself: its fit time is the MAP's training (which every other method starts from, uncounted)
    is_map: bool = False
    # the fit time of the method it starts from (``Setup.base_fit``), counted in its own
    inherited_seconds: float = 0.0
    # what the recipe chose, kept in its rows (results.json): temperature scaling's ``temperature``, a validation-tuned
    # ``prior_precision``, ``sigma_q`` or ``posterior_temperature`` (a variant replaces, never mutates, its base's dict)
    chosen: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.point_estimate is None:
            self.point_estimate = bool(getattr(self.guide, "deterministic", False))
        self.extra_parameters = _count(self.extra_parameters)


def _count(value) -> int:
    """``value`` as a Python int (a numpy integer or a tensor is no JSON), for ``Fitted.extra_parameters``: a whole
    number >= 0 (an int, a numpy integer, a one-element integer tensor, a float such as 3.0); -5 and 2.5 were printed
    as counts, and a truth value is none."""
    try:
        count = operator.index(value)
    except TypeError:
        whole = isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()
        count = int(value) if whole else None
    boolean = isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool)
    if boolean or count is None or count < 0:
        raise ValueError(f"Fitted.extra_parameters must be a whole number >= 0 (the numbers the method's posterior adds "
                         f"to its point estimate), got {value!r}")
    return count


def join_notes(*notes) -> Optional[str]:
    """The notes given, ``None`` ones left out, joined by ``"; "`` (``None`` where none is left)."""
    return "; ".join(n for n in notes if n) or None


def weight_samples(guide, loader, num_samples: int) -> Prediction:
    """The default predictive: ``S = num_samples`` weight draws of ``guide``, probabilities averaged."""
    return predict(guide.model, guide, loader, num_samples=num_samples, keep_samples=True)


@dataclass(frozen=True)
class Method:
    """One registered method (see :func:`method` for the fields)."""

    name: str
    recipe: Callable
    bayesian: bool
    tasks: tuple
    guide: Optional[type]
    model: type
    exportable: bool
    predictive: Callable
    likelihood: Optional[Callable]
    validation: bool = False
    ts: bool = True
    requires: tuple = ()
    base: Optional[str] = None
    mc_formats: tuple = MC_FORMATS
    trains: bool = False
    float16: bool = True
    tempered: bool = False
    version: int = 1

    @property
    def missing(self) -> list:
        """The packages of :attr:`requires` (``(module, pip name)``) that are not installed: their pip names."""
        return [package for module, package in self.requires if importlib.util.find_spec(module) is None]

    @property
    def saveable(self) -> bool:
        """Whether ``pyro-lora fit`` can save it: it has a guide."""
        return self.guide is not None

    @property
    def draws_weights(self) -> bool:
        """Whether its rows average weight samples drawn under the run's seed (the default predictive of a posterior):
        what compare's one draw for every evaluation set changed (:data:`~pyro_lora.experiments.results.PREDICT_SEEDING`)."""
        return self.bayesian and self.predictive is weight_samples

    @property
    def lineage(self) -> list:
        """This method and the methods its recipe runs first: its base, the base's base, ...

        :raises ValueError: for a base that is not registered, or a chain of bases that returns to a method.
        """
        chain, m = [self], self
        while m.base is not None:
            if m.base not in METHODS:
                raise ValueError(f"method {self.name!r} starts from the method {m.base!r}, which is not registered; "
                                 f"registered: {', '.join(METHODS)}")
            m = METHODS[m.base]
            if m in chain:
                raise ValueError(f"method {self.name!r}: its bases return to {m.name!r}")
            chain.append(m)
        return chain

    @property
    def needs_training(self) -> bool:
        """Whether its recipe, or one it starts from (:attr:`lineage`), trains for the run's epochs (:attr:`trains`)."""
        return any(m.trains for m in self.lineage)

    @property
    def setting(self) -> str:
        """:data:`VALIDATION_TUNED` where the recipe fits anything on the validation split, else :data:`NO_VALIDATION`."""
        return VALIDATION_TUNED if self.validation else NO_VALIDATION

    @property
    def summary(self) -> str:
        """The first sentence of the recipe's docstring, on one line (its first line cut some mid-sentence)."""
        paragraph = " ".join((self.recipe.__doc__ or self.name).strip().split("\n\n")[0].split()).replace("``", "`")
        return re.split(r"(?<=[.!?])\s+(?=[A-Z`(])", paragraph, maxsplit=1)[0]

    def extra_parameters(self, guide) -> int:
        """What its rows count as ``+params`` for its fitted ``guide``: the guide's own numbers, and the posterior
        temperature its recipe fitted (:attr:`tempered`); ``fit`` and ``evaluate`` count alike."""
        return guide.extra_parameters() + int(self.tempered)

    def task_likelihood(self, likelihood):
        """The task's likelihood as this method's model needs it."""
        return likelihood if self.likelihood is None else self.likelihood(likelihood)


METHODS: dict = {}  # name -> Method, in registration order (the order of compare's table)
MODELS: dict = {}  # a model class's registered name (its ``name`` attribute) -> the class, for run records


def method(name: str, *, bayesian: bool, tasks: tuple = TASKS, guide: Optional[type] = None, model: type = LoraModel,
           exportable: bool = False, predictive: Callable = weight_samples, likelihood: Optional[Callable] = None,
           validation: bool = False, ts: bool = True, requires: tuple = (), base: Optional[str] = None,
           mc_formats: tuple = MC_FORMATS, trains: bool = False, float16: bool = True, tempered: bool = False,
           version: int = 1):
    """Register the decorated recipe ``recipe(setup) -> Fitted`` as method ``name``.

    :param bayesian: whether it is a posterior (or an ensemble), not a point estimate or a recalibration.
    :param tasks: the dataset tasks it applies to (``"classification"``, ``"multiple_choice"``).
    :param guide: the :class:`~pyro_lora.guides.LoraGuide` subclass its :class:`Fitted` holds, which ``fit`` saves;
        ``None``: nothing to save (``compare`` reports it, ``fit`` refuses it).
    :param model: the :class:`~pyro_lora.LoraModel` class (or subclass) of its guide's model; run records name it
        by its ``name`` attribute, and ``evaluate`` rebuilds it with its ``restore`` classmethod.
    :param exportable: whether the guide's mean is a plain LoRA (A, B), which a peft adapter holds.
    :param predictive: ``predictive(guide, loader, num_samples) -> Prediction``, the predictive its rows report;
        run records name it by its ``__name__``.
    :param likelihood: ``likelihood(task_likelihood) -> likelihood``, where its model needs another form of the
        task's likelihood (e.g. one forward per batch for KFAC).
    :param validation: whether its recipe fits anything on the validation split (temperature scaling, a prior
        precision or posterior temperature chosen by validation NLL): the table names such methods
        "validation-tuned", the others "no validation data".
    :param requires: ``(module, pip name)`` pairs of optional packages its recipe needs: without them ``compare``
        leaves it out of its default methods and refuses it by name, before loading anything.
    :param ts: whether ``compare`` adds its ``+ts`` row (a temperature fitted on the validation split on its
        averaged predictive); False where that row would repeat another (``map+ts`` is the ``temperature`` row).
    :param base: the method whose fit under the same seed the recipe starts from (a validation-tuned variant tunes
        its base's posterior): the recipe takes it from ``setup.base_fit()``, and ``compare`` keeps that fit, with the
        network as the fit left it, for the variant when both run.
    :param trains: its recipe trains for the run's epochs (SVI, ensemble members, its own LoRA): ``compare`` refuses
        it, and leaves it out of its defaults, with ``epochs=0``; a method with a ``base`` that trains is refused too.
    :param mc_formats: the multiple-choice formats it applies to (``"letter"``, ``"cloze"``): ``compare`` leaves it
        out of its default methods for another format and refuses it by name, before loading anything.
    :param float16: whether its recipe runs on a float16 base (``--dtype fp16``): ``compare`` refuses it, and leaves
        it out of its defaults, there (IVON has no loss scaling).
    :param tempered: its recipe fits its guide's posterior temperature (:func:`~pyro_lora.guides.tuning.tempered_fit`),
        a number the guide's ``extra_parameters`` leaves out: its rows count it (:meth:`Method.extra_parameters`).
    :param version: raise it (an integer from 1) with every change that gives other rows under the same seed: its
        rows record it (``method_version``; a row without one is 1), and a resumed or updated run reruns the rows of
        another version rather than average them with the new ones (:func:`~pyro_lora.experiments.results.is_complete`).
        A variant whose ``base`` changed raises its own too.
    :raises ValueError: for a name already registered, or a model class whose ``name`` another class holds.
    """
    if not mc_formats or any(f not in MC_FORMATS for f in mc_formats):
        raise ValueError(f"method {name!r}: mc_formats {mc_formats!r} must be a non-empty subset of {MC_FORMATS}")
    if not (isinstance(name, str) and name.isidentifier() and name.isascii()):
        raise ValueError(f"method name {name!r} must be a Python identifier (letters, digits, _): it names files and flags")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].recipe.__module__})")
    if not all(isinstance(flag, bool) for flag in (bayesian, exportable, validation, ts, trains, float16, tempered)):
        raise ValueError(f"method {name!r}: bayesian, exportable, validation, ts, trains, float16 and tempered are True or False")
    if type(version) is not int or version < 1:
        raise ValueError(f"method {name!r}: version={version!r} must be an integer from 1")
    if base is not None and (not isinstance(base, str) or base == name):
        raise ValueError(f"method {name!r}: base={base!r} must name another method")
    if guide is not None and not (isinstance(guide, type) and issubclass(guide, LoraGuide)):
        raise ValueError(f"method {name!r}: guide={guide!r} is no LoraGuide subclass (None: nothing to save)")
    if exportable and guide is None:
        raise ValueError(f"method {name!r}: exportable needs the guide whose mean is exported")
    if not callable(predictive) or (likelihood is not None and not callable(likelihood)):
        raise ValueError(f"method {name!r}: predictive (and likelihood, if given) must be functions")
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"method {name!r}: tasks {tasks!r} must be a non-empty subset of {TASKS}")
    if MODELS.get(model.name, model) is not model:
        raise ValueError(f"model class {model.__qualname__} has the name {model.name!r} of {MODELS[model.name].__qualname__}: "
                         "give it a name of its own")

    def register(recipe):
        if name in METHODS:  # two decorators made before either was applied
            raise ValueError(f"method {name!r} is already registered ({METHODS[name].recipe.__module__})")
        MODELS[model.name] = model
        METHODS[name] = Method(name, recipe, bayesian, tuple(tasks), guide, model, exportable, predictive, likelihood,
                               validation, ts, tuple(requires), base, tuple(mc_formats), trains, float16,
                               tempered, version)
        return recipe

    return register


def load_plugins(group: str = "pyro_lora.methods"):
    """Import the modules that installed packages name under the entry-point ``group``: their ``@method``
    recipes register (the command line calls this first). In a package's ``setup.cfg``::

        [options.entry_points]
        pyro_lora.methods =
            jitter = mypackage.jitter
    """
    for entry in entry_points(group=group):
        entry.load()


def get_method(name: str) -> Method:
    """The registered method ``name``.

    :raises ValueError: naming the registered methods, if there is none of that name.
    """
    if name not in METHODS:
        raise ValueError(f"unknown guide {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


def methods_for_task(task: str, mc_format: Optional[str] = None, epochs: Optional[int] = None,
                     dtype: Optional[str] = None) -> list:
    """The names of the registered methods that apply to a dataset task (``meta.json``'s ``task``), to its
    multiple-choice format where it has one (``mc_format``; ``None``: any), to ``epochs=0`` where given (no method
    that trains), to a float16 base where ``dtype`` is ``"fp16"`` (:attr:`Method.float16`), and whose optional
    packages are installed (:attr:`Method.missing`); so must every method of its :attr:`~Method.lineage`."""
    def applies(m):
        return (task in m.tasks and not m.missing and not (epochs == 0 and m.trains) and (dtype != "fp16" or m.float16)
                and (task != "multiple_choice" or mc_format is None or mc_format in m.mc_formats))

    def chain(m):
        try:
            return m.lineage
        except ValueError:
            return None  # an unknown base: refused by name where it is asked for, never run by default

    return [name for name, m in METHODS.items() if chain(m) is not None and all(map(applies, chain(m)))]
