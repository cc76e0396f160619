"""What the saved files give back: an exported adapter pairs the trained head with the LoRA it was trained with, and
what peft would reload otherwise is said."""

import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_bert_base, tiny_llama
from test_training import toy_data
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


@pytest.mark.parametrize("trainer", ["fit", "svi"])
def test_an_unwritten_lora_is_refused_after_the_guide_that_trained_the_head_is_collected(tmp_path, trainer):
    """The refusal above followed the live guide: once the MAPGuide was garbage-collected, export_adapter(model) wrote
    the untrained LoRA beside the trained head (reloaded probabilities 0.17 off the MAP's), and a guide built from the
    adapter started there, without a word. The record of the training (fit's, or an SVI step's) refuses alike."""
    import gc

    import pyro
    from pyro.infer import SVI, Trace_ELBO

    batch = labelled()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    guide = MAPGuide(model)
    if trainer == "fit":
        fit(model, guide, [batch], epochs=10, lr=3e-2, progress=False)
    else:
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 3e-2}), Trace_ELBO())
        for _ in range(10):
            svi.step(batch)
        del svi
    trained = predict(model, guide, [batch], mean=True).probs
    mean = {k: v.detach().clone() for k, v in guide.mean().items()}
    del guide
    gc.collect()
    match = rf"head was trained by a MAPGuide whose LoRA values the adapter does not hold .*before {trainer if trainer == 'fit' else 'pyro.infer.SVI'}"
    with pytest.raises(ValueError, match=match):
        export_adapter(model, tmp_path / "model")
    with pytest.raises(ValueError, match=match):
        MeanFieldGuide(model, learn_loc=False)
    assert not (tmp_path / "model").exists()
    model.write_adapter(mean)
    export_adapter(model, tmp_path / "model")
    torch.testing.assert_close(peft_probs(tmp_path / "model", batch), trained, atol=1e-5, rtol=0)


def test_a_scalabl_model_over_a_written_map_is_not_taken_for_a_stale_adapter(tmp_path):
    """ScalaBL rotates A and B to A's singular basis (B A kept): the adapter then holds the MAP's LoRA otherwise
    written, which a weight-by-weight comparison took for the untrained adapter; ScalaBL's sites (the log-scales)
    are what is compared, and the rotated adapter builds and exports."""
    from pyro_lora import ScalaBLModel
    from pyro_lora.guides import ScalaBLGuide

    batch = labelled()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    guide = MAPGuide(model)
    fit(model, guide, [batch], epochs=5, lr=3e-2, progress=False)
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    scalabl = ScalaBLModel(model.net, SequenceClassification(), prior=1.0, num_data=16)
    assert not torch.equal(dict(scalabl.named_lora_weights())[next(iter(dict(model.named_lora_weights())))],
                           guide.mean()["query.lora_A"][0])  # rotated
    ScalaBLGuide(scalabl)
    export_adapter(scalabl, tmp_path / "adapter")


def test_a_scalabl_model_over_an_unwritten_map_is_refused_as_a_stale_adapter():
    """After fit with a MAPGuide, its LoRA never written: ScalaBL's sites (the log-scales) have no A or B to compare,
    so ScalaBLModel and ScalaBLGuide were accepted and z = 0 was peft's untrained LoRA beside the trained head
    (probabilities 0.159 off the MAP's, one prediction of 12 changed). The layers' B A are compared, to rounding."""
    from pyro_lora import ScalaBLModel
    from pyro_lora.guides import ScalaBLGuide

    batch = labelled()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    guide = MAPGuide(model)
    fit(model, guide, [batch], epochs=5, lr=3e-2, progress=False)
    with pytest.raises(ValueError, match=r"trained by a MAPGuide whose LoRA values the adapter does not hold "
                                         r"\(.*attention.self.query, ...\).*write_adapter\(guide.mean\(\)\) first"):
        ScalaBLModel(model.net, SequenceClassification(), prior=1.0, num_data=16)  # before it rotates A and B
    model.write_adapter({k: v.detach() for k, v in guide.mean().items()})
    scalabl = ScalaBLModel(model.net, SequenceClassification(), prior=1.0, num_data=16)
    at_zero = predict(scalabl, ScalaBLGuide(scalabl), [batch], mean=True).probs
    torch.testing.assert_close(at_zero, predict(model, guide, [batch]).probs, rtol=0, atol=1e-5)


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


@pytest.mark.parametrize("mixture", [False, True], ids=["ensemble", "mola"])
def test_save_guide_writes_no_adapter_of_a_guide_with_per_member_heads(tmp_path, mixture):
    """save_guide(guide, path, adapter=True) ran none of export_adapter's guide checks: of an ensemble or a Laplace
    mixture (per-member heads) it wrote the members' mean LoRA beside the network's untrained head (peft's p(y=1) 0.498
    everywhere where the ensemble's were 0.551 and 0.655). Refused as export_adapter refuses, before anything is
    written; the guide alone is saved."""
    from pyro_lora import save_guide
    from pyro_lora.guides import LaplaceMixtureGuide, train_ensemble

    batch = labelled()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    guide = train_ensemble(model, [batch], k=2, seeds=[0, 1], fit_kwargs={"epochs": 2, "lr": 3e-2, "progress": False})
    if mixture:
        guide = LaplaceMixtureGuide.from_ensemble(guide, fisher="exact", rank=2).fit([batch], progress=False)
    for write in (lambda: save_guide(guide, tmp_path / "guide", adapter=True), lambda: export_adapter(guide, tmp_path / "guide")):
        with pytest.raises(ValueError, match=rf"cannot write a peft adapter of this {type(guide).__name__}: it carries its "
                                             r"own .*classifier.* \(per member\).*save_guide\(guide, path\) without "
                                             r"adapter=True keeps the whole guide"):
            write()
        assert not (tmp_path / "guide").exists()
    save_guide(guide, tmp_path / "guide")


def test_a_posterior_sample_written_beside_the_head_exports_and_a_stale_adapter_names_the_heads_guide(tmp_path):
    """A MAP trains the head, a mean-field guide around it (train_network=False) is saved and loaded (which makes it
    the head's guide), and one of its samples is written with write_adapter: export_adapter(model) refused it, saying
    the head "was trained by a MeanFieldGuide", which never trained it. The sample is what the mean-field predictive
    pairs with that head, so it is exported (peft's logits are the model's at the sample, exactly); an adapter never
    written is refused naming load_guide, and a written one whose head was trained since is refused again."""
    import pyro
    from pyro.infer import TraceMeanField_ELBO

    from pyro_lora import load_guide, save_guide

    batch = labelled()
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    pyro.set_rng_seed(0)
    map_guide = MAPGuide(model)
    fit(model, map_guide, [batch], epochs=3, lr=3e-2, progress=False)
    model.write_adapter({k: v.detach() for k, v in map_guide.mean().items()})
    guide = MeanFieldGuide(model, b="normal", learn_loc=False, std_lr_scale=100.0)
    fit(model, guide, [batch], epochs=2, lr=1e-2, elbo=TraceMeanField_ELBO(), train_network=False, progress=False)
    save_guide(guide, tmp_path / "meanfield")

    again = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    loaded = load_guide(tmp_path / "meanfield", again)
    with pytest.raises(ValueError, match=r"the network's head is the one load_guide restored with a MeanFieldGuide whose "
                                         r"LoRA values the adapter does not hold"):
        export_adapter(again, tmp_path / "sample")
    sample = {k: v[0] for k, v in loaded.sample(1).items()}
    again.write_adapter(sample)
    export_adapter(again, tmp_path / "sample")
    peft = LoraModel(PeftModel.from_pretrained(tiny_bert_base(num_labels=2), tmp_path / "sample").eval(),
                     SequenceClassification(), prior=1.0, num_data=16)
    again.net.eval()
    with torch.no_grad():
        assert torch.equal(peft.logits(batch), again.logits(batch, sample))

    retrained = MAPGuide(again)  # from the written sample, then the head trained beside its own LoRA
    fit(again, retrained, [batch], epochs=2, lr=3e-2, progress=False)
    with pytest.raises(ValueError, match=r"the network's head was trained by a MAPGuide whose LoRA values the adapter "
                                         r"does not hold"):
        export_adapter(again, tmp_path / "sample")


def test_a_loaded_guide_dropped_keeps_the_refusal_of_its_restored_head(tmp_path):
    """load_guide restores the head beside a mean the adapter does not hold: refused while the loaded guide lived, but
    a helper that loads, predicts and returns the model dropped it, and MAPGuide(model) and export_adapter then paired
    the adapter's LoRA with the restored head without a word (accuracy 0.688 against 1.000). The load keeps a record,
    as fit does; written into the adapter, its values go."""
    import gc

    from pyro_lora import load_guide, save_guide

    data = toy_data(n=16, batch=8)
    model = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
    trained = MAPGuide(model)
    fit(model, trained, data, epochs=2, lr=3e-2, progress=False)
    save_guide(trained, tmp_path / "map")

    def loaded_model():
        again = LoraModel(tiny_bert(num_labels=2), SequenceClassification(), prior=1.0, num_data=16)
        predict(again, load_guide(tmp_path / "map", again), data, mean=True)
        return again

    again = loaded_model()
    gc.collect()
    match = r"the network's head is the one load_guide restored with a MAPGuide whose LoRA values the adapter does not hold"
    with pytest.raises(ValueError, match=match):
        MAPGuide(again)
    with pytest.raises(ValueError, match=match):
        export_adapter(again, tmp_path / "stale")
    again.write_adapter(trained.mean())
    torch.testing.assert_close(MAPGuide(again).mean(), trained.mean())


def bf16_bert(**peft):
    """The tiny BERT in bfloat16 under a LoRA whose B is random, with the peft options ``peft``."""
    from peft import LoraConfig, get_peft_model

    net = get_peft_model(tiny_bert_base(num_labels=2).to(torch.bfloat16),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", **peft))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n and n.endswith("weight"):
                p.normal_(0, 0.1)
    return net.eval()


def bf16_model(net):
    return LoraModel(net, SequenceClassification(), prior=1.0, num_data=16)


def test_a_trained_layernorm_of_a_bf16_base_that_peft_reloads_rounded_is_said_and_save_guide_keeps_it(tmp_path):
    """On a bfloat16 base, a LayerNorm in modules_to_save is trained and run in float32 (autocast computes layer_norm in
    float32), but PeftModel.from_pretrained loads the exported float32 values into a bfloat16 copy of the base's module:
    rounded by up to 3.6e-3, the restored logits 0.0039 off, without a word. The export says so, naming the module, the
    dtype and the rounding, and so does save_guide(..., adapter=True), whose adapter/ is the same (it was silent: 8e-4
    off in probability); save_guide / load_guide restore it exactly, and load_guide refuses to round it into a
    network holding that copy frozen in bfloat16."""
    from pyro_lora import load_guide, save_guide

    batch = labelled()
    model = bf16_model(bf16_bert(modules_to_save=["embeddings.LayerNorm"]))
    guide = MAPGuide(model)
    fit(model, guide, [batch], epochs=10, lr=3e-2, progress=False)
    with torch.no_grad():
        trained = model.logits(batch, guide.mean())
    with pytest.warns(UserWarning, match=r"the trained base_model\.model\.bert\.embeddings\.LayerNorm\.modules_to_save\."
                                         r"default\.(weight|bias) \(and 1 more\) is held in float32, but PeftModel\."
                                         r"from_pretrained reloads it into the base's bfloat16 copy .* rounded by up to "
                                         r"0\.00\d+, .*save_guide") as caught:
        export_adapter(guide, tmp_path / "adapter")
    assert caught[0].filename == __file__
    with pytest.warns(UserWarning, match=r"LayerNorm\.modules_to_save\.default\.(weight|bias) \(and 1 more\) is held in "
                                         r"float32, but PeftModel\.from_pretrained reloads it") as caught:
        save_guide(guide, tmp_path / "saved", adapter=True)  # its adapter/ is export_adapter's, and so is the warning
    assert caught[0].filename == __file__
    base = lambda: tiny_bert_base(num_labels=2).to(torch.bfloat16)  # noqa: E731
    peft = bf16_model(PeftModel.from_pretrained(base(), tmp_path / "adapter").eval())
    with torch.no_grad():
        assert (peft.logits(batch) - trained).abs().max() > 1e-3  # what the warning says: peft rounds it

    save_guide(guide, tmp_path / "guide")
    again = bf16_model(bf16_bert(modules_to_save=["embeddings.LayerNorm"]))
    loaded = load_guide(tmp_path / "guide", again)
    with torch.no_grad():
        assert torch.equal(again.logits(batch, loaded.mean()), trained)
    with pytest.raises(ValueError, match=r"its trained base_model\.model\.bert\.embeddings\.LayerNorm\.modules_to_save\."
                                         r"default\.(weight|bias) would be written into this network's bfloat16 parameter, "
                                         r"rounded by up to 0\.00\d+, which the LayerNorm's forward runs at full precision"):
        load_guide(tmp_path / "guide", peft)
    trainable = bf16_model(PeftModel.from_pretrained(base(), tmp_path / "adapter", is_trainable=True).eval())
    loaded = load_guide(tmp_path / "guide", trainable)
    with torch.no_grad():
        assert torch.equal(trainable.logits(batch, loaded.mean()), trained)


@pytest.mark.parametrize("peft", [dict(modules_to_save=["pooler", "word_embeddings"], lora_bias=True),
                                  dict(trainable_token_indices={"word_embeddings": [7, 40]})], ids=["modules", "tokens"])
def test_a_bf16_bases_heads_embeddings_tokens_and_lora_bias_reload_exactly_and_unsaid(tmp_path, peft):
    """The classifier, a pooler and the word embeddings in modules_to_save also reload rounded to bfloat16, but the
    model ran them rounded already (autocast's linear; an embedding's output cast to the base's dtype), and peft
    reloads lora_bias and trainable-token deltas in float32: the exported adapter gives the same logits, unwarned."""
    batch = labelled()
    model = bf16_model(bf16_bert(**peft))
    guide = MAPGuide(model)
    fit(model, guide, [batch], epochs=10, lr=3e-2, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_adapter(guide, tmp_path / "adapter")
    assert not [w for w in caught if "from_pretrained reloads" in str(w.message)]  # (peft warns of lora_bias's shape)
    again = bf16_model(PeftModel.from_pretrained(tiny_bert_base(num_labels=2).to(torch.bfloat16), tmp_path / "adapter").eval())
    with torch.no_grad():
        assert torch.equal(again.logits(batch), model.logits(batch))


def autoguide_model(kind="AB", seed=0, **options):
    from pyro_lora import ScalaBLModel
    from pyro_lora.loraxs import LoraXSModel

    net = tiny_bert(num_labels=2, seed=seed, random_b=kind != "lora_xs")
    if kind == "scalabl":
        return ScalaBLModel(net, SequenceClassification(), prior=0.5, num_data=16, **options)
    if kind == "lora_xs":
        return LoraXSModel(net, SequenceClassification(), prior=0.5, num_data=16, **options)
    return LoraModel(net, SequenceClassification(), random=kind, prior=0.5, num_data=16, **options)


def trained_autoguide(model, cls, batch, **options):
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    autoguide = cls(model, **options)
    svi = SVI(model, autoguide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(10):
        svi.step(batch)
    return autoguide


def fresh_autoguide(model, cls, batch, **options):
    import pyro

    pyro.clear_param_store()
    autoguide = cls(model, **options)
    autoguide(batch)  # builds its parameters
    return autoguide


def samples(model, autoguide, batch):
    import pyro
    from pyro.infer import Predictive

    pyro.set_rng_seed(0)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    return Predictive(model, guide=autoguide, num_samples=4, return_sites=["_RETURN"])(unlabelled)["_RETURN"]


def _one_flow(dim):
    from pyro.distributions.transforms import planar

    return planar(dim)


@pytest.mark.parametrize("kind, cls, options", [
    ("AB", "AutoDiagonalNormal", {}), ("A", "AutoLowRankMultivariateNormal", {}), ("scalabl", "AutoNormal", {}),
    ("lora_xs", "AutoDelta", {}), ("A", "AutoIAFNormal", {"hidden_dim": [520]}),
    ("A", "AutoNormalizingFlow", {"init_transform_fn": _one_flow}), ("AB", "AutoStructured", {}),
    ("A", "AutoGaussian", {})], ids=lambda x: x if isinstance(x, str) else "")
def test_a_pyro_autoguide_is_kept_by_save_guide_and_load_guide(tmp_path, kind, cls, options):
    """save_guide refused a Pyro autoguide, pointing at export_adapter(model) plus its state_dict, a path with no
    check. It saves the autoguide's state, the network's trained parameters (the head; ScalaBL's A and B, LoRA-XS's
    from the SVD) and the model's signature, and load_guide(path, model, guide=autoguide) restores them into the model
    built as it was trained (ScalaBL rotating again, LoRA-XS running its SVD again): the same samples, bit for bit.
    AutoIAFNormal's and AutoNormalizingFlow's state holds one tensor twice (safetensors refused it: "Some tensors share
    memory"); AutoStructured and AutoGaussian empty their first trace's nodes (KeyError: 'type')."""
    import pyro.infer.autoguide as autoguides

    from pyro_lora import load_guide, save_guide

    cls = getattr(autoguides, cls)
    batch = labelled()
    model = autoguide_model(kind)
    autoguide = trained_autoguide(model, cls, batch, **options)
    model.net.eval()
    before = samples(model, autoguide, batch)
    save_guide(autoguide, tmp_path / "auto")
    again = autoguide_model(kind)
    restored = fresh_autoguide(again, cls, batch, **options)
    assert not torch.equal(samples(again, restored, batch), before)
    assert load_guide(tmp_path / "auto", again, guide=restored) is restored
    again.net.eval()
    after = samples(again, restored, batch)
    assert torch.equal(after, before)
    assert torch.equal(after[0], after[1]) == (cls is autoguides.AutoDelta)  # random draws, but AutoDelta's


def test_an_autoguide_is_refused_into_a_model_or_autoguide_other_than_the_saved(tmp_path):
    """A flat autoguide's state_dict (one vector) loaded without a word into the autoguide of a model built with
    random="B" for "A" (logits 0.068 off) or group="matrix" for "kind" (0.014), and any autoguide's on another base of
    the same shapes (0.32): load_guide refuses each, naming the difference, and an autoguide of another class, over
    other sites (poutine.block), never called, or missing; a refusal leaves the network and the autoguide as they were."""
    import pyro
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoNormal

    from pyro_lora import load_guide, save_guide

    batch = labelled()
    model = autoguide_model("A")
    save_guide(trained_autoguide(model, AutoLowRankMultivariateNormal, batch, rank=2), tmp_path / "auto")

    def refused(match, model, autoguide):
        network = {n: p.detach().clone() for n, p in model.net.named_parameters()}
        state = {k: v.detach().clone() for k, v in autoguide.state_dict().items()} if autoguide is not None else {}
        with pytest.raises(ValueError, match=match):
            load_guide(tmp_path / "auto", model, guide=autoguide)
        assert all(torch.equal(p, network[n]) for n, p in model.net.named_parameters())
        assert all(torch.equal(v, state[k]) for k, v in (autoguide.state_dict() if autoguide is not None else {}).items())

    low_rank = lambda model: fresh_autoguide(model, AutoLowRankMultivariateNormal, batch, rank=2)  # noqa: E731
    other = autoguide_model("B")
    refused(r"the guide has sites the model lacks: \['query\.lora_A', 'value\.lora_A'\] \(was the model built with "
            r"another random= or group=", other, low_rank(other))
    other = autoguide_model("A", group="matrix")
    refused(r"the guide has sites the model lacks: .* another random= or group=", other, low_rank(other))
    other = autoguide_model("A", seed=1)
    refused(r"the base weights differ from the ones the guide was built on", other, low_rank(other))
    same = autoguide_model("A")
    refused(r"it holds the state of a Pyro AutoLowRankMultivariateNormal; build one over the model", same,
            fresh_autoguide(same, AutoDiagonalNormal, batch))
    refused(r"is a Pyro AutoLowRankMultivariateNormal's state, .* load_guide\(path, model, guide=autoguide\)", same, None)
    pyro.clear_param_store()
    refused(r"this AutoLowRankMultivariateNormal: it was never called", same, AutoLowRankMultivariateNormal(same, rank=2))
    refused(r"this AutoLowRankMultivariateNormal: it is built over another LoraModel", same, low_rank(autoguide_model("A")))
    blocked = fresh_autoguide(pyro.poutine.block(same, hide=["value.lora_A"]), AutoLowRankMultivariateNormal, batch, rank=2)
    refused(r"its site 2 was 'value\.lora_A' of shape \(2, 4, 32\), and this AutoLowRankMultivariateNormal's is nothing "
            r"\(2 sites saved, 1 here\)", same, blocked)
    refused(r"holds AutoLowRankMultivariateNormal tensor 'cov_factor' of shape \(512, 2\), where this "
            r"AutoLowRankMultivariateNormal has \(512, 3\)", same, fresh_autoguide(same, AutoLowRankMultivariateNormal, batch, rank=3))
    loaded = load_guide(tmp_path / "auto", same, guide=low_rank(same))
    assert isinstance(loaded, AutoLowRankMultivariateNormal)

    save_guide(MAPGuide(autoguide_model("A")), tmp_path / "map")  # model's adapter lacks its autoguide's trained A
    with pytest.raises(ValueError, match=r"is a MAPGuide, which load_guide builds itself: call load_guide\(path, model\) "
                                         "without guide="):
        load_guide(tmp_path / "map", model, guide=AutoNormal(model))


def test_an_autoguide_lists_parts_are_loaded_onto_the_sites_they_were_trained_on_or_refused(tmp_path):
    """An AutoGuideList's parts are named by their index alone (0.loc, 1.loc): parts over the query and value sites,
    which have the same shapes, loaded into a list built with the parts the other way round without a word, each
    site's posterior then on the other matrix (predictive probabilities 0.26 off). save_guide records each part's
    own sites; load_guide restores the list built as trained, bit for bit, and refuses the swapped one, naming it."""
    import json

    import pyro

    from pyro_lora import load_guide, save_guide
    from pyro_lora.io import meta_sha256

    query, value = ["query.lora_A", "query.lora_B"], ["value.lora_A", "value.lora_B"]

    def parts(first, second):
        return lambda model: _guide_list(model, first, second)

    batch = labelled()
    model = autoguide_model("AB")
    autoguide = trained_autoguide(model, parts(query, value), batch)
    model.net.eval()
    before = samples(model, autoguide, batch)
    save_guide(autoguide, tmp_path / "list")
    assert [row[2] for row in json.loads((tmp_path / "list" / "guide.json").read_text())["autoguide"]["sites"]] == \
        ["0", "0", "1", "1"]
    again = autoguide_model("AB")
    swapped = fresh_autoguide(again, parts(value, query), batch)
    with pytest.raises(ValueError, match=r"its site 1 was 'query\.lora_A' of shape \(2, 4, 32\) in part 0, and this "
                                         r"AutoGuideList's is 'value\.lora_A' of shape \(2, 4, 32\) in part 0"):
        load_guide(tmp_path / "list", again, guide=swapped)
    restored = load_guide(tmp_path / "list", again, guide=fresh_autoguide(again, parts(query, value), batch))
    again.net.eval()
    assert torch.equal(samples(again, restored, batch), before)
    # saved by an older version: the model's sites, no parts (resealed as it would have been written)
    meta = json.loads((tmp_path / "list" / "guide.json").read_text())
    meta["autoguide"]["sites"] = [row[:2] for row in meta["autoguide"]["sites"]]
    meta["meta_sha256"] = meta_sha256(meta)
    (tmp_path / "list" / "guide.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="saved by an older pyro_lora, which recorded the model's sites, not which part "
                                         "of the list stands for which"):
        load_guide(tmp_path / "list", again, guide=fresh_autoguide(again, parts(query, value), batch))
    pyro.clear_param_store()


def test_an_autoguide_list_with_a_guide_function_part_is_refused_its_params_unsaved(tmp_path):
    """A part that is a guide function of one's own (AutoCallable) keeps its trained values in Pyro's param store,
    which save_guide does not write: saved and loaded without a word, its loc went from 0.0068 back to 0."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList

    from pyro_lora import save_guide

    value = ["value.lora_A", "value.lora_B"]

    def with_function(model):
        autoguide = AutoGuideList(model)
        autoguide.append(AutoDiagonalNormal(pyro.poutine.block(model, hide=value)))

        def mine(batch):
            return {s: pyro.sample(s, dist.Normal(pyro.param(f"my_{s}", torch.zeros(model.sites[s].shape)), 0.01)
                                   .to_event(len(model.sites[s].shape))) for s in value}

        autoguide.append(mine)
        return autoguide

    autoguide = trained_autoguide(autoguide_model("AB"), with_function, labelled())
    with pytest.raises(ValueError, match=r"cannot save this AutoGuideList: its part 1 is a guide function of your own "
                                         r"\(AutoCallable\), whose parameters live in Pyro's param store"):
        save_guide(autoguide, tmp_path / "function")
    assert not (tmp_path / "function").exists()
    pyro.clear_param_store()


def _guide_list(model, first, second):
    """An AutoGuideList of two AutoDiagonalNormal parts, over the sites ``first`` and then ``second``."""
    import pyro
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList

    autoguide = AutoGuideList(model)
    autoguide.append(AutoDiagonalNormal(pyro.poutine.block(model, expose=first)))
    autoguide.append(AutoDiagonalNormal(pyro.poutine.block(model, expose=second)))
    return autoguide


def test_a_guide_across_a_torch_compile_wrapper_and_the_network_itself_is_refused_naming_torch_compile(tmp_path):
    """torch.compile(net) puts '_orig_mod.' before every module path: a guide saved on one side was refused on the other
    as holding 'other matrices', naming no torch.compile, and export_adapter from the wrapper said to build the
    LoraModel on the PeftModel rather than on its base_model."""
    from pyro_lora import load_guide, save_guide

    def model(compiled):
        net = tiny_bert()
        return LoraModel(torch.compile(net, backend="eager") if compiled else net, SequenceClassification(), num_data=6)

    for saved in (False, True):
        on = model(saved)
        save_guide(MeanFieldGuide(on, b="normal"), tmp_path / str(saved))
        with pytest.raises(ValueError, match=f"built on {'a' if saved else 'no'} torch.compile wrapper .* net._orig_mod"):
            load_guide(tmp_path / str(saved), model(not saved))
    with pytest.raises(ValueError, match=r"torch.compile wrapper \(OptimizedModule\) of a PeftModel.* net._orig_mod"):
        export_adapter(MeanFieldGuide(on, b="normal"), tmp_path / "adapter")


@pytest.mark.parametrize("kind", ["lora_xs", "scalabl"])
def test_exporting_a_model_whose_head_was_trained_beside_cores_or_scales_is_refused(tmp_path, kind):
    """After fit of a LoRA-XS (or ScalaBL) model, export_adapter(model) wrote its head beside A and B, which peft runs at
    R = I (z = 0), not at the trained mean (reloaded logits 2.75 off; 1.26 for ScalaBL), without a word: the check
    compared sites with a peft parameter only. Each layer's B M A is compared; a new LoraModel over the network (its
    guide's start: the adapter's B A) and a second ScalaBLModel (before it rotates A and B) are refused alike."""
    from pyro.infer import TraceMeanField_ELBO

    from pyro_lora import ScalaBLModel
    from pyro_lora.guides import ScalaBLGuide
    from pyro_lora.loraxs import LoraXSModel

    batch = labelled()
    net = tiny_bert(num_labels=2, random_b=kind != "lora_xs")
    if kind == "lora_xs":
        model = LoraXSModel(net, SequenceClassification(), num_data=16)
        guide = MAPGuide(model)
        fit(model, guide, [batch], epochs=10, lr=0.2, progress=False)
        plain = {n: torch.eye(s.shape[-1]).expand(s.shape) for n, s in model.sites.items()}  # peft's B A: R = I
    else:
        model = ScalaBLModel(net, SequenceClassification(), num_data=16)
        guide = ScalaBLGuide(model)
        fit(model, guide, [batch], epochs=10, lr=0.2, progress=False, elbo=TraceMeanField_ELBO())
        plain = {n: torch.zeros(s.shape) for n, s in model.sites.items()}  # peft's B A: z = 0
    mean = {k: v.detach() for k, v in guide.mean().items()}
    trained = predict(model, guide, [batch], mean=True).probs
    with torch.no_grad():  # what the adapter would carry is another model than the trained one
        assert (model.logits(batch, plain).softmax(-1) - trained).abs().max() > 1e-3
    with pytest.raises(ValueError, match=rf"head was trained by a {type(guide).__name__} whose LoRA values the adapter "
                                         r"does not hold \(.*attention.self.query, ...\) \(its .* sites have no peft "
                                         r"parameter.*the exported adapter would pair them"):
        export_adapter(model, tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(ValueError, match="whose LoRA values the adapter does not hold"):
        MAPGuide(LoraModel(net, SequenceClassification(), num_data=16))
    if kind == "lora_xs":  # a second model's guide started at R = 0 beside the trained head; init=guide.mean() is right
        again = LoraXSModel(net, SequenceClassification(), num_data=16)
        with pytest.raises(ValueError, match="whose LoRA values the adapter does not hold"):
            MAPGuide(again)
        torch.testing.assert_close(predict(again, MAPGuide(again, init=mean), [batch]).probs, trained, atol=1e-6, rtol=0)
    else:
        with pytest.raises(ValueError, match=r"a ScalaBLModel rotating its A and B would pair them"):
            ScalaBLModel(net, SequenceClassification(), num_data=16)
        torch.testing.assert_close(predict(model, guide, [batch], mean=True).probs, trained, atol=0, rtol=0)


def test_exporting_a_loraxs_model_whose_fit_trained_no_head_warns(tmp_path):
    """A LoRA-XS fit with no head to pair left A and B as they were (the SVD) and its cores in the guide alone: the
    export (peft's R = I) missed the training without a word, where a plain LoRA's unwritten fit warns."""
    from pyro_lora.loraxs import LoraXSModel

    model = LoraXSModel(tiny_llama(random_b=False), CausalLM(), num_data=4)
    guide = MAPGuide(model)
    batch = {"input_ids": torch.randint(1, 64, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    fit(model, guide, [batch | {"labels": batch["input_ids"]}], epochs=2, lr=0.1, progress=False)
    assert not model.named_point_parameters() and any(v.any() for v in guide.mean().values())
    with pytest.warns(UserWarning, match=r"still holds the LoRA values it held when fit last trained this network with "
                                         r"a MAPGuide, not that guide's mean: the exported adapter would miss the training"):
        export_adapter(model, tmp_path / "adapter")


def test_a_guide_function_of_ones_own_is_refused_by_name_by_every_entry_point(tmp_path):
    """A hand-written Pyro guide (a plain function) passed to fit, save_guide or export_adapter crashed with
    "'function' object has no attribute 'parameters'" ('model') where predict named what it needs."""
    import pyro
    import pyro.distributions as dist

    from pyro_lora import save_guide

    model = LoraModel(tiny_bert(), SequenceClassification(), num_data=16)

    def guide(batch, kl_weight=1.0):
        for name, site in model.sites.items():
            pyro.sample(name, dist.Normal(torch.zeros(site.shape), 0.1).to_event(len(site.shape)))

    for action, call in [("fit", lambda: fit(model, guide, [labelled()], checkpoint_dir=tmp_path / "c")),
                         ("save the guide", lambda: save_guide(guide, tmp_path / "g")),
                         ("export the adapter", lambda: export_adapter(guide, tmp_path / "a")),
                         ("predict", lambda: predict(model, guide, [labelled()]))]:
        with pytest.raises(ValueError, match=f"cannot {action} with a function: .*or a guide function of your own, use pyro.infer.SVI"):
            call()
    assert not any(tmp_path.iterdir())


def test_an_autoguide_saved_in_float64_is_refused_by_a_float32_one_and_loads_into_a_float64_one(tmp_path):
    """load_guide rounded a float64 AutoNormal's saved values into the float32 one given (1.2e-7 off), without a word."""
    from pyro.infer.autoguide import AutoNormal

    from pyro_lora import load_guide, save_guide

    batch = labelled()
    model = autoguide_model("A")
    guide = trained_autoguide(model, AutoNormal, batch).double()
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(1e-3 * torch.randn_like(p))  # off float32's grid
    save_guide(guide, tmp_path / "auto")
    other = autoguide_model("A")
    with pytest.raises(ValueError, match="saved in float64 and the AutoNormal given holds float32.*call .double"):
        load_guide(tmp_path / "auto", other, guide=fresh_autoguide(other, AutoNormal, batch))
    loaded = load_guide(tmp_path / "auto", other, guide=fresh_autoguide(other, AutoNormal, batch).double())
    assert all(torch.equal(p, q) for p, q in zip(guide.parameters(), loaded.parameters()))
