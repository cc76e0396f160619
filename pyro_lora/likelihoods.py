"""How the data depend on the network: class logits from a batch, and a fused cross-entropy likelihood.

A likelihood turns a batch (a dict of tensors from :mod:`pyro_lora.data`'s collators) into logits,
optionally for ``S`` weight samples at once (the batch is repeated ``S`` times, sample-major), and
gives the observation distribution whose ``log_prob`` is one ``F.cross_entropy`` call.

Padding never changes a real token's result: decoders get ``position_ids`` that count real tokens
only (``attention_mask.cumsum(-1) - 1``, as ``generate`` does), so a left-padded row sits at the
positions it has alone, which matters for absolute-position models (GPT-2). A network that takes no
``position_ids`` gets right-padded batches only (else ``ValueError``); so does
``SequenceClassification`` (encoders read ``[CLS]`` at column 0, RoBERTa offsets its positions).
"""

from __future__ import annotations

import inspect
import re
import typing
import warnings

import torch
import torch.nn.functional as F
from pyro.distributions import Categorical, TorchDistribution, constraints

from .checks import check_flag, is_integer_tensor
from .modes import eval_mode
from .sites import base_network, embedding
from .callers import user_stacklevel

_NET_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_DECODER_INPUTS = ("input_ids", "attention_mask")  # a decoder's positions are computed here, from the attention mask
# names transformers 5's forwards still take, renamed inside, which their signatures no longer show
_RENAMED_INPUTS = {"past_key_values": "cache", "cache_params": "cache"}
MC_FORMATS = ("letter", "cloze")  # the answer as a letter token, or scored as the choice text's continuation


def _forward_inputs(forward) -> set:
    """The keyword arguments ``forward`` takes: its parameters, the names transformers renames inside, and the keys of
    a ``**kwargs: Unpack[TransformersKwargs]`` (packed rows' ``cu_seq_lens_q``, ``seq_idx``, ...), which its signature
    shows as one parameter."""
    parameters = inspect.signature(forward).parameters
    takes = set(parameters) | {old for old, new in _RENAMED_INPUTS.items() if new in parameters}
    for p in parameters.values():
        if p.kind is p.VAR_KEYWORD:
            kwargs = _unpacked(forward, p.annotation)
            takes |= set(getattr(kwargs, "__annotations__", {}))
    return takes


def _unpacked(forward, annotation):
    """The TypedDict of a ``**kwargs: Unpack[...]`` annotation, also where a module's ``from __future__ import
    annotations`` left it a string (``'Unpack[TransformersKwargs]'``, as in transformers' generic classification
    heads), resolved in the forward's module; else ``None``."""
    if isinstance(annotation, str):
        match = re.fullmatch(r"\s*(?:typing\.|typing_extensions\.)?Unpack\[\s*(\w+)\s*\]\s*", annotation)
        scope = getattr(inspect.unwrap(getattr(forward, "__func__", forward)), "__globals__", {})
        return scope.get(match.group(1)) if match else None
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Unpack else None


class FusedCategorical(TorchDistribution):
    """Categorical over the last dim of ``logits`` whose ``log_prob`` is a fused ``F.cross_entropy``.

    :param logits: ``[*batch, *event, C]``; ``event_dims`` trailing dims before ``C`` are summed
        (token-level LM: ``event_dims=1`` over positions). Labels equal to ``ignore_index`` add 0.

    ``log_prob`` broadcasts labels against ``logits.shape[:-1]`` over leading dims, as ``torch.distributions.Categorical``
    does: labels ``[B]`` (``[B, T-1]``) score logits ``[S, B, C]`` (``[S, B, T-1, V]``) of ``S`` weight samples, giving
    ``[S, B]``. The dims both have must be equal (a label of shape ``[1]`` is refused for ``B`` rows, not repeated).
    """

    arg_constraints = {}
    support = constraints.nonnegative_integer

    def __init__(self, logits, event_dims=0, ignore_index=-100, observer=None):
        self.logits = logits
        self.ignore_index = ignore_index
        # called with each log_prob computed, detached, and its examples' scored labels (the model's data-fit record)
        self.observer = observer
        shape = logits.shape[:-1]
        super().__init__(shape[: len(shape) - event_dims], shape[len(shape) - event_dims :], validate_args=False)

    def log_prob(self, value):
        logits = self.logits
        check_label_range(value, logits.shape[-1], self.ignore_index)
        shape = logits.shape[:-1]
        if value.shape != shape:  # e.g. labels [B] against [S, B, C]; equal shapes (the model's) as they are
            n = min(value.dim(), len(shape))  # the dims both have must be equal: a label of one row never scores them all
            if value.shape[value.dim() - n :] != shape[len(shape) - n :]:
                raise ValueError(f"labels of shape {tuple(value.shape)} do not match the logits' {tuple(shape)} (their "
                                 f"shape {tuple(logits.shape)} less the classes) in their last {n} dim(s): labels are "
                                 "broadcast over leading (sample) dims only, one label per row")
            shape = max(value.shape, shape, key=len)
            value, logits = value.expand(shape), logits.expand(*shape, logits.shape[-1])
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            value.reshape(-1),
            reduction="none",
            ignore_index=self.ignore_index,
        ).view(value.shape)
        log_prob = -ce.sum(tuple(range(-len(self.event_shape), 0))) if self.event_shape else -ce
        if self.observer is not None:
            self.observer(log_prob.detach(), scored_labels(value, len(self.event_shape), self.ignore_index))
        return log_prob

    def sample(self, sample_shape=torch.Size()):
        return Categorical(logits=self.logits).sample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        event = self.logits.shape[len(self.batch_shape) : -1]
        return FusedCategorical(self.logits.expand(*batch_shape, *event, self.logits.shape[-1]), len(event), self.ignore_index, self.observer)


def scored_labels(labels: torch.Tensor, event_dims: int, ignore_index: int = -100) -> torch.Tensor | None:
    """The number of labels each example's log-probability sums, ``labels.shape[:-event_dims]`` (a causal LM's
    row: its tokens not ``ignore_index``); ``None`` where ``event_dims`` is 0 (one label per example)."""
    if not event_dims:
        return None
    return (labels != ignore_index).sum(tuple(range(-event_dims, 0)))


def data_nll(log_prob: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
    """The data NLL that ``fit``'s and ``train_ivon``'s divergence checks and progress bars follow, a 0-d tensor: per
    example (``-log_prob.mean()``) where each example is one label (``scored`` ``None``); per scored label where an
    example's ``log_prob`` sums a sequence's tokens (``scored``: :func:`scored_labels`, of ``log_prob``'s shape), the
    batch's NLL over its scored tokens, since a per-sequence sum grows with the rows' lengths, which change from batch to
    batch while the model stays as it was. A batch scoring no token gives 0."""
    if scored is None:
        return -log_prob.mean()
    return -log_prob.sum() / scored.sum().clamp(min=1)


def check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int = -100) -> None:
    """Refuse labels outside ``[0, num_classes)`` other than ``ignore_index``: torch's own error names neither the
    labels nor the head (on CUDA it is a device assert).

    :raises ValueError: naming the labels outside the head's classes.
    """
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(outside.any()):
        raise ValueError(f"label(s) {sorted(set(labels[outside].tolist()))[:5]} outside the {num_classes} classes of the "
                         f"logits (0 to {num_classes - 1}): the data's labels and the network's head disagree (its "
                         "num_labels too small?)")


def check_attention_mask(mask, input_ids=None) -> None:
    """Refuse an ``attention_mask`` (``None``: none) that is no ``[rows, tokens]`` tensor shaped as ``input_ids``, or
    holds values other than 0 and 1 (``bool``, or integers or floats equal to 0 or 1 pass; ``bool`` with no host read,
    any other dtype with one): packed-document segment ids (``1, 1, 2, 2``, as multipack collators write them) or an
    additive mask (``0`` / ``-inf``). Positions count the mask's real tokens (``cumsum - 1``: ``1, 1, 2, 2`` would
    number them ``0, 1, 3, 5``) and transformers attends to every nonzero cell, so such a mask gives a score of no
    reading of the batch, neither one text nor its documents apart; a 4-D mask ``[rows, 1, tokens, tokens]`` would
    give 4-D positions, which the network's rotary embedding fails on deep inside.

    :raises ValueError: naming the mask's type or shape, or the values found besides 0 and 1, and what to give instead.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"the batch's attention_mask is a {type(mask).__name__}, not a tensor: collate the batches "
                         "into tensors (a tokenizer's return_tensors='pt', or torch.as_tensor)")
    if mask.dim() != 2 or (isinstance(input_ids, torch.Tensor) and mask.shape != input_ids.shape):
        ids = f" where input_ids is {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else ""
        raise ValueError(f"the batch's attention_mask has shape {tuple(mask.shape)}{ids}: positions are counted from a "
                         "[rows, tokens] padding mask (1 over a row's tokens, 0 over its padding), and the network builds "
                         "its causal or block mask from it; give that 2-D mask, not a 4-D attention mask")
    if mask.dtype == torch.bool:
        return
    other = (mask != 0) & (mask != 1)
    if bool(other.any()):
        found = mask[other].unique().tolist()[:5]
        raise ValueError(
            f"the batch's attention_mask holds {found} besides 0 and 1 (packed-document segment ids, as multipack "
            "collators write, or an additive mask?): positions are counted from it as 0/1 (real token or padding), so "
            "the rows would be scored as no reading of the batch; unpack the rows (one sequence per row, padded, its "
            "mask 1 over the tokens and 0 over the padding) or give a 0/1 mask"
        )


def repeat_inputs(batch: dict, num_samples: int | None, keys=_NET_INPUTS) -> dict:
    """The network inputs of ``batch``, each repeated ``num_samples`` times along dim 0 (sample-major)."""
    out = {}
    for k in keys:
        if batch.get(k) is not None:  # None: absent, as transformers reads it
            t = batch[k]
            out[k] = t if num_samples is None else t.repeat(num_samples, *[1] * (t.dim() - 1))
    return out


def _unfold_samples(t, num_samples):
    return t if num_samples is None else t.view(num_samples, -1, *t.shape[1:])


def _takes(fn, name):
    """Whether the callable ``fn`` names the parameter ``name`` (a ``**kwargs`` may drop it silently)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _no_cache(decoder) -> dict:
    """``use_cache=False`` where the decoder takes it: a forward read once needs no key/value cache (its memory)."""
    return {"use_cache": False} if _takes(decoder.forward, "use_cache") else {}


def _right_padded(attention_mask):
    """Whether every row is its real tokens followed by padding (no padding before or between them)."""
    mask = attention_mask.bool()
    lengths = mask.sum(1, keepdim=True)
    return bool((mask == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())


def _real_positions(attention_mask):
    """Position ids that count real tokens only, ``[N, T]``: a padded row's real tokens get ``0, 1, ...`` as
    they would alone, whatever the padding (left, right or between); padding cells repeat a neighbour's."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _with_positions(module, inputs):
    """``inputs`` plus ``position_ids`` counting real tokens when ``module.forward`` takes them. A module
    that takes none (or numbers some tokens by their column all the same, :func:`_column_positions`) numbers the
    columns ``0..T-1`` itself, which is right for right-padded rows only: any other layout raises ``ValueError``
    rather than shift the positions of the real tokens."""
    mask = inputs.get("attention_mask")
    if mask is None:
        return inputs
    takes = _takes(module.forward, "position_ids")
    columns = ("takes no position_ids" if not _mask_positions(module) else None) if not takes else _column_positions(module)
    if columns and not _right_padded(mask):
        raise ValueError(
            f"{type(module).__name__} {columns}, so padding before a row's tokens would shift their "
            "positions: pad on the right (e.g. LetterCollator(tokenizer, padding_side='right'))"
        )
    return {**inputs, "position_ids": _real_positions(mask)} if takes else inputs


def _mask_positions(module) -> bool:
    """Whether ``module``, which takes no ``position_ids``, gives a left-padded row's real tokens what they get alone:
    ALiBi alone positions them, built from the mask's running count (Bloom) or from the columns (MPT), where the left
    padding adds one constant to each query's scores, which the softmax over its unmasked keys takes away."""
    return getattr(getattr(module, "config", None), "model_type", None) in ("bloom", "mpt")


def _column_positions(module) -> str | None:
    """Why ``module`` numbers some tokens by their column although it takes ``position_ids`` (``None`` where it does
    not): Llama 4's attention temperature tuning scales the queries of its NoPE layers by the column index, so a
    left-padded row, or continuations after a cached question, would get other scales than the row alone."""
    config = getattr(module, "config", None)
    config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    if getattr(config, "attn_temperature_tuning", False) and not all(getattr(config, "no_rope_layers", None) or [1]):
        return "scales the queries of its NoPE layers by their column (attn_temperature_tuning)"
    return None


def _decoder_and_head(net):
    """The decoder stack (hidden states, no LM head) and the LM head as the model's forward applies it: the output
    embedding, followed by what the forward does to its output (:func:`_head_steps`).

    The decoder is ``get_decoder()``, else ``base_model``, else the one child module that holds the input embedding
    (Llama4ForCausalLM names a ``base_model_prefix`` it has no module of, so both fall back to the whole model)."""
    base = base_network(net)
    decoder = None
    if callable(getattr(base, "get_decoder", None)):
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
    if decoder is None or decoder is base:  # no get_decoder, or it fell back to the whole model
        inner = getattr(base, "base_model", None)
        decoder = inner if isinstance(inner, torch.nn.Module) and inner is not base else None
    embeddings = embedding(base, "input")
    if decoder is None and embeddings is not None:
        holders = [m for m in base.children() if any(x is embeddings for x in m.modules())]
        decoder = holders[0] if len(holders) == 1 and holders[0] is not embeddings else None
    head = base.get_output_embeddings() if callable(getattr(base, "get_output_embeddings", None)) else None
    if decoder is None or head is None:
        raise ValueError(
            f"MultipleChoice needs a causal LM whose decoder (get_decoder(), base_model, or the child module holding the "
            f"input embedding) and output embedding (get_output_embeddings()) can be found; {type(base).__name__} has "
            f"{'no decoder' if decoder is None else 'no output embedding'}: wrap it so that get_decoder() returns the "
            "module giving last_hidden_state"
        )
    steps = _head_steps(base)[0]
    return decoder, (head if not steps else lambda hidden: apply_head_steps(head(hidden), steps))


def not_causal_lm(model) -> str | None:
    """What ``model`` is, where its class or config says it is no causal LM (``None`` otherwise): an encoder-decoder
    (T5, BART), whose decoder reads an encoder's output of the whole input, or a masked LM (``BertForMaskedLM``), which
    predicts each token from both sides. Read from the class and config alone; a decoder whose attention is
    bidirectional all the same shows in :func:`_causality_probe`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    base = base_network(model)
    name, config = type(base).__name__, getattr(base, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder (its decoder reads an encoder's output of the whole input)"
    # XLMWithLMHeadModel serves both mappings: the probe tells its attention
    masked = set(MODEL_FOR_MASKED_LM_MAPPING_NAMES.values()) - set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if name.endswith("ForMaskedLM") or name in masked:
        return f"{name} is a masked LM (it predicts each token from both sides, not the next token from those before it)"
    return None


def _causality_probe(net, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse a network that is no causal LM for the causal-LM likelihood ``what``: by :func:`not_causal_lm`, then by
    a probe of two 5-token rows that differ in their last token, run as one batch (so that a batch-wide computation,
    LLM.int8()'s outlier columns, is the same for both): a causal LM gives both the same logits at the 4 positions
    before it. A decoder with bidirectional attention (``use_bidirectional_attention``, an embedding model's; an
    encoder's LM head without ``is_decoder``) would let a cloze token's score see the token itself.

    :returns: the probe ``input_ids`` ``[2, 5]`` and the network's logits on them ``[2, 5, V]``.
    :raises ValueError: naming the model class, what it is, and the causal LM ``what`` needs.
    """
    needs = (f"{what} reads position t's logits as the next token's prediction from the tokens up to t, which needs a "
             "decoder-only causal LM; to classify with this model, load it with task='classification' and use "
             "SequenceClassification")
    if kind := not_causal_lm(net):
        raise ValueError(f"{kind}: {needs}")
    rows = getattr(embedding(base_network(net), "input"), "num_embeddings", 6)
    ids = (torch.arange(1, 6) % rows).repeat(2, 1).to(next(net.parameters()).device)
    ids[1, -1] = (ids[1, -1] + 1) % rows
    with eval_mode(net), torch.no_grad():  # no dropout: both rows must run the same function
        logits = net(input_ids=ids).logits
    before = logits[:, :-1].float()
    tolerance = 2e-2 if logits.dtype in (torch.float16, torch.bfloat16) else 1e-3
    gap = (before[0] - before[1]).abs().max()
    if not gap <= tolerance * before.abs().max() + 1e-5:
        raise ValueError(
            f"{type(base_network(net)).__name__} attends to later tokens: changing the last of 5 tokens moves the logits "
            f"at the positions before it by up to {gap:.3g} (bidirectional attention: an embedding model's "
            f"use_bidirectional_attention, an encoder's LM head); a score would see the token it scores. {needs}"
        )
    return ids, logits


def _softcap(logits, cap):
    return cap * torch.tanh(logits / cap)


# what a causal LM's forward may do to its LM head's output, in this order, by the config attribute holding its number
_HEAD_STEPS = {
    "logit_scale": (torch.mul, "a logit scaling"),  # Cohere, Aya Vision
    "lm_head_multiplier": (torch.mul, "a logit scaling"),  # Falcon-H1
    "logits_scaling": (torch.div, "a logit division"),  # Granite
    "final_logit_softcapping": (_softcap, "a final logit softcapping"),  # Gemma 2, 3 (text), 3n, 4, PaliGemma
    "logits_soft_cap": (_softcap, "a final logit softcapping"),  # RecurrentGemma
}


def apply_head_steps(logits, steps: dict):
    """``logits`` through ``steps`` (``{attribute: value}`` of :data:`_HEAD_STEPS`, from :func:`_head_steps`) in
    order: each acts on every logit alone, so its Jacobian is diagonal."""
    for name, value in steps.items():
        logits = _HEAD_STEPS[name][0](logits, value)
    return logits


def _head_steps(base) -> tuple[dict, bool]:
    """The steps of :data:`_HEAD_STEPS` that ``base``'s forward applies after its LM head, ``{attribute: value}``, and
    whether its code told: a step counts where its forward's code names the attribute (the same config may serve
    classes that apply it and classes that do not: Gemma3ForConditionalGeneration does not softcap, Gemma3ForCausalLM
    does), valued from the text config; where the code cannot be read, every step the config gives a value."""
    config = getattr(base, "config", None)
    config = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    given = {name: getattr(config, name, None) for name in _HEAD_STEPS}
    given = {name: value for name, value in given.items() if isinstance(value, (int, float)) and value}
    try:
        code = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return given, False
    return {name: value for name, value in given.items() if re.search(rf"\b{name}\b", code)}, True


def _text_config(net):
    """The network's transformers config, its text part for a multimodal one (where the token ids are), or ``None``."""
    config = getattr(base_network(net), "config", None)
    return config.get_text_config() if config is not None and callable(getattr(config, "get_text_config", None)) else config


def _pad_token_id(net):
    return getattr(_text_config(net), "pad_token_id", None)


_NO_PAD_TOKEN = ("the network's config has no pad_token_id, which a decoder's classification head (Llama, GPT-2) needs to "
                 "find each row's last token: set net.config.pad_token_id, e.g. to tokenizer.pad_token_id or eos_token_id")


def _refuse_unmasked_padding(net, batch, trailing: bool = True, rows=None) -> None:
    """Refuse a batch without an ``attention_mask`` (absent or ``None``) whose rows are padded with the config's
    ``pad_token_id``: padding the network would attend to as text and, at a row's end (``trailing``), read a score at
    (a letter answer) or observe (a causal LM's labels; trailing pads labelled -100, as transformers' collators
    label them, are neither). A pad id that is also the eos or bos token (``tokenizer.pad_token = eos_token``) is
    text too, so there only rows whose leading or trailing runs of it differ tell padding apart (an unpadded SFT row
    ending in eos, a packed row opening with one, are taken). ``rows``: the rows to read (cloze's present choices).
    """
    ids, pad = batch.get("input_ids"), _pad_token_id(net)
    if batch.get("attention_mask") is not None or pad is None or not torch.is_tensor(ids) or ids.dim() != 2 \
            or ids.shape[1] == 0:
        return
    labels = batch.get("labels")
    labels = labels if torch.is_tensor(labels) and labels.shape == ids.shape else None
    if rows is not None and rows.numel() == ids.shape[0]:
        rows = rows.bool().to(ids.device)
        ids, labels = ids[rows], None if labels is None else labels[rows]
    is_pad = ids == pad
    lead = is_pad.long().cumprod(1).sum(1)
    tail = is_pad.flip(1).long().cumprod(1)  # 1 over each row's trailing run, read from its end
    trail = tail.sum(1) if trailing else torch.zeros_like(lead)
    scored = trail > 0 if labels is None else (tail.bool() & (labels.flip(1) != -100)).any(1) & (trail > 0)
    config = _text_config(net)  # where pad_token_id is read
    text = {t for k in ("eos_token_id", "bos_token_id") for t in _as_list(getattr(config, k, None))}
    padded = ((lead > 0) | scored) & ((lead != lead[0]).any() | (trail != trail[0]).any() if pad in text else True)
    if bool(padded.any()):
        found = padded.nonzero().flatten().tolist()
        raise ValueError(f"the batch has no attention_mask and row(s) {found[:5]} are padded with token {pad}, the "
                         "config's pad_token_id: without a mask the network attends to padding as text (and reads or "
                         "scores a padding cell); pass the attention_mask the tokenizer returns with the batch")


def _as_list(value) -> list:
    """A config's token id or list of them (``eos_token_id`` may be either) as a list."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _refuse_ending_in_pad(ids, mask, pad):
    """Refuse rows whose last real token is the pad token id (transformers#35352): a decoder's classification head
    finds each row's last token as the last one that is not ``pad_token_id``, so a text ending in eos, where the
    tokenizer pads with eos, was read at the token before it, padded or not."""
    last = ids.gather(1, (_last_positions(mask) if mask is not None else torch.full_like(ids[:, 0], ids.shape[1] - 1))[:, None])
    if bool((last == pad).any()):  # one host sync, as the checks beside it
        ending = (last[:, 0] == pad).nonzero().flatten().tolist()
        raise ValueError(f"row(s) {ending[:5]} end in token {pad}, the config's pad_token_id (a tokenizer without a pad "
                         "token pads with its eos): a decoder's classification head takes the last token that is not "
                         "pad_token_id as the row's last, so it would read the token before; leave the final eos out of "
                         "the texts, or give the tokenizer a pad token of its own and set net.config.pad_token_id to it")


def _last_positions(attention_mask):
    """Index of the last real token per row, for left or right padding: ``[N, T] -> [N]``."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.long().flip(1).argmax(1)


class Likelihood:
    """Base: ``logits(net, batch, num_samples)`` and the observation distribution.

    :attr:`net_inputs` names the batch entries ``logits`` hands the network: a subclass handing it others lists them.
    """

    event_dims = 0
    net_inputs = _NET_INPUTS

    def check_inputs(self, net, batch: dict) -> None:
        """Refuse batch entries the network's forward takes but :meth:`logits` does not hand it (``position_ids`` of
        packed rows, ``inputs_embeds``): the network would run without them, and nothing would say so; a batch without
        the ``input_ids`` the network reads; a batch
        of no rows (a transformers forward fails on it deep inside attention); and an ``attention_mask`` handed on that
        is not 0/1 (:func:`check_attention_mask`, one host read unless it is ``bool``).

        :raises ValueError: naming those entries and the ones handed on, the empty entry, or the mask's other values.
        """
        empty = [k for k in self.net_inputs if isinstance(batch.get(k), torch.Tensor) and batch[k].dim() and not len(batch[k])]
        if empty:
            raise ValueError(f"the batch has no rows ({empty[0]} of shape {tuple(batch[empty[0]].shape)}): an empty batch "
                             "scores nothing; leave it out of the data")
        if "attention_mask" in self.net_inputs:
            check_attention_mask(batch.get("attention_mask"), batch.get("input_ids"))
        try:
            takes = _forward_inputs(base_network(net).forward)
        except (TypeError, ValueError):  # a forward without a signature: nothing to compare
            return
        if "input_ids" in takes and "input_ids" in self.net_inputs and "input_ids" not in batch:
            # transformers' own "You must specify exactly one of input_ids or inputs_embeds" names no fix
            raise ValueError(f"the batch holds no input_ids (its keys: {list(batch)}), which the network reads: batch "
                             "the examples with a collator of pyro_lora.data (or transformers' DataCollatorWithPadding)")
        dropped = sorted(k for k in batch if k in takes and k not in self.net_inputs and k != "labels")
        if dropped:
            raise ValueError(
                f"the batch holds {dropped}, which the network's forward takes but {type(self).__name__} does not hand it "
                f"(it hands {list(self.net_inputs)}; positions count the attention mask's real tokens): the network "
                "would run without them; drop those entries (packed rows: one sequence per row, padded)"
            )

    def logits(self, net, batch: dict, num_samples: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_network(self, net) -> None:
        """Refuse a network this likelihood cannot score faithfully (called by :class:`~pyro_lora.LoraModel`)."""

    def observed(self, batch: dict) -> torch.Tensor:
        """The observed labels, ``[B]`` (or ``[B, T]`` for token-level LM)."""
        if batch.get("labels") is None:
            raise ValueError(f"the batch has no 'labels' (its keys are {sorted(batch)}; None counts as none)")
        if not isinstance(batch["labels"], torch.Tensor):
            raise ValueError(f"the batch's labels are a {type(batch['labels']).__name__}, not a tensor: give them as a torch "
                             "tensor on the inputs' device, as the collators of pyro_lora.data do")
        return batch["labels"]

    def distribution(self, logits: torch.Tensor) -> FusedCategorical:
        return FusedCategorical(logits, self.event_dims)


class SequenceClassification(Likelihood):
    """Head logits of a sequence-classification model: ``[*S, B, C]``.

    Batches must be right-padded (``ValueError`` otherwise): an encoder reads ``[CLS]`` at column 0 and
    absolute positions count from column 0. Padding cells get the model's ``pad_token_id``, since a
    decoder's head (GPT-2, Llama) reads the last token that is not ``pad_token_id``.

    Only single-label classification with at least 2 classes: its logits are read as a softmax over the classes
    (:meth:`check_network` refuses other heads).
    """

    def check_network(self, net) -> None:
        """Refuse a head this softmax likelihood would misread: a regression head or a multi-label one
        (:meth:`_check_config`), or a head giving a row of logits per token (a causal or masked LM's, a token
        classifier's), seen on a forward of one 4-token row where the network has an input embedding (else at its
        first forward, :meth:`logits`).

        :raises ValueError: naming ``problem_type``, ``num_labels`` or the logits' shape.
        """
        self._check_config(net)
        rows = getattr(embedding(base_network(net), "input"), "num_embeddings", None)
        if rows is not None:
            pad = _pad_token_id(net)
            ids = [t % rows for t in range(1, 6) if t % rows != pad][:4]  # no pad: a decoder's head reads the last token
            with eval_mode(net), torch.no_grad():
                self._check_rows(net, net(input_ids=torch.tensor([ids], device=next(net.parameters()).device)).logits, 1)

    def _check_rows(self, net, logits, rows):
        """Refuse ``logits`` of a forward over ``rows`` examples that are not one row of class logits per example."""
        if logits.dim() != 2 or len(logits) != rows:
            base = base_network(net)
            lm = " (an LM head)" if embedding(base, "output") is not None else ""
            raise ValueError(
                f"{type(base).__name__} gives logits of shape {tuple(logits.shape)} for {rows} example(s){lm}, not one row "
                "of class logits per example [B, C]: SequenceClassification needs a sequence-classification head; load "
                "the model with task='classification' (AutoModelForSequenceClassification), or score a causal LM with "
                "CausalLM or MultipleChoice"
            )

    def _check_config(self, net) -> None:
        """Refuse a regression head (one logit, every probability 1) or a multi-label one (independent sigmoids), as its
        ``config.problem_type`` or ``config.num_labels`` say."""
        config = getattr(base_network(net), "config", None)
        problem = getattr(config, "problem_type", None)
        if problem not in (None, "single_label_classification"):
            raise ValueError(f"SequenceClassification reads the head's logits as a softmax over classes, but the network's "
                             f"config.problem_type is {problem!r}: only single-label classification with >= 2 classes is "
                             "supported (load the model with num_labels >= 2 and problem_type='single_label_classification')")
        labels = getattr(config, "num_labels", None)
        if labels is not None and labels < 2:
            raise ValueError(f"SequenceClassification reads the head's logits as a softmax over classes, but the network's "
                             f"config.num_labels is {labels} (a regression head; one logit gives every probability 1): "
                             "only single-label classification with >= 2 classes is supported (load it with num_labels >= 2)")

    def observed(self, batch):
        """The labels ``[B]``.

        Integer labels of any width (``int32`` from numpy, ``uint8``) are returned as ``int64``, as the losses take them.

        :raises ValueError: on labels that are not integer class indices of shape ``[B]``, not one per row of the batch,
            or negative ones (-100, transformers' ignore index: such a row would add nothing to the likelihood yet
            count as an example).
        """
        labels = super().observed(batch)
        if not is_integer_tensor(labels) or labels.dim() != 1:
            raise ValueError(f"labels must be integer class indices of shape [B], got {labels.dtype} of shape {tuple(labels.shape)}")
        inputs = batch.get("input_ids", batch.get("inputs_embeds"))
        if inputs is not None and len(labels) != len(inputs):
            raise ValueError(f"the batch has {len(inputs)} rows and {len(labels)} labels: one label per row (a label list "
                             "shifted against its inputs scores every row against another's label)")
        if bool((labels < 0).any()):
            raise ValueError(f"labels hold negative values ({sorted(set(labels[labels < 0].tolist()))[:3]}; -100 is "
                             "transformers' ignore index): SequenceClassification scores every row, and an unlabelled one "
                             "would count as an example adding nothing to the likelihood; drop the unlabelled rows")
        return labels.long()

    def logits(self, net, batch, num_samples=None):
        mask, pad = batch.get("attention_mask"), _pad_token_id(net)
        _refuse_empty_rows(batch, "a classification")
        if mask is not None:
            if not _right_padded(mask):
                raise ValueError(
                    "SequenceClassification needs right-padded batches (tokenizer.padding_side = 'right'), for encoders "
                    "and decoders alike: padding before a row's tokens moves an encoder's [CLS] off column 0 and "
                    "shifts the real tokens' positions (position ids count from the first column, padding included), "
                    "which changes the logits of a model with absolute positions (BERT, GPT-2) with its batch's "
                    "longest row"
                )
            if pad is None and not bool(mask.bool().all()):
                raise ValueError(_NO_PAD_TOKEN + "; this batch is padded, and a decoder's head would read a padding cell")
            if pad is not None and "input_ids" in batch:
                batch = {**batch, "input_ids": batch["input_ids"].masked_fill(mask == 0, pad)}
        if pad is not None and "input_ids" in batch:
            _refuse_ending_in_pad(batch["input_ids"], mask, pad)
        _refuse_unmasked_padding(net, batch, trailing=False)  # the row-end check above names a last pad
        self._check_config(net)  # a config attribute or two: problem_type may be set after the model was built
        inputs = repeat_inputs(batch, num_samples)
        try:
            out = net(**inputs).logits
        except ValueError as e:  # transformers' decoder heads refuse more than one row without a pad token
            if pad is None and "padding token" in str(e):
                rows, copies = len(next(iter(repeat_inputs(batch, None).values()))), num_samples or 1
                raise ValueError(f"{_NO_PAD_TOKEN} (this forward has {rows * copies} rows, more than one: {rows} "
                                 f"example(s) x {copies} weight sample(s), the samples run as copies of the batch)") from e
            raise
        self._check_rows(net, out, len(next(iter(inputs.values()), out)))
        if out.shape[-1] < 2:  # a config may claim 2 labels over a 1-output head: every probability would be 1
            raise ValueError(f"the network's head gives {out.shape[-1]} logit per example: SequenceClassification needs a "
                             "single-label classification head with >= 2 classes")
        return _unfold_samples(out, num_samples)


def is_cloze(likelihood) -> bool:
    """Whether ``likelihood`` scores multiple choice in the cloze format (one row per (question, choice) pair)."""
    return getattr(likelihood, "format", None) == "cloze"


def _choice_mask(batch):
    """The batch's ``choice_mask`` ``[B, K]``, which the multiple-choice collators write."""
    if "choice_mask" not in batch:
        raise ValueError(f"a multiple-choice batch needs 'choice_mask' [B, K] (LetterCollator and ClozeCollator write it); "
                         f"its keys are {sorted(batch)}")
    mask = batch["choice_mask"]
    labels = batch.get("labels")
    rows = labels.shape[0] if torch.is_tensor(labels) and labels.dim() else None
    if not torch.is_tensor(mask) or mask.dim() != 2 or (rows is not None and mask.shape[0] != rows):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"the batch's choice_mask must be a [B, K] tensor, one row per question (its labels' {rows}), "
                         f"got {shape}")
    if mask.dtype != torch.bool and bool(((mask != 0) & (mask != 1)).any()):  # 0.5 was read as a present choice
        found = sorted({float(v) for v in mask[(mask != 0) & (mask != 1)].unique()[:3].tolist()})
        raise ValueError(f"the batch's choice_mask holds {found} besides 0 and 1: it marks each choice present (1) or "
                         "missing (0)")
    return mask


def _check_cloze_targets(batch, present, length):
    """Refuse a cloze batch whose choices cannot be scored as its ``target_mask`` says (a hand-built one: a
    :class:`~pyro_lora.data.ClozeCollator`'s always can): a ``target_mask`` of another shape than ``input_ids``
    ``[B*K, T]`` or holding other values than 0 and 1; on a present choice's row (``present [B*K]``), an empty target
    (a score of 0, probability 1 before the softmax), one at position 0 (no earlier position predicts it: it was
    dropped) or on padding (scored as text); and a normalisation count ``length`` (a key of the batch, or ``None``) that
    is not one finite positive whole number per row, or, for ``target_lengths``, not the row's target token count."""
    ids, target = batch["input_ids"], batch["target_mask"]
    if not torch.is_tensor(target) or target.shape != ids.shape or target.shape[0] != present.numel():
        shape = tuple(target.shape) if torch.is_tensor(target) else type(target).__name__
        raise ValueError(f"a cloze batch's target_mask must be [B*K, T] like its input_ids {tuple(ids.shape)}, one row per "
                         f"choice of its choice_mask's {present.numel()}; got {shape}")
    if target.dtype != torch.bool and bool(((target != 0) & (target != 1)).any()):
        raise ValueError("a cloze batch's target_mask must mark each token scored (1) or not (0); it holds other values")
    target = target.bool()
    real = batch["attention_mask"].bool() if torch.is_tensor(batch.get("attention_mask")) else torch.ones_like(target)
    for bad, what in ((~target.any(-1), "an empty target (its score would be 0: probability 1 before the softmax)"),
                      (target[:, 0], "a target at position 0 (no earlier position predicts it: it would be dropped)"),
                      ((target & ~real).any(-1), "a target on padding (attention_mask 0: padding scored as text)")):
        if bool((bad & present).any()):
            rows = (bad & present).nonzero().flatten().tolist()
            raise ValueError(f"cloze batch row(s) {rows[:5]} (present choices) have {what}: target_mask marks the "
                             "choice's continuation tokens, after a context (ClozeCollator builds such batches)")
    if length is None:
        return
    counts = batch[length]
    if not torch.is_tensor(counts) or counts.shape != (present.numel(),):
        shape = tuple(counts.shape) if torch.is_tensor(counts) else type(counts).__name__
        raise ValueError(f"a cloze batch's {length} must be [B*K], one count per row ({present.numel()}); got {shape}")
    counts = counts[present].double()
    wrong = ~(torch.isfinite(counts) & (counts >= 1) & (counts == counts.round()))
    if bool(wrong.any()):
        raise ValueError(f"a cloze batch's {length} must be positive whole numbers on its present choices (each score is "
                         f"divided by it); got {sorted(set(counts[wrong].tolist()))[:5]}")
    if length == "target_lengths":
        own = target[present].sum(-1)
        if not bool((counts == own).all()):
            rows = present.nonzero().flatten()[counts != own].tolist()
            raise ValueError(f"cloze batch row(s) {rows[:5]} have target_lengths other than their target_mask's token "
                             "counts: normalize='tokens' divides each score by the tokens it sums")


def _token_ids(value) -> torch.Tensor:
    """``value`` as a tensor, or a ``ValueError`` for what is no array of numbers (a generator, a set, a list holding a
    string), which ``torch.as_tensor`` refuses with a raw error."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"answer_token_ids must be a non-empty 1-d sequence of token ids (a list or a LongTensor), got "
                         f"{type(value).__name__} {value!r}") from None


class MultipleChoice(Likelihood):
    """Multiple choice with a causal LM; class logits ``[*S, B, K]``, missing choices at ``-inf``.

    ``format="letter"``: next-token logits at the last real position restricted to the answer-letter
    tokens ``answer_token_ids`` (``[K_max]``). ``format="cloze"``: the log-likelihood of each choice's
    text as a continuation (batch rows are ``B * K`` sequences with a ``target_mask``), summed over its
    tokens, divided by its length in tokens or characters when ``normalize`` is ``"tokens"``/``"chars"``.
    With ``share_prefix`` (default), a batch whose choices share their question (all but WinoGrande)
    runs each question once and scores the ``K`` continuations from its key/value cache. A decoder whose cache cannot
    serve them (a recurrent or convolution state beside the keys and values: Mamba, Jamba, LFM2, Qwen3-Next, or no
    cache at all: RecurrentGemma) has every row run in full, the same scores; ``share_prefix=True`` given explicitly
    warns of it when the :class:`~pyro_lora.LoraModel` is built, ``None`` (the default) does not.
    """

    net_inputs = _DECODER_INPUTS
    _COUNTS = {"tokens": "target_lengths", "chars": "target_chars"}  # normalize -> the batch's count per row

    def __init__(self, answer_token_ids=None, format="letter", normalize=None, share_prefix=None):
        if format not in MC_FORMATS:
            raise ValueError(f"format must be 'letter' or 'cloze', got {format!r}")
        if format == "letter" and answer_token_ids is None:
            raise ValueError("format='letter' needs answer_token_ids (see pyro_lora.data.letter_token_ids)")
        if format == "cloze" and answer_token_ids is not None:  # ignored, they read as if the letters were scored
            raise ValueError("answer_token_ids name the letter tokens of format='letter'; format='cloze' scores each "
                             "choice's own text: leave them out, or use format='letter'")
        if normalize not in (None, "tokens", "chars"):
            raise ValueError(f"normalize must be None, 'tokens' or 'chars', got {normalize!r}")
        if normalize is not None and format == "letter":  # one answer token per choice: nothing to normalise
            raise ValueError(f"normalize={normalize!r} divides a cloze choice's log-likelihood by its length; the letter "
                             "format scores one answer token per choice: use format='cloze', or leave normalize None")
        if isinstance(answer_token_ids, str):
            raise ValueError(f"answer_token_ids must be token ids, got the string {answer_token_ids!r}: map the letters to "
                             "this tokenizer's ids with pyro_lora.data.letter_token_ids")
        self.answer_token_ids = None if answer_token_ids is None else _token_ids(answer_token_ids)
        if self.answer_token_ids is not None:
            ids = self.answer_token_ids
            # uint8 and bool tensors index as masks, not ids
            if ids.dim() != 1 or ids.numel() == 0 or not is_integer_tensor(ids) or ids.dtype == torch.uint8:
                raise ValueError(f"answer_token_ids must be a non-empty 1-d sequence of token ids (int64), got "
                                 f"{ids.dtype} {ids.tolist()!r}")
            if ids.numel() < 2:  # as SequenceClassification refuses num_labels=1
                raise ValueError(f"answer_token_ids {ids.tolist()} name one choice: a softmax over one logit gives every "
                                 "probability 1 (accuracy 1, NLL 0, whatever the model); give one token per choice, >= 2")
            if ids.dtype in (torch.uint32, torch.uint64) and int(ids.cpu().numpy().max()) >= 2**63:
                # the cast to int64 below wraps these to negatives, which the check after it would misname
                raise ValueError(f"answer_token_ids {ids.tolist()} hold an id beyond int64's range, which no vocabulary "
                                 "has; give each choice's token id")
            self.answer_token_ids = ids = ids.long()
            if bool((ids < 0).any()):
                raise ValueError(f"answer_token_ids {ids.tolist()} hold a negative id: indexing would read a token from the "
                                 "end of the vocabulary; give each choice's token id")
            if ids.unique().numel() != ids.numel():
                raise ValueError(
                    f"answer_token_ids {ids.tolist()} repeat a token: those choices would always get the same "
                    "logit (and a last-layer posterior would count its row twice); give each choice its own token"
                )
        self.format = format
        self.normalize = normalize
        if share_prefix is not None:  # the string "False" would share: None is the default, else a bool (numpy's False
            share_prefix = check_flag(share_prefix, "share_prefix")  # was no `False` below: it shared)
        self.share_prefix = share_prefix is not False
        self._share_asked = share_prefix is True  # warn where the decoder cannot share it

    def shares_prefix(self, net) -> bool:
        """Whether cloze scoring runs each question's context once and its continuations on its key/value cache for
        ``net`` (``share_prefix`` where the decoder allows it), rather than every row in full."""
        return self.format == "cloze" and self.share_prefix and _unshareable(_decoder_and_head(net)[0]) is None

    def check_network(self, net) -> None:
        """Refuse a causal LM whose forward does something to its LM head's logits that this likelihood, which calls
        the decoder and the head itself, does not repeat (it repeats the softcappings and scalings of
        :data:`_HEAD_STEPS` that the forward applies): its letter and cloze scores would not be the model's own; and a
        network that is no causal LM (:func:`_causality_probe`). One forward of two 5-token rows each way, through the
        model and through the decoder and head. Warns where ``share_prefix=True`` was given and the decoder cannot share it.

        :raises ValueError: naming the model class and the largest difference, what it is where it is no causal LM, or
            answer tokens beyond its vocabulary.
        """
        ids, theirs = _causality_probe(net, f"MultipleChoice(format={self.format!r})")
        decoder, head = _decoder_and_head(net)
        reason = _unshareable(decoder)
        if self.format == "cloze" and self._share_asked and reason:
            warnings.warn(f"MultipleChoice(share_prefix=True): {type(decoder).__name__} {reason}, so every cloze row runs "
                          "in full (the same scores, each question run once per choice)", stacklevel=user_stacklevel())
        weight = getattr(base_network(net).get_output_embeddings(), "weight", None)
        if weight is not None and self.answer_token_ids is not None and int(self.answer_token_ids.max()) >= len(weight):
            raise ValueError(f"answer_token_ids {self.answer_token_ids.tolist()} name a token beyond the LM head's {len(weight)} rows: "
                             "give token ids of this model's tokenizer")
        with eval_mode(net), torch.no_grad():  # no dropout; both rows as in the probe: LLM.int8() depends on the batch
            ours = head(decoder(input_ids=ids).last_hidden_state[:, -1]).float()
        theirs = theirs[:, -1]
        tolerance = 2e-2 if theirs.dtype in (torch.float16, torch.bfloat16) else 1e-3
        theirs = theirs.float()
        gap = (ours - theirs).abs().max()
        if not gap <= tolerance * theirs.abs().max() + 1e-5:
            base = base_network(net)
            steps, read = _head_steps(base)
            applied = (f"MultipleChoice applies {', '.join(f'{_HEAD_STEPS[n][1]} ({n}={v})' for n, v in steps.items())} "
                       f"itself, {'as its forward names it' if read else 'as the config gives it (the forward could not be read)'}: "
                       "that may be what differs; " if steps else "")
            raise ValueError(
                f"{type(base).__name__}'s forward changes its LM head's logits in a way MultipleChoice does not "
                f"repeat (they differ by up to {gap:.3g} on a 5-token probe): its letter and cloze scores would not be the "
                f"model's own; {applied}this model family is not supported for multiple choice"
            )

    def observed(self, batch):
        """The labels ``[B]``, each on one of its row's choices.

        :raises ValueError: on labels that are not integers of shape ``[B]``, naming the rows whose label is outside
            the batch's choices or on a choice their ``choice_mask`` marks missing (bad data: its probability is 0,
            its NLL infinite), or on a batch without ``choice_mask``.
        """
        labels = super().observed(batch)
        mask = self._choice_mask(batch)
        if not is_integer_tensor(labels) or labels.shape != mask.shape[:-1]:
            raise ValueError(f"labels must be integer choice indices of shape {tuple(mask.shape[:-1])} (one per row), got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        inputs = batch.get("input_ids")
        rows = mask.numel() if self.format == "cloze" else len(mask)  # cloze: one input row per (question, choice)
        if inputs is not None and len(inputs) != rows:
            raise ValueError(f"the batch has {len(inputs)} input rows and a choice_mask of shape {tuple(mask.shape)}, which "
                             f"asks for {rows} in the {self.format} format: the labels and choices belong to other questions")
        inside = (labels >= 0) & (labels < mask.shape[-1])
        on = inside & mask.bool().gather(-1, labels.long().clamp(0, mask.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        if not bool(on.all()):
            rows = (~on).nonzero().flatten().tolist()
            raise ValueError(f"row(s) {rows[:5]} of the batch have label(s) {labels[~on].tolist()[:5]}, not one of the row's "
                             f"choices (choice_mask, {mask.shape[-1]} columns): the data's labels and choices disagree")
        return labels.long()

    def _choice_mask(self, batch):
        """The batch's ``choice_mask``, from a collator of this likelihood's format (ClozeCollator writes a
        ``target_mask``, LetterCollator none): the other's rows came back as "choices of other questions". A question
        with fewer than 2 choices is refused: its one choice has probability 1, whatever the model (as a head of one
        logit; the collators refuse such records)."""
        mask = _choice_mask(batch)
        few = mask.bool().sum(-1) < 2
        if bool(few.any()):
            rows = few.nonzero().flatten().tolist()
            raise ValueError(f"row(s) {rows[:5]} of the batch have fewer than 2 choices in their choice_mask: a softmax "
                             "over one choice gives it probability 1 (accuracy 1, NLL 0, whatever the model); every "
                             "question needs >= 2 choices")
        if ("target_mask" in batch) != (self.format == "cloze"):
            made = ("cloze", "ClozeCollator") if "target_mask" in batch else ("letter", "LetterCollator, no target_mask")
            wants = "ClozeCollator" if self.format == "cloze" else "LetterCollator"
            raise ValueError(f"the batch is in the {made[0]} format ({made[1]}) and MultipleChoice scores the {self.format} "
                             f"format: collate with {wants}, or build MultipleChoice(format={made[0]!r})")
        length = self._COUNTS.get(self.normalize)
        if self.format == "cloze" and length and length not in batch:  # checked before the network runs
            raise ValueError(f"MultipleChoice(normalize={self.normalize!r}) divides each choice's score by the batch's "
                             f"{length!r} [B*K] (ClozeCollator writes it); its keys are {sorted(batch)}")
        return mask

    def logits(self, net, batch, num_samples=None):
        decoder, head = _decoder_and_head(net)
        choice_mask = self._choice_mask(batch)
        # cloze rows padded on the right come after the scored tokens under causal attention; its absent choices'
        # dummy rows are no text
        _refuse_unmasked_padding(net, batch, trailing=self.format == "letter",
                                 rows=None if self.format == "letter" else choice_mask.reshape(-1))
        if self.format == "letter" and choice_mask.shape[-1] > self.answer_token_ids.numel():
            raise ValueError(f"the batch has {choice_mask.shape[-1]} choices and answer_token_ids {self.answer_token_ids.numel()} "
                             "tokens: give one answer token per choice (pyro_lora.data.letter_token_ids)")
        if self.format == "letter":
            _refuse_empty_rows(batch, "a letter-format")
            inputs = repeat_inputs(batch, num_samples, self.net_inputs)
            hidden = decoder(**_with_positions(decoder, inputs), **_no_cache(decoder)).last_hidden_state
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = _last_positions(inputs["attention_mask"]) if "attention_mask" in inputs else hidden.shape[1] - 1
            last = hidden[rows, last]
            logits = head(last)[:, self.answer_token_ids.to(hidden.device)[: choice_mask.shape[1]]]
        else:
            _refuse_empty_rows(batch, "a cloze")
            _check_cloze_targets(batch, choice_mask.bool().reshape(-1), self._COUNTS.get(self.normalize))
            split = _shared_context(batch) if self.share_prefix and _can_share_prefix(decoder) else None
            scores = None if split is None else self._cloze_shared(decoder, head, split, num_samples)
            if scores is None:
                scores = self._cloze(decoder, head, batch, num_samples)
            if self.normalize:
                length = batch[self._COUNTS[self.normalize]].to(scores)
                scores = scores / (length if num_samples is None else length.repeat(num_samples)).clamp(min=1)
            logits = scores
        lead = () if num_samples is None else (num_samples,)
        logits = logits.float().reshape(*lead, *choice_mask.shape)
        return logits.masked_fill(~choice_mask.bool(), float("-inf"))

    def _cloze(self, decoder, head, batch, num_samples):
        """Every (question, choice) row run in full: ``[B*K, T]`` -> scores ``[*S*B*K]``."""
        inputs = repeat_inputs(batch, num_samples, self.net_inputs)
        hidden = decoder(**_with_positions(decoder, inputs), **_no_cache(decoder)).last_hidden_state
        target = batch["target_mask"].bool()
        if num_samples is not None:
            target = target.repeat(num_samples, 1)
        pred = target[:, 1:]  # token t is predicted from position t-1
        return _score_tokens(head, hidden[:, :-1][pred], inputs["input_ids"][:, 1:][pred], pred)

    def _cloze_shared(self, decoder, head, split, num_samples):
        """The shared question runs once per record; its key/value cache serves the ``K`` continuations (``None``
        when the decoder returns no cache)."""
        ctx_ids, ctx_mask, cont_ids, cont_mask, k = split
        if num_samples is not None:
            ctx_ids, ctx_mask, cont_ids, cont_mask = (t.repeat(num_samples, 1) for t in (ctx_ids, ctx_mask, cont_ids, cont_mask))
        # left-padded contexts: positions count real tokens only, so every context ends at the last column
        out = decoder(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=(ctx_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        # transformers renamed past_key_values to cache; accept both
        name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        cache = getattr(out, name, None)
        # no cache (transformers' checkpointing drops it; RecurrentGemma returns none), or recurrent states: every row in full
        if cache is None or not _key_value_layers(getattr(cache, "layers", [cache])):
            return None
        cache.batch_repeat_interleave(k)
        ctx_mask = ctx_mask.repeat_interleave(k, 0)
        positions = ctx_mask.sum(1, keepdim=True) + torch.arange(cont_ids.shape[1], device=cont_ids.device)
        cont = decoder(
            input_ids=cont_ids, attention_mask=torch.cat([ctx_mask, cont_mask], 1), position_ids=positions, **{name: cache}
        ).last_hidden_state
        # the first continuation token is predicted by the context's last position, the rest by their predecessor
        hidden = torch.cat([out.last_hidden_state[:, -1:].repeat_interleave(k, 0), cont[:, :-1]], 1)
        mask = cont_mask.bool()
        return _score_tokens(head, hidden[mask], cont_ids[mask], mask)


def _can_share_prefix(decoder) -> bool:
    """Whether a question's key/value cache gives its continuations what a full forward gives them: not under
    transformers' checkpointing while training (it drops the cache), and nothing :func:`_unshareable` names."""
    if decoder.training and getattr(decoder, "gradient_checkpointing", False):
        return False
    return _unshareable(decoder) is None


def _unshareable(decoder) -> str | None:
    """Why ``decoder``'s cache cannot serve a question's continuations (``None`` where it can): it takes no
    ``position_ids`` (continuations after a left-padded context), its rotary frequencies depend on the length run
    (dynamic NTK and LongRoPE rescale them once a forward passes a length, so the question alone would get other ones),
    or its cache holds more than keys and values (:func:`_key_value_layers`), as transformers builds it from the config."""
    if not _takes(decoder.forward, "position_ids"):
        return "takes no position_ids"
    if columns := _column_positions(decoder):
        return columns
    for m in decoder.modules():
        kind = getattr(m, "rope_type", None)
        for t in (kind.values() if isinstance(kind, dict) else (kind,)):
            if isinstance(t, str) and ("dynamic" in t or t == "longrope"):
                return f"uses {t} rotary embeddings, whose frequencies depend on the length run"
    from transformers import DynamicCache, PretrainedConfig

    config = getattr(decoder, "config", None)
    if isinstance(config, PretrainedConfig):
        try:
            layers = DynamicCache(config=config).layers
        except (KeyError, TypeError, ValueError, AttributeError):  # a layout this transformers cannot build: the forward tells
            return None
        if not _key_value_layers(layers):
            return ("keeps recurrent or convolution states in its cache (linear attention, SSM), which a left-padded "
                    "question would carry into its continuations and which cannot be repeated per choice")
    return None


def _key_value_layers(layers) -> bool:
    """Whether every layer of a transformers cache holds keys and values only, which prefix sharing repeats per choice
    (``batch_repeat_interleave``) and masks: no recurrent or convolution state (transformers'
    ``LinearAttentionCacheLayerMixin``, hybrids included), which padding enters and nothing repeats."""
    return all(callable(getattr(layer, "batch_repeat_interleave", None))
               and not hasattr(layer, "recurrent_states") and not hasattr(layer, "conv_states") for layer in layers)


def _refuse_empty_rows(batch, what):
    """Refuse rows whose ``attention_mask`` is all 0: no token to read a score from (the network would still give one)."""
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().any(-1).all()):
        rows = (~mask.bool().any(-1)).nonzero().flatten().tolist()
        raise ValueError(f"{what} batch's row(s) {rows[:5]} have no real token (attention_mask all 0): the network would "
                         "score padding; drop empty rows")


def _score_tokens(head, hidden, tokens, mask):
    """Sum of ``log p(token)`` per row: ``hidden [M, H]`` and ``tokens [M]`` are the ``M`` True cells of
    ``mask [N, T]`` in row order; only those rows reach the head, never ``[N, T, V]``. Returns ``[N]``."""
    logp = torch.log_softmax(head(hidden).float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    return torch.zeros(mask.shape[0], device=hidden.device).index_add_(0, rows, logp)


def _shared_context(batch):
    """Split a cloze batch into one left-padded context per record and ``K`` continuations, if all the
    choices of each record share their context (not WinoGrande, whose contexts differ) and the rows are
    right-padded, as :class:`~pyro_lora.data.ClozeCollator` makes them; else ``None``.

    :returns: ``(context_ids [B, Tc], context_mask [B, Tc], continuation_ids [B*K, Tk],
        continuation_mask [B*K, Tk], K)``.
    """
    choice_mask = batch["choice_mask"].bool()
    b, k = choice_mask.shape
    if k < 2 or (batch.get("attention_mask") is not None and not _right_padded(batch["attention_mask"])):
        return None
    ids, target = batch["input_ids"], batch["target_mask"].bool()
    n, t = ids.shape
    start = target.int().argmax(1)  # first continuation position (0 for the empty rows of missing choices)
    length = target.sum(1)
    pos = torch.arange(t, device=ids.device)
    if not bool((target == ((pos >= start[:, None]) & (pos < (start + length)[:, None]))).all()):
        return None  # a target with a gap: the continuations below are read as runs of consecutive tokens
    ctx_len = start.view(b, k)[:, 0]  # every record has its first choice
    ids3 = ids.view(b, k, t)
    in_ctx = pos < ctx_len[:, None, None]
    same = ((ids3 == ids3[:, :1]) | ~in_ctx).all(-1) & (start.view(b, k) == ctx_len[:, None])
    if not (same | ~choice_mask).all():
        return None
    tc, tk = int(ctx_len.max()), max(int(length.max()), 1)
    src = torch.arange(tc, device=ids.device) - (tc - ctx_len[:, None])  # left padding
    ctx_mask = (src >= 0).long()
    ctx_ids = ids3[:, 0].gather(1, src.clamp(min=0)) * ctx_mask
    idx = (start[:, None] + torch.arange(tk, device=ids.device)).clamp(max=t - 1)
    cont_mask = (torch.arange(tk, device=ids.device) < length[:, None]).long()
    return ctx_ids, ctx_mask, ids.gather(1, idx) * cont_mask, cont_mask, k


class CausalLM(Likelihood):
    """Token-level language modelling: logits ``[*S, B, T-1, V]`` against labels shifted by one.

    Positions count real tokens, so a padded row's real tokens get the logits they get alone. A label
    is observed only where its token and the one before it are real (``attention_mask``): with left
    padding the first real token would otherwise be predicted from a padding cell.
    """

    event_dims = 1
    net_inputs = _DECODER_INPUTS

    def check_network(self, net) -> None:
        """Refuse a network that is no causal LM (:func:`_causality_probe`: one forward of two 5-token rows).

        :raises ValueError: for an encoder-decoder, a masked LM or a decoder attending to later tokens.
        """
        _causality_probe(net, "CausalLM")

    def logits(self, net, batch, num_samples=None):
        _refuse_unmasked_padding(net, batch)
        inputs = _with_positions(base_network(net), repeat_inputs(batch, num_samples, self.net_inputs))
        out = net(**inputs).logits[:, :-1]
        return _unfold_samples(out, num_samples)

    def observed(self, batch):
        """The labels of the predicted tokens, ``[B, T-1]`` (``-100`` where unobserved): ``batch["labels"]`` ``[B, T]``
        as ``input_ids`` (not yet shifted; ``CausalLMCollator`` makes them), shifted by one here.

        :raises ValueError: on a batch without ``labels`` (absent or ``None``): its observed tokens are derived from them,
            so a batch without them can neither be scored nor have ``"obs"`` drawn by ``pyro.infer.Predictive`` (which
            a classification likelihood's batch without labels has); on labels that are not integer token ids of
            ``input_ids``' shape ``[B, T]``; and on a row with no token to score.
        """
        if batch.get("labels") is None:
            raise ValueError(
                f"the batch has no 'labels' (its keys are {sorted(batch)}; None counts as none): CausalLM derives its "
                "observed tokens from batch['labels'] (shifted by one, padding masked), so unlike a classification "
                "likelihood it draws no 'obs' for a batch without them (pyro.infer.Predictive included); give labels "
                "(the input_ids, -100 where a token is not scored, as CausalLMCollator writes them) to score the text, "
                "and sample continuations with the network's generate() after model.write_adapter(values)"
            )
        labels = super().observed(batch)
        inputs = batch.get("input_ids")
        if not is_integer_tensor(labels) or labels.dim() != 2 or (inputs is not None and labels.shape != inputs.shape):
            shape = f"input_ids' shape {tuple(inputs.shape)}" if inputs is not None else "shape [B, T]"
            raise ValueError(f"CausalLM labels must be integer token ids of {shape} (unshifted: the likelihood shifts "
                             f"them), got {labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.long()[:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None:
            check_attention_mask(mask, inputs)  # before its cells are read as real tokens
            real = mask.bool()
            labels = labels.masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
        empty = (labels == -100).all(-1).nonzero().flatten().tolist()
        if empty:  # as SequenceClassification's label -100: an example of the data term's scaling with nothing in it
            raise ValueError(f"CausalLM: row(s) {empty[:5]} of the batch have no token to score (every label -100, masked, or "
                             "one real token): each would count as one of the batch's examples in the log-likelihood's "
                             "num_data / rows scaling with nothing in it; drop them from the batch")
        return labels
