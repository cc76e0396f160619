"""Every call that switches the network to train or eval mode gives each module its own mode back afterwards."""

import pytest
import torch
from conftest import tiny_bert
from test_training import toy_data

from pyro_lora import LoraModel, SequenceClassification, fit, predict
from pyro_lora.guides import LaplaceGuide, LastLayerLaplaceGuide, MAPGuide, TFBGuide, train_ivon
from pyro_lora.modes import network_mode


def _model():
    return LoraModel(tiny_bert(num_labels=2), SequenceClassification(), num_data=16)


CALLS = {
    "predict": lambda m, d: predict(m, MAPGuide(m), d, progress=False),
    "fit": lambda m, d: fit(m, MAPGuide(m), d, epochs=1, progress=False),
    "laplace": lambda m, d: LaplaceGuide(m).fit(d, progress=False),
    "llla": lambda m, d: LastLayerLaplaceGuide(m).fit(d, progress=False),
    "tfb_search": lambda m, d: TFBGuide(m).search(d, progress=False, iterations=1),
    "train_ivon": lambda m, d: train_ivon(m, d, progress=False),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("top", [True, False], ids=["train", "eval"])
def test_each_modules_own_mode_comes_back(name, top):
    """``net.train(was_training)`` restored one flag recursively: the user's embeddings kept in eval mode (no dropout
    there) came back in train mode after a predict, and a layer kept training came back in eval mode."""
    model = _model()
    net = model.net
    net.train(top)
    inner = net.base_model.model.bert
    (inner.embeddings.eval if top else inner.encoder.layer[0].train)()
    before = {n: m.training for n, m in net.named_modules()}
    assert len(set(before.values())) == 2
    CALLS[name](model, toy_data(16, batch=8))
    assert {n: m.training for n, m in net.named_modules()} == before


def test_network_mode_restores_after_an_error():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    net[1].eval()
    with pytest.raises(RuntimeError), network_mode(net, True):
        assert net[1].training
        raise RuntimeError
    assert net.training and net[0].training and not net[1].training



def _tiny(family, **options):
    """A tiny network of ``family`` (its config taking ``options``) under a LoRA adapter, its likelihood and a batch;
    nothing downloaded (MiniLM is the package's own)."""
    import transformers as T
    from peft import LoraConfig, get_peft_model

    from pyro_lora.likelihoods import CausalLM
    from pyro_lora.pretrained import add_lora, load_pretrained

    sentences = {k: v for k, v in toy_data(8, batch=8)[0].items() if k != "labels"}
    if family == "minilm":
        net, tok = load_pretrained("minilm", "classification", num_labels=2, progress=False)
        return add_lora(net, r=4), SequenceClassification(), dict(tok(["a fine film", "dull"], padding=True,
                                                                       return_tensors="pt"))
    if family == "bert":
        return tiny_bert(num_labels=2), SequenceClassification(), sentences
    torch.manual_seed(0)
    if family == "gpt2":
        config = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                              pad_token_id=0, **options)
        net = get_peft_model(T.GPT2ForSequenceClassification(config),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="SEQ_CLS"))
        return net, SequenceClassification(), sentences
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, pad_token_id=0, **options)
    if family == "neox":
        net, targets = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**small)), ["query_key_value"]
    elif family == "llama":
        net, targets = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2)), ["q_proj", "v_proj"]
    else:
        net = T.MixtralForCausalLM(T.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4,
                                                   num_experts_per_tok=2))
        targets = ["q_proj", "v_proj"]
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return net, CausalLM(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _dropout_modules(net, p=None, training=None):
    """Set every dropout module's ``p`` (trl's disable_dropout_in_model sets 0) or mode."""
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = m.p if p is None else p
            m.training = m.training if training is None else training


@pytest.mark.parametrize("family, options, dropout, noisy", [
    ("bert", {}, {}, True),
    ("bert", {}, {"p": 0.0}, False),  # BERT's attention reads self.dropout.p, 0 now: its config's 0.1 is stale
    ("bert", {}, {"training": False}, True),  # ... under the attention's own training flag, whatever the module's
    ("minilm", {}, {"p": 0.0}, False),
    ("gpt2", {}, {}, True),
    ("gpt2", {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, {}, False),  # summary_first_dropout: unread
    ("neox", {}, {}, False),  # its config's classifier_dropout=0.1: GPTNeoXForTokenClassification's only
    ("llama", {}, {}, False),
    ("llama", {"attention_dropout": 0.3}, {}, True),  # applied functionally: no dropout module
    ("mixtral", {}, {}, False),
    ("mixtral", {"router_jitter_noise": 0.1}, {}, True),  # its experts' input multiplied by noise in training
])
def test_the_predictive_warning_follows_what_the_forward_in_training_mode_reads(family, options, dropout, noisy):
    """The Predictive warning counted every float *drop* key of a transformers config a module in training mode held,
    read by its forward or not: GPT-NeoX warned of classifier_dropout, GPT-2 with its dropouts at 0 of
    summary_first_dropout, BERT and MiniLM after trl's disable_dropout_in_model of the stale config values, their
    outputs in training mode equal to eval mode's; and Mixtral's router_jitter_noise, which jitters its experts' input
    in training mode, went unwarned. It warns exactly where the outputs in training mode differ."""
    import warnings

    from pyro.infer import Predictive

    from pyro_lora.modes import dropout_in_training

    net, likelihood, batch = _tiny(family, **options)
    model = LoraModel(net, likelihood, prior=0.5)
    guide = MAPGuide(model)

    def outputs(training):
        net.train(training)
        _dropout_modules(net, **dropout)
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = Predictive(model, guide=guide, num_samples=1, return_sites=["_RETURN"])(batch)["_RETURN"]
        return out, [w for w in caught if "Predictive runs the network with dropout on" in str(w.message)]

    evaluated, none = outputs(False)
    trained, warned = outputs(True)
    assert not none
    assert (not torch.equal(evaluated, trained)) == noisy
    assert bool(warned) == noisy == bool(dropout_in_training(net))
