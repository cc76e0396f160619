"""Which guide left the network's point parameters (a trained head, non-random LoRA matrices) as they are.

They are shared by every guide over the network, and each guide's predictions rely on their values as it left
them: the guide that trains them last owns them (:func:`take_over`), and what it leaves is kept as a snapshot of
sums, so that :mod:`pyro_lora.contract` refuses any other guide once they changed under it. A guide trained by
``fit`` hands over explicitly; one trained by Pyro's own ``SVI`` is followed: its steps are told apart from any
other change through torch's global optimiser step hooks (:func:`follow_svi_step`), and each step goes to the guide
whose call the backward pass before it went through (:func:`note_forward`).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import NamedTuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


def point_snapshot(model, values: dict | None = None) -> dict:
    """Name -> :func:`value_sums` of the network's point parameters (a trained head, non-random LoRA matrices): what a guide's predictions rely on besides its own sites. ``values`` (name ->
    tensor) stand in for the network's own (an ensemble member's head). An entry a step of Pyro's SVI adopted is
    left on its device as a ``[3]`` tensor (no host read in the step) until compared (:func:`_settle`)."""
    named = [(n, (values or {}).get(n, p)) for n, p in model.named_adapter_parameters()]
    sums = value_sums(p for _, p in named)
    return {n: sums[id(p)] for n, p in named}


def value_sums(params, lazy=False) -> dict:
    """``id(p)`` -> three integers of each of ``params``: the sums of its values' bits (as float32: a lossless cast, to
    float64, changes nothing), of the bits times their position, and of a hash of both, which any change of a value,
    and a permutation (a head's rows swapped, as another label order), changes. One host read per device (each read
    waits for the GPU); ``lazy``: none, each a ``[3]`` int64 tensor on its device. Integer sums are exact, so a
    tensor's are the same however the tensors are batched (one stack per size: a few kernels a call, not a few per
    tensor)."""
    by_device = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    out = {}
    for group in by_device.values():
        rows = _bit_sums(group)
        out.update({id(p): row if lazy else tuple(row) for p, row in zip(group, rows.unbind(0) if lazy else rows.tolist())})
    return out


_WINDOW = 1 << 20  # elements reduced at once: the transient memory (about 60 bytes an element) whatever the sizes
_MASK = (1 << 62) - 1  # the sums wrap modulo 2**64 (exact whatever the order); kept apart from int64's minimum, which negation (distributed.spread) keeps
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64's, as int64


def _mixed(z):
    """splitmix64's finaliser (arithmetic shifts): each int64 to a pseudo-random one, so that structured changes do
    not cancel in a sum (a sign flip moves a float's bits by 2**31 whatever its value: a head ``[w, -w]`` with its
    rows swapped keeps the sums of bits and of bits times position)."""
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    return z ^ (z >> 31)


def _element_bits(values):
    """Each of ``values`` as an int64: a float's float32 bits (-0.0 read as 0.0, the same value), plus, for a float64
    value no float32 holds, its own bits hashed (a lossless cast changes nothing; a finer change is still seen); an
    integer's or bool's value."""
    if not values.is_floating_point():
        return values.long()
    single = values.float() + 0.0
    bits = single.view(torch.int32).long()
    if values.dtype == torch.float64:
        off = values != single.double()  # NaN too: its own bits
        bits = bits + torch.where(off, _mixed((values + 0.0).view(torch.int64)), 0)
    return bits


@torch.no_grad()
def _bit_sums(tensors) -> torch.Tensor:
    """:func:`value_sums` of ``tensors`` (one device), each read flat (:func:`_element_bits`): ``[len(tensors), 3]``
    int64. Tensors of one size and dtype are stacked and reduced together; one longer than the window is cut into
    pieces, whose sums add up to its own."""
    pieces = {}  # (size, dtype, offset) -> [(tensor index, flat piece)]
    for k, t in enumerate(tensors):
        flat = (torch.view_as_real(t) if t.is_complex() else t).reshape(-1)
        for start in range(0, max(flat.numel(), 1), _WINDOW):
            piece = flat if flat.numel() <= _WINDOW else flat[start:start + _WINDOW]
            pieces.setdefault((piece.numel(), piece.dtype, start), []).append((k, piece))
    parts = [[] for _ in tensors]
    for (n, _, start), group in pieces.items():
        pos = torch.arange(start, start + n, dtype=torch.int64, device=group[0][1].device)
        salt = pos * _GOLDEN
        per = max(1, _WINDOW // max(n, 1))
        for i in range(0, len(group), per):
            chunk = group[i:i + per]
            bits = _element_bits(torch.stack([piece for _, piece in chunk]))
            sums = torch.stack((bits.sum(1), (bits * pos).sum(1), _mixed(bits + salt).sum(1)), 1)
            for (k, _), row in zip(chunk, sums.unbind(0)):
                parts[k].append(row)
    return torch.stack([rows[0] if len(rows) == 1 else torch.stack(rows).sum(0) for rows in parts]) & _MASK


def _settle(snapshot) -> None:
    """Read the lazy entries of ``snapshot`` (:func:`point_snapshot`) to the host, in place: one read per device."""
    by_device = {}
    for n, v in snapshot.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(n)
    for names in by_device.values():
        snapshot.update(zip(names, map(tuple, torch.stack([snapshot[n] for n in names]).tolist())))


def changed_point_parameters(snapshot, model):
    """Point parameters changed since ``snapshot`` (a restore to the same values is no change). Every one is read,
    not only those whose version counter moved: an optimiser that assigns ``p.data`` (ivon-opt's IVON) leaves it."""
    _settle(snapshot)
    named = [(n, p) for n, p in model.net.named_parameters() if n in snapshot]  # also one frozen since
    sums = value_sums(p for _, p in named)
    return [n for n, p in named if sums[id(p)] != snapshot[n]]


_TRAINER = "_pyro_lora_trainer"  # on the network, which every LoraModel over it shares


class _Trainers(dict):
    """Adapter -> weakref of the guide setting its point parameters. Of this process only: a pickled network
    (``torch.save(net)``) carries none, as a weakref cannot be pickled."""

    def __reduce__(self):
        return _Trainers, ()


# id(parameter) -> (its weakref, the guide's, its name): the next optimiser step on it is that guide's
_STEPPING = {}
_OWN = {}  # id(guide parameter) -> (its weakref, the guide's): a step on it is a step of that guide's loop
_backward = weakref.WeakSet()  # guides whose parameters got a gradient since their last call: a step may follow
_own_stepped = weakref.WeakSet()  # guides a parameter of which was stepped since their last call
_hooked = weakref.WeakSet()  # guides whose parameters report their gradients (_backward) and steps (_OWN)
_hooks = []
_in_step = {}  # id(optimiser) -> ids of its parameters, while its step runs: a wrapper's (Lookahead) ends after its inner one's
# Which guides' backward passes the gradient a point parameter holds came from (note_forward): id(parameter) -> (its
# weakref, the weakrefs of those guides: one but where a loss sums two guides' or passes accumulate). The hook on a
# guide's forward output sets _through for the pass; the parameter's gradient hook (_arriving) moves it to _REACHED,
# which its next step reads (_hand_back).
_through = {}
_REACHED = {}
_arrivals = {}  # id(point parameter) -> its weakref, once its gradient hook (_arriving) is registered


def watch_steps() -> None:
    """Hook every torch optimiser's step (once per process): from a guide's building on, so that a closure step, whose
    guide call comes inside the step, is seen from its first (:func:`_before_optimizer_step`)."""
    if not _hooks:
        _hooks.extend((register_optimizer_step_pre_hook(_before_optimizer_step),
                       register_optimizer_step_post_hook(_after_optimizer_step)))


def follow_svi_step(guide) -> bool:
    """``guide`` is called in a step of Pyro's ``SVI`` (or of a loop differentiating its ELBO): the next optimiser
    step on each of the network's point parameters ends that step (Pyro's optimisers step each parameter once), and
    the values it leaves are the guide's own. Pyro does not signal a loop's end: any other change to them afterwards
    (a re-initialisation, a value written, a plain torch loop) is a change under the guide, and so is a step after a
    call with no backward pass into the guide (a validation ELBO, a trace), or after a loop that stepped the guide but
    not that parameter. Returns whether the network has such parameters (for :func:`record_fit`'s ``points``)."""
    watch_steps()
    _in_step.clear()  # no optimiser step is under way while the guide runs (one that raised never ended)
    me = weakref.ref(guide)
    trained = [p for p in guide.parameters() if p.requires_grad]
    # each parameter once: an autoguide's are the param store's, which get_param_store().load replaces
    fresh = [p for p in trained if (own := _OWN.get(id(p))) is None or own[0]() is not p or own[1]() is not guide]
    if fresh:
        _hooked.add(guide)
        for key in [k for k, (ref, owner) in _OWN.items() if ref() is None or owner() is None]:
            del _OWN[key]  # parameters of guides gone
        for p in fresh:
            p.register_post_accumulate_grad_hook(lambda _, me=me: _backward.add(me()) if me() is not None else None)
            _OWN[id(p)] = (weakref.ref(p), me)
    _backward.discard(guide)
    if guide not in _hooked:  # built with no trainable parameter: no gradient of its own to wait for
        _backward.add(guide)
    idle = guide in _own_stepped  # since the last call its loop stepped its own parameters: a step round ended
    _own_stepped.discard(guide)
    return _expect_steps(guide.model, me, idle)


def _expect_steps(model, me, idle: bool = False) -> bool:
    """The next step of each of ``model``'s point parameters is the guide ``me``'s (a weakref); ``idle``: its loop
    stepped its own parameters since its last call, so one it expected and did not step is not its loop's. Returns
    whether there is any."""
    named = model.named_point_parameters()  # trainable: a frozen one is never stepped, it would stay listed
    for n, p in named:
        ref, owner, _ = _STEPPING.get(id(p), (None, None, None))
        if idle and ref is not None and ref() is p and owner() is me():
            del _STEPPING[id(p)]  # the round stepped the guide but not this one: a later step of it is not the loop's
        else:
            _STEPPING[id(p)] = (weakref.ref(p), me, n)
    return bool(named)


def note_forward(model, output) -> None:
    """``model`` gave ``output`` with gradients on in a step of Pyro's SVI or an ELBO of one's own, after a guide's
    call (:func:`follow_svi_step`): a backward pass through ``output`` makes the next step of each point parameter it
    reaches that guide's, whichever guide runs between the pass and the step (a validation loss computed before
    ``optimizer.step()`` took the step, and the head with it, as its own). Where the gradient stepped came from
    two guides' passes (their losses summed, or backwarded in turn into one gradient), the step is that of the guide
    whose own parameters the optimiser steps with it (if one only), else, as without a pass, the last called guide's."""
    held = [(ref, me) for ref, me, _ in _STEPPING.values()
            if ref() is not None and (guide := me()) is not None
            and guide.model.net is model.net and guide.model.adapter == model.adapter]
    if not held or not output.requires_grad:
        return
    fresh = [p for p in (ref() for ref, _ in held) if (known := _arrivals.get(id(p))) is None or known() is not p]
    if fresh:
        for key in [k for k, known in _arrivals.items() if known() is None]:
            del _arrivals[key]  # parameters of networks gone
    for p in fresh:
        p.register_hook(functools.partial(_arriving, weakref.ref(p)))
        _arrivals[id(p)] = weakref.ref(p)

    def through(_):
        for ref, me in held:
            if (p := ref()) is not None:
                _through[id(p)] = (ref, _joined(_through.get(id(p)), p, me))

    output.register_hook(through)


def _joined(entry, p, *guides) -> tuple:
    """The guides of ``entry`` (an entry of ``_through`` or ``_REACHED``, if it is ``p``'s) and ``guides``, each once."""
    known = () if entry is None or entry[0]() is not p else entry[1]
    return (*(g for g in known if g not in guides), *guides)


def _arriving(ref, grad) -> None:
    """A gradient arrives at point parameter ``ref()``, to be added to the one it holds: from a pass through guides'
    calls (:func:`note_forward`) it is theirs, with those of the gradient it is added to; one from a pass through none
    (a weight penalty's own backward) added to a gradient keeps its guides, and a fresh one (after ``zero_grad``, a
    plain torch loss) is no guide's."""
    p = ref()
    entry = _through.pop(id(p), None)
    kept = _REACHED.get(id(p)) if p.grad is not None else None
    if kept is not None and not bool(p.grad.any()):  # zeroed in place since (zero_grad(set_to_none=False)): fresh
        kept = None
    if entry is not None and entry[0]() is p:
        _REACHED[id(p)] = (ref, _joined(kept, p, *entry[1]))
    elif kept is None:
        _REACHED.pop(id(p), None)


def stop_following(model) -> None:
    """Forget the steps any guide expects on ``model``'s point parameters (another guide trains them, or one is pinned)."""
    for _, p in model.named_adapter_parameters():
        _STEPPING.pop(id(p), None)


def _before_optimizer_step(optimizer, args, kwargs):
    if _REACHED:
        _refuse_fixed_posterior(optimizer)
        _hand_back(optimizer)
    if _STEPPING:  # nothing to follow (fit's own steps, a plain torch loop): no work on the step
        _in_step[id(optimizer)] = {id(p) for group in optimizer.param_groups for p in group["params"]}
    slot = "closure" if "closure" in kwargs else _closure_position(type(optimizer))
    closure = kwargs.get(slot) if isinstance(slot, str) else args[slot] if slot is not None and slot < len(args) else None
    if not callable(closure):
        return None

    def checked():  # a closure computes the gradients inside step(), after this hook: checked before any update
        loss = closure()
        if _REACHED:
            _refuse_fixed_posterior(optimizer)
        return loss

    if isinstance(slot, str):
        return args, {**kwargs, "closure": checked}
    return (*args[:slot], checked, *args[slot + 1:]), kwargs


@functools.lru_cache(maxsize=None)
def _closure_position(kind) -> int | None:
    """Where ``kind.step`` takes its ``closure`` among the arguments (``self`` at 0), ``None`` if it takes none
    (an optimiser of its own whose step reads other arguments)."""
    try:
        names = list(inspect.signature(kind.step).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("closure") if "closure" in names else None


def _refuse_fixed_posterior(optimizer) -> None:
    """Refuse a step of point parameters (the head) whose gradient came through a guide fitted at them as they were
    (``fitted_at_head``: Laplace, TFB, SWAG, IVON, an ensemble), before anything moves: the head would train under it
    while its posterior stayed the one fitted at the old head, and its predictions and evidence would mix the two
    without a word.

    :raises ValueError: naming the guide and what to do instead.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            ref, guides = _REACHED.get(id(p), (None, ()))
            if ref is None or ref() is not p or p.grad is None:
                continue
            # the guides whose ELBO's backward reached this gradient (a plain loss after their call is none of theirs)
            guide = next((g for g in (me() for me in guides) if g is not None and g.fitted_at_head), None)
            if guide is not None:
                _in_step.pop(id(optimizer), None)
                name = next((n for n, q in guide.model.named_point_parameters() if q is p), "a point parameter")
                raise ValueError(fixed_posterior_message(guide, f"this optimiser step would train {name} under it"))


def fixed_posterior_message(guide, what: str) -> str:
    """Why the network's point parameters must not train under ``guide``, a guide ``fitted_at_head``."""
    kind = type(guide).__name__
    return (f"{kind}'s posterior was fitted post hoc at the network's point parameters (the head) as they were, and "
            f"{what}, leaving the posterior at the old head: train the network with a MAPGuide (or the method's own "
            f"training), then build or fit the {kind} again")


def _hand_back(optimizer) -> None:
    """Before ``optimizer`` steps point parameters that a backward pass reached through a guide's call
    (:func:`note_forward`): the step is that guide's, whichever call came since. Where another guide's call took them
    over (run with gradients, it trained nothing yet), the head and the training record go back to the guide, and the
    other keeps the head as it is now, which the step changes under it; where the guide's own call came since (a
    validation loss of it), its gradient is still the one stepped."""
    for key in [k for k, (ref, _) in _REACHED.items() if ref() is None or k not in _STEPPING]:
        del _REACHED[key]  # nothing follows its steps any more (fit took over, a guide pinned it): no step to hand
    params = [p for group in optimizer.param_groups for p in group["params"]] if _REACHED else []
    stepped = None  # the guides whose own parameters this step moves: read once, where two guides' passes meet
    for p in params:
        ref, guides = _REACHED.pop(id(p), (None, ()))
        if len(guides) > 1:
            if stepped is None:
                stepped = [own[1] for q in params if (own := _OWN.get(id(q))) is not None and own[0]() is q]
            guides = [g for g in guides if g in stepped]
        me = guides[0] if ref is not None and ref() is p and len(guides) == 1 else None
        guide = me() if me is not None else None
        now = _STEPPING.get(id(p))
        if guide is None or now is None or now[0]() is not p:
            continue
        if now[1]() is not guide:
            take_over(guide.model, guide)
            points = _expect_steps(guide.model, me)
            if isinstance(guide, Followed):
                record_autoguide(guide.model, guide, points=points)
            else:
                record_fit(guide.model, guide, svi=True, points=points)
        _backward.add(guide)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    _in_step.pop(id(optimizer), None)
    if not _STEPPING:  # then no guide has a step to tell apart at its next call either (follow_svi_step's idle)
        return
    adopted = []  # (snapshot, name, parameter): what the step left is its guide's, read in one batch
    for group in optimizer.param_groups:
        for p in group["params"]:
            if any(id(p) in others for others in _in_step.values()):
                continue  # an inner optimiser's step: the wrapper's, still running, ends the step
            own = _OWN.get(id(p))
            if own is not None and own[0]() is p and own[1]() is not None:
                _own_stepped.add(own[1]())
            ref, guide, name = _STEPPING.get(id(p), (None, None, None))
            if ref is None:
                continue
            del _STEPPING[id(p)]
            guide = guide() if ref() is p else None
            # a guide fitted at the head never adopts a step (one through its ELBO was refused): a change under it
            if (guide is not None and guide._point_snapshot is not None and guide in _backward
                    and not guide.fitted_at_head):
                adopted.append((guide._point_snapshot, name, p))
    sums = value_sums((p for _, _, p in adopted), lazy=True)
    for snapshot, name, p in adopted:
        snapshot[name] = sums[id(p)]


def trainer(model):
    """The guide that last trained the point parameters of ``model``'s adapter in its network (``None`` if none is
    alive); per adapter, as each adapter has its own LoRA matrices and head copy."""
    ref = getattr(model.net, _TRAINER, {}).get(model.adapter)
    return ref() if ref is not None else None


def head_trainer(model):
    """The guide of the guides package whose training left the network's point parameters as they are now, if it is
    alive (``None`` once anything else changed them, e.g. a re-initialisation). A Pyro autoguide's (:class:`Followed`)
    has no mean to compare: :func:`unwritten_fit` reads what its training left."""
    owner = trainer(model)
    # it trained no point parameter of the network
    if owner is None or isinstance(owner, Followed) or not owner.model.named_point_parameters():
        return None
    snapshot = owner._point_snapshot  # None while fit trains it: the head as it is now is its own
    if snapshot is not None and changed_point_parameters(snapshot, owner.model):
        return None
    return None if _head_left_by_svi(model, owner) else owner


def head_loaded(guide) -> bool:
    """Whether the point parameters (the head) are still those ``load_guide`` restored with ``guide`` (its
    ``_loaded_head``): no guide of this process trained them, and none can be named as their trainer."""
    return guide._loaded_head is not None and not changed_point_parameters(dict(guide._loaded_head), guide.model)


_WRITTEN = "_pyro_lora_written"  # on the network: adapter -> (point snapshot, LoRA weight name -> sums), at the last write


def record_write(model) -> None:
    """``model.write_adapter`` put values into the adapter: keep the sums of its LoRA weights and the point parameters
    (the head) they were written beside (:func:`written_beside_head`)."""
    held = model.named_lora_weights()
    sums = value_sums(p for _, p in held)
    if not isinstance(getattr(model.net, _WRITTEN, None), dict):
        setattr(model.net, _WRITTEN, {})
    getattr(model.net, _WRITTEN)[model.adapter] = (point_snapshot(model), {n: sums[id(p)] for n, p in held})


def written_beside_head(model) -> bool:
    """Whether the adapter's LoRA weights hold what ``write_adapter`` last wrote, beside the point parameters (the
    head) as they are now: values paired with this head on purpose (its trainer's mean, a posterior sample), not the
    LoRA from before a training that left the head as it is (the write came after it)."""
    entry = getattr(model.net, _WRITTEN, {}).get(model.adapter)
    if entry is None:
        return False
    head, written = entry
    held = model.named_lora_weights()
    sums = value_sums(p for _, p in held)
    return ({n for n, _ in held} == written.keys() and all(sums[id(p)] == written[n] for n, p in held)
            and {n for n, _ in model.named_adapter_parameters()} == head.keys()
            and not changed_point_parameters(dict(head), model))


_FITTED = "_pyro_lora_fitted"  # on the network: adapter -> _Fitted, the last training's record (record_fit)


class _Fitted(NamedTuple):
    name: str  # the guide's class ("Pyro AutoDelta" for an autoguide)
    by: str  # what trained it: "fit", "pyro.infer.SVI"; "load_guide": what restored the head with it
    weights: dict  # LoRA weight name -> (its sums then, its trained value's; None: unknown, another)
    head: dict | None  # the point snapshot the training left (None: it trained no point parameter)
    builds_on_adapter: bool  # the trainer model's (LoraModel.builds_on_adapter)
    # SVI: the guide whose calls these are (a weakref) and (point snapshot, its mean's sums) before its first call
    guide: weakref.ref | None = None
    start: tuple | None = None
    replaced: _Fitted | None = None  # SVI: the record before its guide's first call, which stands while it trains nothing


def record_fit(model, guide, svi: bool = False, by: str = "fit", points: bool | None = None) -> None:
    """``fit`` (``svi``: a step of Pyro's SVI; ``by="load_guide"``: a load that restored the head with ``guide``)
    trained the network with ``guide``: keep, per LoRA weight its sites
    hold, the sums of the adapter's weight as it is now and of the guide's mean, and the point parameters (the head)
    its training left (:func:`unwritten_fit`); sums, not the guide, so that a guide dropped after training or a model
    over the network with other sites still sees them. A site no peft parameter holds (a LoRA-XS core, ScalaBL's z)
    away from its start is a mean no weight holds: every weight's is ``None``. In an SVI step (before it moves the
    guide: its mean then differs from the adapter's as the stepped one does) the sums stay on their device (no host
    read in the step) and the head is the guide's snapshot, which each followed step updates. ``points``: whether the
    model has point parameters, where the caller just listed them (else listed here)."""
    held = dict(model.named_lora_weights())
    with torch.no_grad():
        values = {n: v.detach() for n, v in guide.mean().items()}
    mean = model.lora_weight_values(values)
    sums = value_sums([*held.values(), *mean.values()], lazy=svi)
    record = {n: (sums[id(held[n])], sums[id(v)]) for n, v in mean.items()}
    if any(model.sites[n].kind.parameter is None and v.any() for n, v in values.items() if n in model.sites):
        record.update({n: (sums[id(p)], None) for n, p in held.items()})
    head = guide._point_snapshot if (model.named_point_parameters() if points is None else points) else None
    restore_fit(model, _Fitted(type(guide).__name__, "pyro.infer.SVI" if svi else by, record,
                               head if svi or head is None else dict(head), model.builds_on_adapter,
                               *(_svi_start(model, guide) if svi else (None, None, None))))


def _svi_start(model, guide) -> tuple:
    """``(weakref to guide, (point snapshot, its trained state), the record replaced)`` before ``guide``'s first call
    in a run of SVI calls (those its last record kept, else as they are now): a call alone trains nothing (a loss
    computed with gradients, never stepped), which :func:`_trained_nothing` tells by them, and the training recorded
    before it (a ``fit`` never written into the adapter) then stands."""
    previous = getattr(model.net, _FITTED, {}).get(model.adapter)
    # another guide's calls that trained nothing (a loss logged beside this guide's steps) are passed over: this
    # guide's run goes on, and the chain of records stays one per guide
    while previous is not None and previous.guide is not None and previous.guide() is not guide \
            and _trained_nothing(previous, model):
        previous = previous.replaced
    if previous is not None and previous.guide is not None and previous.guide() is guide:
        return previous.guide, previous.start, previous.replaced
    return weakref.ref(guide), (point_snapshot(model), _trained_state(guide, model)), previous


def _trained_state(guide, model) -> dict:
    """What ``guide`` trains, as sums: a guide of the guides package's mean per LoRA weight (the keys of
    :func:`record_fit`'s record), a followed autoguide's parameters in order."""
    if isinstance(guide, Followed):
        params = list(guide.parameters())
        sums = value_sums(params)
        return {k: sums[id(p)] for k, p in enumerate(params)}
    own = getattr(guide, "model", model)  # a guide of another model on this network (random="A" beside "AB"): its sites
    with torch.no_grad():
        values = own.lora_weight_values({n: v.detach() for n, v in guide.mean().items()})
    sums = value_sums(values.values())
    return {n: sums[id(v)] for n, v in values.items()}


def svi_left_head(entry, model) -> bool:
    """Whether ``entry`` records SVI calls that left ``model``'s head as it was before the first (never stepped, or
    stepping their guide alone): they trained no head, so the adapter's LoRA is no stale partner for it."""
    return entry.start is not None and not changed_point_parameters(entry.start[0], model)


def _head_left_by_svi(model, owner) -> bool:
    """Whether the last training record of ``model``'s adapter is ``owner``'s SVI calls, which trained no head."""
    entry = getattr(model.net, _FITTED, {}).get(model.adapter)
    return entry is not None and entry.guide is not None and entry.guide() is owner and svi_left_head(entry, model)


def _trained_nothing(entry, model) -> bool:
    """Whether the SVI calls ``entry`` records left the head and what their guide trains as they were before the
    first: a loss computed with gradients and never stepped (a gradient check, a logged ELBO) is no training. A guide
    gone is read from the record (its mean at its last call); an autoguide gone is not known, so it trained."""
    if entry.start is None:
        return False
    head, before = entry.start
    guide = entry.guide()
    if guide is not None:
        now = _trained_state(guide, model)
    else:
        now = {n: pair[1] for n, pair in _settled(entry).items()}
        if any(v is None for v in now.values()):
            return False
    return now == before and not changed_point_parameters(head, model)


def record_autoguide(model, owner, svi: bool = True, points: bool | None = None) -> None:
    """``owner`` (:class:`Followed`) trained or restored ``model``'s sites, as :func:`record_fit` keeps a guide's
    training: the adapter's LoRA weights its sites stand for as they are now (on their device), each with its value
    unknown (``None``: a step moved it; the autoguide's median is its own), and the head its snapshot. A site no peft
    parameter holds is left out: a LoRA-XS or ScalaBL model's adapter (its ``A``, ``B`` and head) is the network's
    part of an autoguide's result (docs/saving.md). ``points``: as :func:`record_fit`'s."""
    random = {id(p) for p in model.random_parameters()}
    held = [(n, p) for n, p in model.named_lora_weights() if id(p) in random]
    sums = value_sums((p for _, p in held), lazy=True)
    head = owner._point_snapshot if (model.named_point_parameters() if points is None else points) else None
    restore_fit(model, _Fitted(owner.name, "pyro.infer.SVI", {n: (sums[id(p)], None) for n, p in held}, head,
                               model.builds_on_adapter, *(_svi_start(model, owner) if svi else (None, None, None))))


def unwritten_fit(model, below: _Fitted | None = None) -> _Fitted | None:
    """The record of the last training of ``model``'s network (:func:`record_fit`, :func:`record_autoguide`), if every
    LoRA weight still holds what it held when that training ended and some differ from the guide's mean: its mean
    was never written into the adapter (``model.write_adapter``). ``None`` otherwise. ``below``: the search starts at
    the record that one replaced (an earlier training under SVI calls that left the head as it was)."""
    entry = getattr(model.net, _FITTED, {}).get(model.adapter) if below is None else below.replaced
    while entry is not None and _trained_nothing(entry, model):
        entry = entry.replaced  # its calls trained nothing: the training recorded before them stands
    if entry is None:
        return None
    record = _settled(entry)
    held = [(n, p) for n, p in model.named_lora_weights() if n in record]
    sums = value_sums(p for _, p in held)
    if not held or any(sums[id(p)] != record[n][0] for n, p in held):  # written or loaded since: it holds what was put there
        return None
    return entry if any(record[n][0] != record[n][1] for n, _ in held) else None


def _settled(entry) -> dict:
    """``entry.weights`` (:func:`record_fit`) with an SVI step's lazy sums read to the host, in place."""
    record = entry.weights
    lazy = {(n, i): v for n, pair in record.items() for i, v in enumerate(pair) if torch.is_tensor(v)}
    _settle(lazy)
    record.update([(n, tuple(lazy.get((n, i), v) for i, v in enumerate(pair))) for n, pair in record.items()])
    return record


def trained_beside_head(model, members: list):
    """Where the network's point parameters (the head) are as a training left them (a live guide of the guides
    package or a Pyro autoguide's SVI, or the record :func:`record_fit` keeps once a guide is gone): its name and the
    indices of ``members`` (site value dicts) other than its mean (an autoguide's median), which a predictor pairing
    them with this head would misread; ``None`` where no known training left the head as it is (untrained,
    re-initialised, loaded, an autoguide gone: its record holds no values)."""
    owner, theirs = head_trainer(model), None
    if owner is not None:
        theirs = owner.mean()
    elif isinstance(trainer(model), Followed):
        owner = trainer(model)
        autoguide = owner._autoguide()
        if autoguide is None or changed_point_parameters(owner._point_snapshot, owner.model):
            return None
        if not _head_left_by_svi(model, owner):  # else its calls left the head: an earlier training's, if any (below)
            with torch.no_grad():
                theirs = autoguide.median()
    if theirs is not None:
        theirs = {n: v.detach().float() for n, v in theirs.items()}
        return owner.name if isinstance(owner, Followed) else type(owner).__name__, [k for k, values in enumerate(members) if any(
            n in theirs and not torch.equal(theirs[n], v.detach().float()) for n, v in values.items())]
    entry = getattr(model.net, _FITTED, {}).get(model.adapter)
    while entry is not None and svi_left_head(entry, model):  # SVI calls that left the head: an earlier training's
        entry = entry.replaced
    if entry is None or not head_left_by(entry, model):
        return None
    trained = {n: pair[1] for n, pair in _settled(entry).items()}
    if any(v is None for v in trained.values()):  # a site no peft weight holds left its start: no sums to compare
        return None
    others = []
    for k, values in enumerate(members):
        weights = {n: v.detach() for n, v in model.lora_weight_values(values).items() if n in trained}
        sums = value_sums(weights.values())
        if any(sums[id(v)] != trained[n] for n, v in weights.items()):
            others.append(k)
    return entry.name, others


def head_left_by(entry, model) -> bool:
    """Whether the network's point parameters are still those the training :func:`unwritten_fit` returned left (a
    head trained beside LoRA values the adapter lacks), whether or not its guide is alive."""
    return entry.head is not None and not changed_point_parameters(entry.head, model)


def forget_fit(model):
    """Drop the record of the last ``fit`` of ``model``'s adapter (:func:`record_fit`); returns it, for
    :func:`restore_fit`."""
    return getattr(model.net, _FITTED, {}).pop(model.adapter, None)


def restore_fit(model, entry) -> None:
    """Keep ``entry`` as the record of the last ``fit`` of ``model``'s adapter: :func:`record_fit`'s, or one
    :func:`forget_fit` dropped (a rebuild that was refused leaves the network as it was); ``None``: nothing."""
    if entry is not None:
        if not isinstance(getattr(model.net, _FITTED, None), dict):
            setattr(model.net, _FITTED, {})
        getattr(model.net, _FITTED)[model.adapter] = entry


def take_over(model, guide) -> None:
    """``guide`` (or ``None``: nobody, e.g. while a saved guide is rebuilt) starts setting the point parameters of
    ``model``'s network; the guide that set them before keeps, as the state its predictions need, what it leaves."""
    if guide is None:  # a guide rebuilt or re-initialised: what it is built from is no longer what fit left
        forget_fit(model)
    previous = trainer(model)
    if previous is guide:
        return
    stop_following(model)  # another guide's SVI step must not be taken as the new trainer's
    if previous is not None:
        previous._point_snapshot = point_snapshot(previous.model)
    if not isinstance(getattr(model.net, _TRAINER, None), _Trainers):
        setattr(model.net, _TRAINER, _Trainers())
    trainers = getattr(model.net, _TRAINER)
    # another adapter's guide still live (fit) keeps what it leaves too: a base parameter the user unfroze
    # is shared by every adapter
    for other in (ref() for a, ref in trainers.items() if a != model.adapter and ref is not None):
        if other is not None and other is not guide and other._point_snapshot is None:
            other._point_snapshot = point_snapshot(other.model)
    trainers[model.adapter] = None if guide is None else weakref.ref(guide)


class Followed:
    """A Pyro autoguide over ``model`` as this module follows a guide of the guides package (:func:`take_over`,
    :func:`follow_svi_step`): its parameters, and the point parameters (the head) its sites were trained or restored
    beside (``_point_snapshot``). Kept beside the autoguide (:func:`followed`), never keeping it alive."""

    fitted_at_head = False  # trained by SVI as any variational guide (guides.LoraGuide.fitted_at_head)

    def __init__(self, autoguide, model):
        self._autoguide = weakref.ref(autoguide)
        self.model = model
        self.name = f"Pyro {type(autoguide).__name__}"
        self._point_snapshot = point_snapshot(model)

    def parameters(self):
        autoguide = self._autoguide()
        return iter(()) if autoguide is None else autoguide.parameters()


_FOLLOWED = weakref.WeakKeyDictionary()  # autoguide -> its Followed


def followed(autoguide, model=None) -> Followed | None:
    """The :class:`Followed` of ``autoguide`` (``None`` where no SVI step or ``load_guide`` was seen); with ``model``
    (the LoraModel it is over), made where there is none over that model."""
    owner = _FOLLOWED.get(autoguide)
    if model is not None and (owner is None or owner.model is not model):
        owner = _FOLLOWED[autoguide] = Followed(autoguide, model)
    return owner


def follow_autoguide(model, autoguide, loaded: bool = False) -> None:
    """A training step of Pyro's ``SVI`` (an ELBO's) runs ``autoguide`` over ``model`` (``loaded``: ``load_guide``
    restored it, with the head): it sets the network's point parameters as a guide of the guides package does
    (:func:`take_over`, its steps followed), and its sites' values are its own, not the adapter's
    (:func:`record_autoguide`)."""
    owner = followed(autoguide, model)
    take_over(model, owner)
    if loaded:  # restored, not trained: the point parameters as they are now are its own
        stop_following(model)
        owner._point_snapshot = point_snapshot(model)
        points = None
    else:
        points = follow_svi_step(owner)
    record_autoguide(model, owner, svi=not loaded, points=points)
