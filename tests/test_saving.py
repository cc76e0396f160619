"""What the saved files give back: an exported adapter pairs the trained head with the LoRA it was trained with, and
what peft would reload otherwise is said."""

import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_bert_base, tiny_llama
from peft import PeftModel

from pyro_lora import LoraModel, export_adapter, fit, predict
from pyro_lora.guides import MAPGuide, MeanFieldGuide
from pyro_lora.likelihoods import CausalLM, SequenceClassification


def labelled(n=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def peft_probs(folder, batch):
    net = PeftModel.from_pretrained(tiny_bert_base(num_labels=2), folder).eval()
    with torch.no_grad():
        return net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.softmax(-1)


@pytest.mark.parametrize("make", [MAPGuide, lambda model: MeanFieldGuide(model, b="normal")], ids=["map", "meanfield"])
def test_exporting_a_model_whose_head_a_guide_trained_without_its_lora_is_refused(tmp_path, make):
    """export_adapter(model) after fit with a MAPGuide, its mean never written into the adapter, wrote the trained
    head beside the LoRA from before training, without a word (the folder's accuracy 0.625 where the MAP's is 1.000,
    probabilities 0.68 apart); adapter_values refused that pairing already, and export refuses it by the same check."""
    batch = labelled()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    guide = make(model)
    fit(model, guide, [batch], epochs=30, lr=3e-2, progress=False)
    trained = predict(model, guide, [batch], mean=True).probs
    with pytest.raises(ValueError, match=rf"head was trained by a {type(guide).__name__} whose LoRA values the adapter "
                                         r"does not hold .*: the exported adapter would pair them with the trained head; "
                                         r"export_adapter\(guide, folder\) writes"):
        export_adapter(model, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    export_adapter(model, tmp_path / "model")
    export_adapter(guide, tmp_path / "guide")
    for folder in ("model", "guide"):
        torch.testing.assert_close(peft_probs(tmp_path / folder, batch), trained, atol=1e-5, rtol=0)


def test_exporting_an_adapter_whose_fit_trained_no_head_warns(tmp_path):
    """With no head to pair, fit's unwritten mean is said (as a guide built from the adapter says it): the exported
    adapter would be the LoRA from before training."""
    model = LoraModel(tiny_llama(), CausalLM(), prior=0.5)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    guide = MAPGuide(model)
    fit(model, guide, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], lr=1e-2, progress=False)
    with pytest.warns(UserWarning, match="still holds the LoRA values it held when fit last trained this network with a "
                                         "MAPGuide, not that guide's mean: the exported adapter would miss the training") as caught:
        export_adapter(model, tmp_path / "adapter")
    assert caught[0].filename == __file__  # said where export_adapter was called
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        export_adapter(model, tmp_path / "adapter")
