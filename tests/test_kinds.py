"""The table of LoRA matrix kinds: each kind's shape, peft parameter and hand-off, and a new kind added by one entry."""

import pytest
import torch
from conftest import random_batch, tiny_bert

from pyro_lora import LoraModel, ScalaBLModel, SequenceClassification
from pyro_lora.kinds import KINDS, MatrixKind, between_kinds, register_kind, scale
from pyro_lora.loraxs import LoraXSModel

R, D_IN, D_OUT = 4, 32, 32  # tiny_bert: rank 4 on the 32 -> 32 query and value projections
EXPECTED = {  # letter: (shape, peft parameter, keeps A and B frozen, role)
    "A": ((R, D_IN), "lora_A", False, "down"),
    "B": ((D_OUT, R), "lora_B", False, "up"),
    "R": ((R, R), None, True, "between"),
    "S": ((1, R), None, False, "between"),
}


@pytest.mark.parametrize("letter", sorted(EXPECTED))
def test_each_kind_is_one_table_entry(letter):
    shape, parameter, freezes, role = EXPECTED[letter]
    kind = KINDS[letter]
    assert (kind.matrix_shape(R, D_IN, D_OUT), kind.parameter, kind.freezes_lora, kind.role) == (shape, parameter, freezes, role)
    if kind.model:  # the model class that prepares its layers (ScalaBL's rotation, LoRA-XS's SVD)
        # peft's B = 0 for LoRA-XS, which refuses to overwrite a trained LoRA
        net = tiny_bert(random_b=kind.model != "LoraXSModel")
        model = {"ScalaBLModel": ScalaBLModel, "LoraXSModel": LoraXSModel}[kind.model](net, SequenceClassification())
    else:
        model = LoraModel(tiny_bert(), SequenceClassification(), random=letter)
    assert [s.kind for s in model.sites.values()] == [kind, kind]
    assert all(s.shape == (2,) + shape for s in model.sites.values())
    values = model.adapter_values()
    for name, site in model.sites.items():
        if parameter is None:  # starts at zero, nothing to write back
            assert not values[name].any()
        else:  # stacked from the peft parameter
            peft = [getattr(model.layers[p], parameter)["default"].weight for p in site.layers]
            torch.testing.assert_close(values[name], torch.stack(peft).detach())
    lora = [p for layer in model.layers.values() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    random = {id(p) for p in model.random_parameters()}
    assert len(random) == (4 if parameter else 0)
    assert all(p.requires_grad == (id(p) not in random and not freezes) for p in lora)
    if parameter is None:
        with pytest.raises(ValueError, match="no peft parameter"):
            model.write_adapter(values)
    else:
        model.write_adapter({n: v + 1 for n, v in values.items()})
        torch.testing.assert_close(model.adapter_values(), {n: v + 1 for n, v in values.items()})


def test_between_kinds_apply_in_stage_order():
    assert [k.letter for k in between_kinds()] == ["S", "R"]  # B R diag(exp(z)) A x


def _gate(h, value, num_samples):
    return scale(h, 1 + value, num_samples)


@pytest.fixture
def gate_kind():
    """A new kind: a ``1 x r`` gate ``diag(1 + d)`` applied to ``A x`` after the LoRA-XS core, no peft parameter."""
    kind = register_kind(MatrixKind("G", lambda r, d_in, d_out: (1, r), "between", apply=_gate, stage=3, description="gate"))
    yield kind
    del KINDS["G"]


class GatedModel(LoraModel):
    """A model variant whose random sites are the gates: one subclass beside the table entry."""

    name = "gated"

    def __init__(self, net, likelihood, **kwargs):
        super().__init__(net, likelihood, random="G", **kwargs)

    @classmethod
    def restore(cls, net, likelihood, random, **kwargs):
        return cls(net, likelihood, **kwargs)


def test_a_new_kind_is_one_subclass_plus_one_table_entry(gate_kind):
    net = tiny_bert()
    model = GatedModel.restore(net, SequenceClassification(), random="AB", num_data=8)
    assert [s.kind for s in model.sites.values()] == [gate_kind, gate_kind]
    assert all(s.shape == (2, 1, R) for s in model.sites.values())
    values = model.adapter_values()
    assert not any(v.any() for v in values.values())
    assert all(p.requires_grad for layer in model.layers.values() for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch, values), model.logits(batch))  # gate 0: the LoRA as it is
        g = torch.Generator().manual_seed(0)
        gates = {n: torch.randn(2, *s.shape, generator=g) for n, s in model.sites.items()}
        sampled = model.logits(batch, gates, num_samples=2)
        for s in range(2):
            # B diag(1 + d) A x == (B diag(1 + d)) A x: fold the gate into B and run peft's own forward
            folded = LoraModel(tiny_bert(), SequenceClassification(), random="B")
            b = folded.adapter_values()
            for n, site in folded.sites.items():
                b[n] = b[n] * (1 + gates[n.replace("lora_B", "lora_G")][s])
            folded.write_adapter(b)
            torch.testing.assert_close(sampled[s], folded.logits(batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"no peft parameter.*"):
        model.write_adapter(values)


def test_register_kind_refuses_clashes():
    with pytest.raises(ValueError, match="already registered"):
        register_kind(MatrixKind("A", lambda r, d_in, d_out: (r, d_in), "between", apply=_gate))
    with pytest.raises(ValueError, match="already a 'down' kind"):
        register_kind(MatrixKind("Z", lambda r, d_in, d_out: (r, d_in), "down", parameter="lora_A"))
    with pytest.raises(ValueError, match="apply"):
        MatrixKind("Z", lambda r, d_in, d_out: (1, r), "between")
    assert "Z" not in KINDS


def test_model_classes_name_themselves_and_restore_a_saved_guide_s_model():
    assert (LoraModel.name, LoraXSModel.name, ScalaBLModel.name) == ("lora", "lora_xs", "scalabl")
    lik = SequenceClassification()
    assert [s.matrix for s in LoraModel.restore(tiny_bert(), lik, "A", prior=0.5).sites.values()] == ["A", "A"]
    assert {s.matrix for s in LoraXSModel.restore(tiny_bert(random_b=False), lik, "R").sites.values()} == {"R"}
    net = tiny_bert()
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    model = ScalaBLModel.restore(net, lik, "S", num_data=4)
    assert {s.matrix for s in model.sites.values()} == {"S"} and model.num_data == 4
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if "lora_" in n)  # not rotated
