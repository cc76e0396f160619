"""How the data depend on the network: class logits from a batch, and a fused cross-entropy likelihood.

A likelihood turns a batch (a dict of tensors from :mod:`pyro_lora.data`'s collators) into logits,
optionally for ``S`` weight samples at once (the batch is repeated ``S`` times, sample-major), and
gives the observation distribution whose ``log_prob`` is one ``F.cross_entropy`` call.
"""

import torch
import torch.nn.functional as F
from pyro.distributions import Categorical, TorchDistribution, constraints

_NET_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class FusedCategorical(TorchDistribution):
    """Categorical over the last dim of ``logits`` whose ``log_prob`` is a fused ``F.cross_entropy``.

    :param logits: ``[*batch, *event, C]``; ``event_dims`` trailing dims before ``C`` are summed
        (token-level LM: ``event_dims=1`` over positions). Labels equal to ``ignore_index`` add 0.
    """

    arg_constraints = {}
    support = constraints.nonnegative_integer

    def __init__(self, logits, event_dims=0, ignore_index=-100):
        self.logits = logits
        self.ignore_index = ignore_index
        shape = logits.shape[:-1]
        super().__init__(shape[: len(shape) - event_dims], shape[len(shape) - event_dims :], validate_args=False)

    def log_prob(self, value):
        ce = F.cross_entropy(
            self.logits.reshape(-1, self.logits.shape[-1]).float(),
            value.reshape(-1),
            reduction="none",
            ignore_index=self.ignore_index,
        ).view(value.shape)
        return -ce.sum(tuple(range(-len(self.event_shape), 0))) if self.event_shape else -ce

    def sample(self, sample_shape=torch.Size()):
        return Categorical(logits=self.logits).sample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        event = self.logits.shape[len(self.batch_shape) : -1]
        return FusedCategorical(self.logits.expand(*batch_shape, *event, self.logits.shape[-1]), len(event), self.ignore_index)


def repeat_inputs(batch, num_samples, keys=_NET_INPUTS):
    """The network inputs of ``batch``, each repeated ``num_samples`` times along dim 0 (sample-major)."""
    out = {}
    for k in keys:
        if k in batch:
            t = batch[k]
            out[k] = t if num_samples is None else t.repeat(num_samples, *[1] * (t.dim() - 1))
    return out


def _unfold_samples(t, num_samples):
    return t if num_samples is None else t.view(num_samples, -1, *t.shape[1:])


def _base(net):
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def _last_positions(attention_mask):
    """Index of the last real token per row, for left or right padding: ``[N, T] -> [N]``."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.long().flip(1).argmax(1)


class Likelihood:
    """Base: ``logits(net, batch, num_samples)`` and the observation distribution."""

    event_dims = 0

    def logits(self, net, batch, num_samples=None):
        raise NotImplementedError

    def observed(self, batch):
        """The observed labels, ``[B]`` (or ``[B, T]`` for token-level LM)."""
        if "labels" not in batch:
            raise ValueError(f"batch has no 'labels'; its keys are {sorted(batch)}")
        return batch["labels"]

    def distribution(self, logits):
        return FusedCategorical(logits, self.event_dims)


class SequenceClassification(Likelihood):
    """Head logits of a sequence-classification model: ``[*S, B, C]``."""

    def logits(self, net, batch, num_samples=None):
        out = net(**repeat_inputs(batch, num_samples)).logits
        return _unfold_samples(out, num_samples)


class MultipleChoice(Likelihood):
    """Multiple choice with a causal LM; class logits ``[*S, B, K]``, missing choices at ``-inf``.

    ``format="letter"``: next-token logits at the last real position restricted to the answer-letter
    tokens ``answer_token_ids`` (``[K_max]``). ``format="cloze"``: the log-likelihood of each choice's
    text as a continuation (batch rows are ``B * K`` sequences with a ``target_mask``), summed over its
    tokens, divided by its length in tokens or characters when ``normalize`` is ``"tokens"``/``"chars"``.
    """

    def __init__(self, answer_token_ids=None, format="letter", normalize=None):
        if format not in ("letter", "cloze"):
            raise ValueError(f"format must be 'letter' or 'cloze', got {format!r}")
        if format == "letter" and answer_token_ids is None:
            raise ValueError("format='letter' needs answer_token_ids (see pyro_lora.data.letter_token_ids)")
        if normalize not in (None, "tokens", "chars"):
            raise ValueError(f"normalize must be None, 'tokens' or 'chars', got {normalize!r}")
        self.answer_token_ids = None if answer_token_ids is None else torch.as_tensor(answer_token_ids)
        self.format = format
        self.normalize = normalize

    def logits(self, net, batch, num_samples=None):
        base = _base(net)
        inputs = repeat_inputs(batch, num_samples, ("input_ids", "attention_mask"))
        hidden = base.get_decoder()(**inputs).last_hidden_state
        head = base.get_output_embeddings()
        choice_mask = batch["choice_mask"]
        if self.format == "letter":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, _last_positions(inputs["attention_mask"])]
            ids = self.answer_token_ids.to(hidden.device)[: choice_mask.shape[1]]
            logits = head(last)[:, ids]
        else:
            logits = self._cloze(hidden, head, batch, inputs["input_ids"], num_samples)
        logits = _unfold_samples(logits.float(), num_samples).reshape(*(() if num_samples is None else (num_samples,)), *choice_mask.shape)
        return logits.masked_fill(~choice_mask.bool(), float("-inf"))

    def _cloze(self, hidden, head, batch, input_ids, num_samples):
        # token t is predicted from position t-1: score only the continuation tokens, never [N, T, V]
        target = batch["target_mask"].bool()
        if num_samples is not None:
            target = target.repeat(num_samples, 1)
        pred = target[:, 1:]
        logp = torch.log_softmax(head(hidden[:, :-1][pred]).float(), -1)
        token_logp = logp.gather(-1, input_ids[:, 1:][pred].unsqueeze(-1)).squeeze(-1)
        row = torch.arange(target.shape[0], device=target.device).unsqueeze(1).expand_as(pred)[pred]
        scores = torch.zeros(target.shape[0], device=hidden.device).index_add_(0, row, token_logp)
        if self.normalize:
            length = batch["target_lengths" if self.normalize == "tokens" else "target_chars"].to(scores)
            scores = scores / (length if num_samples is None else length.repeat(num_samples)).clamp(min=1)
        return scores


class CausalLM(Likelihood):
    """Token-level language modelling: logits ``[*S, B, T-1, V]`` against labels shifted by one."""

    event_dims = 1

    def logits(self, net, batch, num_samples=None):
        out = net(**repeat_inputs(batch, num_samples, ("input_ids", "attention_mask"))).logits[:, :-1]
        return _unfold_samples(out, num_samples)

    def observed(self, batch):
        return super().observed(batch)[:, 1:]
