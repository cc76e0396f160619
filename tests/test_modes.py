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
