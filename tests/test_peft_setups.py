"""peft set-ups: what the weight hand-off implements gives peft's own logits; what it does not is refused by name."""

import re
import warnings

import pytest
import torch
from conftest import _randomize_b, random_batch, tiny_bert, tiny_bert_base, tiny_llama
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import pyro_lora.handoff as handoff
from pyro_lora.guides import MAPGuide
from pyro_lora import LoraModel, SequenceClassification, export_adapter, fit, predict
from pyro_lora.likelihoods import CausalLM, MultipleChoice


def bert_with(**config):
    torch.manual_seed(0)
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", **config))
    _randomize_b(net)
    return net.eval()


def batch():
    return random_batch() | {"labels": torch.tensor([0, 2, 1])}


@pytest.mark.parametrize(
    "config",
    [{}, {"use_rslora": True}, {"lora_bias": True}, {"rank_pattern": {"value": 2}, "alpha_pattern": {"query": 3}}],
    ids=["plain", "rslora", "lora_bias", "rank_alpha_pattern"],
)
def test_handed_adapter_values_reproduce_peft_logits(config):
    net = bert_with(**config)
    if config.get("lora_bias"):
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "lora_B" in n and n.endswith("bias"):
                    p.normal_(0, 0.1)  # peft starts it at zero, which would hide a missing bias
    model = LoraModel(net, SequenceClassification())
    with torch.no_grad():
        peft_logits = net(**random_batch()).logits
        handed = model.logits(batch(), model.adapter_values())
        sampled = model.logits(batch(), {n: v.expand(2, *v.shape) for n, v in model.adapter_values().items()}, num_samples=2)
    torch.testing.assert_close(handed, peft_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sampled, peft_logits.expand(2, -1, -1), rtol=1e-5, atol=1e-6)


def test_dora_is_refused():
    with pytest.raises(ValueError, match=r"uses the peft variant DoraLinearVariant \(set by use_dora=True in its LoraConfig\).*\(use_dora=False\)"):
        LoraModel(bert_with(use_dora=True), SequenceClassification())


def test_two_active_adapters_are_refused():
    net = tiny_llama()
    net.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    net.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match=r"several adapters are active at once \(\['default', 'other'\]\)"):
        LoraModel(net, CausalLM())


def test_set_adapter_after_building_is_refused_at_every_use():
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    net.add_adapter("other", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    net.set_adapter("other")
    message = r"the network now runs adapter 'other', but this LoraModel was built for adapter 'default'"
    with pytest.raises(ValueError, match=message):
        predict(model, guide, [batch()])
    with pytest.raises(ValueError, match=message):
        model.logits(batch(), guide.mean())
    with pytest.raises(ValueError, match=message):
        model.logits(batch())
    net.set_adapter("default")
    predict(model, guide, [batch()])  # back to the adapter it was built for


def test_an_adapter_that_is_not_active_is_refused_at_build():
    net = bert_with()
    net.add_adapter("other", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match=r"adapter 'other' is not the network's active adapter"):
        LoraModel(net, SequenceClassification(), adapter="other")


def test_lora_on_embeddings_warns_naming_the_layers():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    net = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(UserWarning, match=r"LoRA on embedding layers \['base_model.model.model.embed_tokens'\] is not made random"):
        model = LoraModel(net, CausalLM())
    assert set(model.sites) == {"q_proj.lora_A", "q_proj.lora_B"}
    assert any("lora_embedding" in n for n, _ in model.named_point_parameters())


def test_unsupported_lora_layer_types_are_refused():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.conv = torch.nn.Conv1d(8, 8, 3)

    net = get_peft_model(Net(), LoraConfig(r=2, target_modules=["proj", "conv"]))
    with pytest.raises(ValueError, match=r"types the weight hand-off does not implement: \['base_model.model.conv \(Conv1d\)'\]"):
        LoraModel(net, SequenceClassification())


def test_lora_on_a_tied_lm_head_whose_matrices_peft_shares_with_the_embedding_is_refused():
    """``ensure_weight_tying=True`` makes lm_head's lora_A / lora_B views of the embedding LoRA's matrices: a handed
    sample changed the lm_head side only (0.999 in probability against the network holding the same values)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    tied = LoraConfig(r=4, target_modules=["q_proj", "lm_head"], ensure_weight_tying=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # refused before the embedding LoRA's point-estimate warning
        with pytest.raises(ValueError, match=r"LoRA matrix base_model.model.lm_head.lora_[AB].default shares its storage with "
                                             r"base_model.model.model.embed_tokens.lora_embedding_[AB].default .*ensure_weight_tying"):
            LoraModel(get_peft_model(LlamaForCausalLM(config), tied), CausalLM())
    untied = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "lm_head.lora_A" in LoraModel(untied, CausalLM()).sites  # the tied base weight alone is no LoRA matrix


def test_lora_on_parameters_alone_is_refused_naming_target_parameters():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    net = get_peft_model(Net(), LoraConfig(r=2, target_parameters=["proj.weight"]))
    with pytest.raises(ValueError, match=r"does not implement: \['base_model.model.proj \(ParamWrapper\)'\].*target_parameters"):
        LoraModel(net, SequenceClassification())


def test_writing_into_a_merged_adapter_is_refused_and_base_weights_survive(tmp_path):
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    with torch.no_grad():
        for loc in guide.locs:
            loc.mul_(2.0)
    base = {n: p.detach().clone() for n, p in net.named_parameters() if "base_layer" in n}
    net.merge_adapter()
    with pytest.raises(ValueError, match="merged into its base weight: call net.unmerge_adapter"):
        export_adapter(guide, tmp_path / "a")
    with pytest.raises(ValueError, match="merged into its base weight"):
        model.write_adapter(guide.mean())
    net.unmerge_adapter()
    for n, p in net.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)
    export_adapter(guide, tmp_path / "a")  # unmerged, it writes


def test_disabled_adapters_refuse_handed_weights():
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    with net.disable_adapter():
        base_logits = model.logits(batch())  # guide-free: peft's own forward, the base model
        with pytest.raises(ValueError, match="adapters are disabled"):
            model.logits(batch(), model.adapter_values())
    torch.testing.assert_close(base_logits, tiny_bert_base().eval()(**random_batch()).logits)


def test_nested_handoff_contexts_restore_the_outer_weights():
    net = tiny_llama()
    model = LoraModel(net, CausalLM())
    layers = model.layers
    path = next(iter(layers))
    layer = layers[path]
    x = torch.randn(2, 32)
    outer = {p: {"A": torch.randn(4, 32)} for p in layers}
    inner = {p: {"A": torch.randn(4, 32)} for p in layers}
    with torch.no_grad(), handoff.handed(layers, model.adapter, outer):
        expected = layer(x)
        with handoff.handed(layers, model.adapter, inner):
            assert not torch.allclose(layer(x), expected)
        torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), type(layer).forward(layer, x))  # all left: peft's own forward


def test_peft_mixed_batch_forward_with_handed_weights_is_refused():
    net = tiny_llama()
    model = LoraModel(net, CausalLM())
    layer = next(iter(model.layers.values()))
    with handoff.handed(model.layers, model.adapter, {}), pytest.raises(ValueError, match="mixed-batch forward"):
        layer(torch.randn(2, 32), adapter_names=["default", "default"])


@pytest.mark.parametrize("where", ["lora_B forward hook", "lora_A forward pre-hook", "lora_B backward hook"])
def test_a_hook_on_lora_a_or_b_that_the_handoff_would_skip_is_refused_naming_the_layer(where):
    # the hand-off computes B A x from the matrices without calling lora_A / lora_B: a hook there ran in peft's forward
    # (zeroed LoRA output: logits 0.006 off) but silently not under a guide's weights, even the adapter's own
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    path, layer = next(iter(model.layers.items()))
    submodule, kind = where.split(" ", 1)
    module = getattr(layer, submodule)["default"]
    register = {"forward hook": lambda: module.register_forward_hook(lambda m, a, o: o * 0),
                "forward pre-hook": lambda: module.register_forward_pre_hook(lambda m, a: (a[0] * 0,)),
                "backward hook": lambda: module.register_full_backward_hook(lambda m, gi, go: None)}[kind]
    handle = register()
    with torch.no_grad():
        hooked = net(**random_batch()).logits
        torch.testing.assert_close(model.logits(batch()), hooked)  # guide-free: peft's own forward, hook and all
        with pytest.raises(ValueError, match=rf"LoRA layer {path}'s {submodule}\['default'\] holds a hook.*on the LoRA layer"):
            model.logits(batch(), model.adapter_values())
    handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch(), model.adapter_values()), net(**random_batch()).logits)


def test_a_global_module_hook_is_said_under_handed_weights():
    # mostly observers (a profiler's module tracker): warned, not refused
    model = LoraModel(bert_with(), SequenceClassification())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        with torch.no_grad(), pytest.warns(UserWarning, match="global module hook.*lora_A and lora_B"):
            model.logits(batch(), model.adapter_values())
    finally:
        handle.remove()


@pytest.mark.parametrize("where", ["layer", "lora_dropout"])
def test_hooks_on_the_lora_layer_and_its_dropout_are_honoured_under_handed_weights(where):
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    with torch.no_grad():
        plain = net(**random_batch()).logits
    for layer in model.layers.values():
        module = layer if where == "layer" else layer.lora_dropout["default"]
        module.register_forward_hook(lambda m, a, o: o * 0.5)
    values = model.adapter_values()
    with torch.no_grad():
        hooked = net(**random_batch()).logits
        assert not torch.allclose(hooked, plain)
        torch.testing.assert_close(model.logits(batch(), values), hooked, rtol=1e-5, atol=1e-6)
        sampled = model.logits(batch(), {n: v.expand(2, *v.shape) for n, v in values.items()}, num_samples=2)
    torch.testing.assert_close(sampled, hooked.expand(2, -1, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_accelerate_offloaded_network_is_refused_naming_the_meta_device(when):
    # its weights sit on the meta device (accelerate brings them in per forward through hooks pyro_lora does not take):
    # raw 'unknown device type for autocast' at the first forward, whether offloaded before or after the build
    accelerate = pytest.importorskip("accelerate")
    net = bert_with()
    offload = lambda: accelerate.cpu_offload(net, execution_device=torch.device("cpu"))
    if when == "before":
        offload()
        with pytest.raises(ValueError, match=r"\.weight is on the meta device: the network is offloaded.*dispatch_model"):
            LoraModel(net, SequenceClassification())
        return
    model = LoraModel(net, SequenceClassification())
    offload()
    for run in (lambda: model.logits(batch()), lambda: predict(model, MAPGuide(model), [batch()])):
        with pytest.raises(ValueError, match=r"\.weight is on the meta device: the network is offloaded.*dispatch_model"):
            run()


def test_a_meta_parameter_is_refused_at_build_and_at_every_forward():
    net = bert_with()
    classifier = net.base_model.model.classifier.original_module
    classifier.weight = torch.nn.Parameter(classifier.weight.to("meta"), requires_grad=False)
    with pytest.raises(ValueError, match=r"classifier\.original_module\.weight is on the meta device"):
        LoraModel(net, SequenceClassification())
    model = LoraModel(bert_with(), SequenceClassification())
    path, layer = next(iter(model.layers.items()))
    layer.lora_B["default"].weight = torch.nn.Parameter(layer.lora_B["default"].weight.to("meta"))
    with pytest.raises(ValueError, match=rf"{path}\.lora_B\.default\.weight is on the meta device"):
        model.logits(batch())


@pytest.mark.parametrize("shift", [60, -70], ids=["past_the_rows", "negative"])
def test_token_ids_outside_the_input_embedding_are_refused_naming_its_rows(shift):
    # a tokenizer with a larger vocabulary than the network's (64 rows): transformers' raw 'index out of range in self'
    model = LoraModel(bert_with(), SequenceClassification(), num_data=3)
    bad = batch() | {"input_ids": batch()["input_ids"] + shift}
    message = r"token id -?\d+ in the batch's input_ids is outside the network's input embedding of 64 rows.*resize_token_embeddings"
    for run in (lambda: model.logits(bad, model.adapter_values()), lambda: predict(model, MAPGuide(model), [bad]),
                lambda: fit(model, MAPGuide(model), [bad], progress=False)):
        with pytest.raises(ValueError, match=message):
            run()
    with torch.no_grad():  # ids within the rows run as before
        torch.testing.assert_close(model.logits(batch()), model.net(**random_batch()).logits)


def test_token_ids_that_are_no_integers_are_refused_by_name():
    """Float or bool input_ids raised torch's raw 'Expected tensor for argument #1 indices'; a list of ids an
    AttributeError from model.logits."""
    model = LoraModel(bert_with(), SequenceClassification(), num_data=3)
    ids = batch()["input_ids"]
    for bad, match in ((ids.float(), "input_ids must be integer token ids .int64., got torch.float32"),
                       (ids.bool(), "input_ids must be integer token ids .int64., got torch.bool"),
                       (ids.tolist(), "its input_ids is a list, not a tensor")):
        for run in (lambda: model.logits(batch() | {"input_ids": bad}),
                    lambda: predict(model, MAPGuide(model), [batch() | {"input_ids": bad}])):
            with pytest.raises(ValueError, match=match):
                run()
    # no ids at all: transformers' "You must specify exactly one of input_ids or inputs_embeds"
    without = {k: v for k, v in batch().items() if k != "input_ids"}
    with pytest.raises(ValueError, match=r"the batch holds no input_ids \(its keys: \['attention_mask'"):
        predict(model, MAPGuide(model), [without])


def test_supported_setups_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        LoraModel(tiny_bert(), SequenceClassification())


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_an_unloaded_adapter_is_refused(unload):
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    getattr(net, unload)()
    with pytest.raises(ValueError, match=r"is no longer part of the network \(replaced, e.g. by merge_and_unload\(\), unload\(\)"):
        predict(model, guide, [batch()])


def test_one_layer_switched_to_another_adapter_is_refused():
    """``set_adapter`` on one LoRA layer leaves the network's own active adapter as it was: the layer is checked."""
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    net.add_adapter("other", LoraConfig(r=4, target_modules=["query", "value"]))
    layer = next(iter(model.layers.values()))
    layer.set_adapter("other")
    with pytest.raises(ValueError, match=r"runs adapter\(s\) \['other'\], but this LoraModel hands it adapter 'default'"):
        predict(model, guide, [batch()])


def two_adapters(default, other):
    """Adapters 'default' and 'other' (LoraConfig keywords; other's B and token rows far from zero), 'default' active."""
    torch.manual_seed(0)
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", **default))
    _randomize_b(net)
    net.add_adapter("other", LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS", **other))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".other" in n and any(k in n for k in ("lora_B", "lora_embedding_B", "trainable_tokens_delta")):
                p.normal_(0, 2.0)
    net.set_adapter("default")
    return net.eval()


QV, EMBEDDING = ["query", "value"], ["query", "value", "word_embeddings"]
ANOTHER_LAYER = {  # a peft layer besides the sites switched on its own: (default's, other's config, its path, change)
    "another adapter's LoRA layer": ({"target_modules": ["query"]}, {"target_modules": ["value"]},
                                     "encoder.layer.0.attention.self.value", "other"),
    "trainable tokens": (tokens := {"target_modules": QV, "trainable_token_indices": [7, 40]}, tokens,
                         "embeddings.word_embeddings", "other"),
    "a LoRA embedding": ({"target_modules": EMBEDDING}, {"target_modules": EMBEDDING}, "embeddings.word_embeddings", "other"),
    "a LoRA embedding disabled": ({"target_modules": EMBEDDING}, {"target_modules": QV}, "embeddings.word_embeddings", None),
}


@pytest.mark.parametrize("when", ["before building", "after building"])
@pytest.mark.parametrize("case", sorted(ANOTHER_LAYER))
def test_a_peft_layer_besides_the_sites_running_on_its_own_is_refused(case, when, tmp_path):
    """Only the sites and this adapter's heads were checked: another adapter's LoRA layer, a LoRA embedding or
    trainable tokens switched to another adapter (or disabled) on their own ran in fit and predict, while save_guide
    and export_adapter kept adapter 'default' as it is: the exported adapter gave logits 0.02-0.38 off the fitted
    model's. Refused by name, at build and at every use; the network set back gives peft's own logits again."""
    import warnings

    default, other, path, change = ANOTHER_LAYER[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoRA on embeddings is said
        net = two_adapters(default, other)
        layer = net.base_model.model.bert.get_submodule(path)
        switch = (lambda: layer.set_adapter(change)) if change else (lambda: layer.enable_adapters(False))
        refused = rf"peft layer base_model\.model\.bert\.{re.escape(path)} \(\w+\) runs .*net.active_adapter 'default'"
        if when == "before building":
            switch()
            with pytest.raises(ValueError, match=refused):
                LoraModel(net, SequenceClassification())
            net.set_adapter("default")
            if not change:
                layer.enable_adapters(True)
        model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    if when == "after building":
        switch()
        for use in (lambda: predict(model, guide, [batch()]), lambda: export_adapter(guide, tmp_path / "a")):
            with pytest.raises(ValueError, match=refused):
                use()
        net.set_adapter("default")
        if not change:
            layer.enable_adapters(True)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch(), guide.mean()), net(**random_batch()).logits, rtol=0, atol=1e-6)


def test_a_site_layer_disabled_on_its_own_is_refused_naming_it():
    """One LoRA layer's adapters disabled on its own: peft's forward ran part of the adapter. Before building, beside
    a LoRA embedding, the refusal named the embedding, the one layer running as it should."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoRA on embeddings is said
        net = two_adapters({"target_modules": EMBEDDING}, {"target_modules": ["key"]})
        model = LoraModel(net, SequenceClassification())
        path, layer = next(iter(model.layers.items()))
        layer.enable_adapters(False)
        refused = f"LoRA layer {re.escape(path)} has its adapters disabled on its own"
        with pytest.raises(ValueError, match=refused):
            model.logits(batch())
        with pytest.raises(ValueError, match=refused):
            LoraModel(net, SequenceClassification())


def test_another_adapter_loaded_again_under_its_name_on_other_modules_is_checked(tmp_path):
    """The layers besides the sites were found once per set of adapter names: 'other' deleted and added again under
    its name on other modules, one of its new layers switched on its own ran in every forward (0.0026 off)."""
    net = two_adapters({"target_modules": ["query"]}, {"target_modules": ["value"]})
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    model.logits(batch(), guide.mean())
    net.delete_adapter("other")
    net.add_adapter("other", LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["dense"]))
    net.set_adapter("default")
    model.logits(batch(), guide.mean())  # nothing runs it: accepted
    net.base_model.model.bert.encoder.layer[1].output.dense.set_adapter("other")
    with pytest.raises(ValueError, match=r"peft layer .*layer\.1\.output\.dense \(Linear\) runs adapter\(s\) \['other'\]"):
        model.logits(batch(), guide.mean())


def test_a_guide_built_before_another_adapter_was_merged_is_refused_naming_the_merge():
    """Another adapter merged into the base after the guide was built: its predictions would run that delta; the
    refusal named another checkpoint only."""
    net = two_adapters({"target_modules": ["query"]}, {"target_modules": ["value"]})
    guide = MAPGuide(LoraModel(net, SequenceClassification()))
    net.base_model.merge_adapter(["other"])
    with pytest.raises(ValueError, match=r"base weights differ .* or another adapter merged into them or unmerged since"):
        predict(guide.model, guide, [batch()])
    net.base_model.unmerge_adapter()
    predict(guide.model, guide, [batch()])


def test_export_of_an_adapter_whose_network_holds_another_adapters_trainable_tokens_alone_is_refused(tmp_path):
    """peft's adapter state dict raised a raw KeyError ('token_adapter.trainable_tokens_delta.default')."""
    net = two_adapters({"target_modules": QV}, {"target_modules": ["value"], "trainable_token_indices": [3, 5]})
    guide = MAPGuide(LoraModel(net, SequenceClassification()))
    with pytest.raises(ValueError, match="word_embeddings holds trainable tokens of other adapters only"):
        export_adapter(guide, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_a_layer_rebuilt_as_dora_is_refused():
    """Same rank, so the same shapes: DoRA's magnitude would be dropped by the hand-off (outputs 0.5 off)."""
    net = bert_with()
    model = LoraModel(net, SequenceClassification(), random="A")
    path, layer = next(iter(model.layers.items()))
    layer.update_layer("default", 4, 8, LoraConfig(r=4, lora_alpha=8, use_dora=True))
    with pytest.raises(ValueError, match=f"LoRA layer {path} now uses the peft variant"):
        model.logits(batch())


@pytest.mark.parametrize("change", ["set_adapter", "disable"])
def test_a_head_switched_to_another_adapter_or_disabled_is_refused(change):
    """The classification head (peft's ModulesToSaveWrapper) switched on its own: default's LoRA with other's head."""
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    net.add_adapter("other", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    predict(model, guide, [batch()])  # adding an adapter changes nothing
    head = net.base_model.model.classifier
    head.set_adapter("other") if change == "set_adapter" else head.enable_adapters(False)
    with pytest.raises(ValueError, match="classifier .*now runs"):
        predict(model, guide, [batch()])


def test_the_base_model_under_disable_adapter_is_still_predicted():
    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    with net.disable_adapter():
        assert predict(model, None, [batch()]).probs.shape == (3, 3)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_an_init_that_rewrote_the_base_weights_is_named_and_its_residual_is_never_the_base_model(init):
    """PiSSA and OLoRA subtract the initial ``s B0 A0`` from each base weight: with the adapter disabled the network
    is the residual (a real model loses its principal directions), so a zero-shot
    prediction through it would be silently wrong; the prior centred at A = B = 0 is centred there too."""
    torch.manual_seed(0)
    pretrained = tiny_bert_base().eval()
    reference = pretrained(**random_batch()).logits
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=init)).eval()
    with pytest.warns(UserWarning, match=f"adapter 'default' \\(init_lora_weights='{init}'\\) moved .* the prior, centred at A = B = 0, is centred at those residual"):
        model = LoraModel(net, SequenceClassification())
    with torch.no_grad():
        torch.testing.assert_close(predict(model, None, [batch()]).probs, torch.softmax(reference, -1), rtol=1e-4, atol=1e-5)
        with net.disable_adapter():
            residual = net.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
            assert (residual - pretrained.bert.encoder.layer[0].attention.self.query.weight).abs().max() > 1e-2
            with pytest.raises(ValueError, match=f"adapter 'default' \\(init_lora_weights='{init}'\\) subtracted its initial B A.*not the pretrained model"):
                predict(model, None, [batch()])


def test_a_base_rewriting_init_in_another_adapter_is_said_too():
    """PiSSA in a second adapter rewrites the base weights the first adapts: zero-shot through it scored the residual
    (0.56 in probability), and peft's own warning checks for 'pissa' exactly ('pissa_niter_2' passed silently)."""
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    net.add_adapter("p", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights="pissa_niter_2"))
    net.set_adapter("default")
    with pytest.warns(UserWarning, match=r"adapter 'p' \(init_lora_weights='pissa_niter_2'\) moved"):
        model = LoraModel(net, SequenceClassification())
    with torch.no_grad(), net.disable_adapter(), pytest.raises(ValueError, match=r"adapter 'p' \(init_lora_weights='pissa_niter_2'\) subtracted"):
        predict(model, None, [batch()])


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal"])
def test_an_init_that_leaves_the_base_weights_keeps_zero_shot_and_says_nothing(init):
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=init)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = LoraModel(net, SequenceClassification())
    with torch.no_grad(), net.disable_adapter():
        torch.testing.assert_close(predict(model, None, [batch()]).probs, torch.softmax(tiny_bert_base().eval()(**random_batch()).logits, -1))


def test_a_layer_rebuilt_at_another_rank_is_refused():
    net = bert_with()
    model = LoraModel(net, SequenceClassification(), random="A")
    path, layer = next(iter(model.layers.items()))
    layer.update_layer("default", 2, 4, LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(ValueError, match=f"LoRA layer {path}'s matrices changed shape"):
        model.logits(batch())


def _gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    net = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    _randomize_b(net)
    return net.eval()


def test_one_module_name_with_several_shapes_pairs_a_and_b_per_stack():
    from pyro_lora.guides import LaplaceGuide, TFBGuide

    model = LoraModel(_gpt2_lm(), CausalLM())  # GPT-2's c_proj: 32 -> 32 in attention, 128 -> 32 in the MLP
    assert {n: s.shape for n, s in model.sites.items() if n.startswith("c_proj")} == {
        "c_proj.lora_A.r4_32x32": (2, 4, 32), "c_proj.lora_B.r4_32x32": (2, 32, 4),
        "c_proj.lora_A.r4_128x32": (2, 4, 128), "c_proj.lora_B.r4_128x32": (2, 32, 4),
    }
    for site in model.sites.values():  # the A and B sites of a stack hold the same layers
        partner = site.name.replace("lora_A", "lora_B") if site.matrix == "A" else site.name.replace("lora_B", "lora_A")
        assert model.sites[partner].layers == site.layers
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch, model.adapter_values()), model.net(**batch).logits[:, :-1])
    tfb = TFBGuide(model, sigma_q=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch, tfb.mean()), model.net(**batch).logits[:, :-1], rtol=1e-4, atol=1e-5)
    letters = LoraModel(model.net, MultipleChoice(answer_token_ids=[5, 6, 7]))  # Laplace needs class logits
    choice = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "choice_mask": torch.ones(2, 3, dtype=torch.bool), "labels": torch.tensor([0, 2])}
    LaplaceGuide(letters, fisher="exact", rank=3).fit([choice], progress=False)


def test_laplace_refuses_a_site_whose_layers_see_different_input_shapes():
    from pyro_lora.guides import LaplaceGuide

    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS"))
    model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=r"see inputs of different shapes .* BERT's pooler .* group='matrix'"):
        LaplaceGuide(model, fisher="exact", rank=3).fit([batch()], progress=False)
    per_matrix = LoraModel(net, SequenceClassification(), group="matrix")
    LaplaceGuide(per_matrix, fisher="exact", rank=3).fit([batch()], progress=False)


def test_an_adapter_peft_would_not_give_back_is_refused_before_it_is_written(tmp_path):
    """export_adapter wrote adapters that reloaded other predictions without a word: a head made trainable by hand
    (not modules_to_save: 0.29 off), a scaling set by peft's set_scale (0.12 off); a refused export had already
    written some of the guide's values into the network."""
    from pyro_lora.pretrained import load_adapter

    net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    net.base_model.model.classifier.requires_grad_(True)  # a head trained beside LoRA, which peft does not save
    model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=r"classifier.weight is no part of the peft adapter .*modules_to_save"):
        export_adapter(MAPGuide(model), tmp_path / "head")
    assert not (tmp_path / "head").exists()
    net = tiny_bert(r=4)
    for layer in LoraModel(net, SequenceClassification()).layers.values():
        layer.set_scale("default", 0.25)
    model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=r"the LoRA scaling of .* is 0.5, not the 2 its config gives"):
        export_adapter(MAPGuide(model), tmp_path / "scaled")
    from pyro_lora.kinds import KINDS, MatrixKind, register_kind, scale

    # a kind without a peft parameter beside A (a gate between A and B, registered for the test)
    register_kind(MatrixKind("G", lambda r, d_in, d_out: (1, r), "between", apply=lambda h, v, s: scale(h, 1 + v, s),
                             stage=3, description="gate"))
    try:
        model = LoraModel(tiny_bert(r=4), SequenceClassification(), random="AG")
        before = [p.detach().clone() for _, p in model.named_lora_weights()]
        guide = MAPGuide(model, init={n: v + 1.0 for n, v in model.adapter_values().items()})
        with pytest.raises(ValueError, match="has no peft parameter to write into"):
            export_adapter(guide, tmp_path / "scales")
        assert all(torch.equal(p, q) for (_, p), q in zip(model.named_lora_weights(), before))  # nothing half-written
    finally:
        del KINDS["G"]
    # a head weight missing from an adapter's file: peft's bare KeyError
    from safetensors.torch import load_file, save_file

    model = LoraModel(tiny_bert(r=4), SequenceClassification())
    export_adapter(MAPGuide(model), tmp_path / "whole")
    weights = tmp_path / "whole" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "classifier.bias" not in k}, str(weights))
    with pytest.raises(ValueError, match="lacks weights of some of its own layers"):
        load_adapter(tiny_bert_base(num_labels=3), tmp_path / "whole")


def test_an_adapter_named_as_a_module_inside_a_saved_head_is_refused(tmp_path):
    """RoBERTa's head holds classifier.dense: an adapter named "dense" exported, and peft's load raised a KeyError."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=70, num_labels=2)
    net = get_peft_model(RobertaForSequenceClassification(config), LoraConfig(r=2, target_modules=["query", "value"],
                         task_type="SEQ_CLS"), adapter_name="dense")
    with pytest.raises(ValueError, match=r"^peft cannot load back an adapter named 'dense'"):
        export_adapter(MAPGuide(LoraModel(net, SequenceClassification())), tmp_path / "a")


@pytest.mark.parametrize("name", ["weight", "bias", "lora"])
def test_an_adapter_named_as_a_parameter_is_refused_before_it_is_written(tmp_path, name):
    """An adapter named 'weight' or 'bias' exported without a word and never loaded back: peft's load took the name
    for its modules_to_save head's parameter (a KeyError in PeftModel.from_pretrained). Other names round-trip."""
    from peft import PeftModel

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    net = get_peft_model(tiny_bert_base(num_labels=3), config, adapter_name=name).eval()
    _randomize_b(net)
    with torch.no_grad():
        net.base_model.model.classifier.modules_to_save[name].weight.add_(0.5)  # a trained head, not the base's
    guide = MAPGuide(LoraModel(net, SequenceClassification()))
    if name == "lora":
        export_adapter(guide, tmp_path / name)
        batch = random_batch()
        back = PeftModel.from_pretrained(tiny_bert_base(num_labels=3), tmp_path / name, adapter_name=name).eval()
        assert torch.allclose(back(**batch).logits, net(**batch).logits, atol=1e-6)
        return
    with pytest.raises(ValueError, match=rf"^peft cannot load back an adapter named '{name}', a name in the parameters "
                                         r"of a module in its modules_to_save"):
        export_adapter(guide, tmp_path / name)
    assert not (tmp_path / name).exists()
    # without modules_to_save peft gives it back: exported
    net = get_peft_model(tiny_bert_base(num_labels=3), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]),
                         adapter_name=name).eval()
    _randomize_b(net)
    export_adapter(MAPGuide(LoraModel(net, SequenceClassification())), tmp_path / "plain")
    batch = random_batch()
    back = PeftModel.from_pretrained(tiny_bert_base(num_labels=3), tmp_path / "plain", adapter_name=name).eval()
    assert torch.allclose(back(**batch).logits, net(**batch).logits, atol=1e-6)


def test_add_lora_warns_of_a_rank_that_reaches_the_layers_width():
    """--rank 1000 on MiniLM's 384-wide query and value ran as an ordinary LoRA row, without a word: B A has rank at
    most 384 there, and the adapter held more numbers than the weights it adapts."""
    from pyro_lora.pretrained import add_lora

    with pytest.warns(UserWarning, match=r"LoRA rank r=32 reaches the width of 4 adapted layer\(s\) .*min\(d_in, d_out\) = 32"):
        add_lora(tiny_bert_base(), r=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_lora(tiny_bert_base(), r=31)


def test_add_lora_keeps_a_classification_head_of_another_name_trainable():
    """peft's SEQ_CLS keeps only a 'classifier' or 'score' trainable: BART's classification_head stayed frozen at its
    random draw, trained by no fit and saved in no adapter (0.04 off on reload)."""
    from transformers import AutoModelForSequenceClassification, BartConfig

    from pyro_lora.pretrained import add_lora

    torch.manual_seed(0)
    bart = AutoModelForSequenceClassification.from_config(BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32, num_labels=2))
    net = add_lora(bart, r=2, alpha=4, targets=["q_proj", "v_proj"])
    trained = {n for n, p in net.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained and all("classification_head.modules_to_save" in n for n in trained)
    bert = add_lora(tiny_bert_base(), r=2, alpha=4, targets=["query"])  # peft's own default, unchanged
    assert {n for n, p in bert.named_parameters() if p.requires_grad and "lora_" not in n} == {
        "base_model.model.classifier.modules_to_save.default.weight", "base_model.model.classifier.modules_to_save.default.bias"}


def _tiny_deberta():
    """A DeBERTa-v2 classifier: its pooler sits beside the classifier, outside the backbone (DeBERTa checkpoints lack it,
    so transformers draws it afresh)."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, num_labels=2, relative_attention=True, pos_att_type=["p2c", "c2p"],
        max_relative_positions=16, position_buckets=8))


def test_add_lora_trains_the_whole_head_beside_the_backbone():
    """add_lora put only DeBERTa's classifier in modules_to_save: its random 32 x 32 pooler stayed frozen through fit
    (moved 0.0 while the classifier moved 0.12), and nothing said so."""
    from pyro_lora.pretrained import add_lora

    net = add_lora(_tiny_deberta(), r=2, alpha=4)
    pooler = net.base_model.model.pooler.modules_to_save["default"].dense.weight
    before = pooler.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = LoraModel(net, SequenceClassification(), num_data=8)
    batch = random_batch(8, vocab=64) | {"labels": torch.arange(8) % 2}
    fit(model, MAPGuide(model), [batch], epochs=3, lr=1e-2, progress=False)
    assert pooler.requires_grad and (pooler - before).abs().max() > 1e-3


def test_a_head_left_partly_frozen_by_a_users_adapter_is_warned_naming_it():
    """A user's LoraConfig(modules_to_save=['classifier']) on DeBERTa trained the classifier over a frozen random pooler
    without a word; the whole head in modules_to_save, or none of it trained (an adapter loaded for inference), is quiet."""
    config = dict(r=2, target_modules=["query_proj", "value_proj"], task_type="SEQ_CLS")
    net = get_peft_model(_tiny_deberta(), LoraConfig(**config, modules_to_save=["classifier"]))
    with pytest.warns(UserWarning, match=r"DebertaV2ForSequenceClassification's head \['pooler'\] is frozen while "
                                         r"\['classifier'\] trains.*modules_to_save=\['pooler', 'classifier'\]"):
        LoraModel(net, SequenceClassification())
    quiet = [get_peft_model(_tiny_deberta(), LoraConfig(**config, modules_to_save=["pooler", "classifier"])),
             get_peft_model(_tiny_deberta(), LoraConfig(**config, inference_mode=True))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for net in quiet:
            LoraModel(net, SequenceClassification())


def test_export_refuses_an_embedding_lora_scaled_apart_from_its_config(tmp_path):
    """Only the sites' Linear layers were checked: an embedding LoRA of the adapter scaled by peft's set_scale was
    exported, and saved by save_guide(adapter=True), with its config's scaling (0.012 off on reload)."""
    from pyro_lora.io import save_guide

    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, task_type="SEQ_CLS",
                                                      target_modules=["query", "value", "word_embeddings"]))
    net.base_model.model.bert.embeddings.word_embeddings.set_scale("default", 3.0)
    with pytest.warns(UserWarning, match="not made random"):
        model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    with pytest.raises(ValueError, match=r"the LoRA scaling of bert.embeddings.word_embeddings is 6, not the 2 its config"):
        export_adapter(guide, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"the LoRA scaling of bert.embeddings.word_embeddings is 6"):
        save_guide(guide, tmp_path / "guide", adapter=True)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "guide").exists()


def test_export_checks_scalings_against_the_config_peft_saves(tmp_path):
    """One LoraConfig object reused, changed, for a second adapter: the first's saved config said lora_alpha=32 while
    its layers scaled by 8 / 4, and the export was let through (each layer was checked against its own alpha);
    rank_pattern and alpha_pattern are matched to module names as peft matches them."""
    from pyro_lora.pretrained import load_adapter

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    net = get_peft_model(tiny_bert_base(), config)
    config.lora_alpha = 32
    net.add_adapter("wide", config)
    model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=r"LoRA layer bert.encoder.layer.0.attention.self.query of adapter 'default' "
                                         r"scales by 2 \(lora_alpha=8, r=4, .*gives 8 \(lora_alpha=32, r=4\).*peft_config"):
        export_adapter(MAPGuide(model), tmp_path / "edited")
    assert not (tmp_path / "edited").exists()
    net = bert_with(rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 3, "value": 6})
    export_adapter(MAPGuide(LoraModel(net, SequenceClassification())), tmp_path / "patterns")  # as peft reloads it
    reloaded = load_adapter(tiny_bert_base(), tmp_path / "patterns")
    assert {n: m.scaling for n, m in reloaded.named_modules() if hasattr(m, "scaling")} == {
        n: m.scaling for n, m in net.named_modules() if hasattr(m, "scaling")}


def test_export_refuses_another_adapter_merged_into_the_base(tmp_path):
    """An adapter merged into the base (merge_adapter) while another was fitted and exported: the adapter reloaded on
    the checkpoint without the merged delta (0.013 off)."""
    from pyro_lora.io import save_guide

    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["key"], task_type="SEQ_CLS"),
                         adapter_name="first")
    net.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    net.set_adapter("second")
    net.base_model.merge_adapter(["first"])
    guide = MAPGuide(LoraModel(net, SequenceClassification()))
    for save in (lambda: export_adapter(guide, tmp_path / "adapter"), lambda: save_guide(guide, tmp_path / "g", adapter=True)):
        with pytest.raises(ValueError, match=r"adapter\(s\) \['first'\] are merged into the base weights of 2 LoRA layer"
                                             r"\(s\) .*'second' would reload .*unmerge_adapter\(\).*merge_and_unload"):
            save()
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "g").exists()


@pytest.mark.parametrize("load", ["is_trainable=False", "is_trainable=True", "unfrozen by hand"])
def test_an_adapter_loaded_for_inference_keeps_its_non_random_matrices_frozen(tmp_path, load):
    from peft import PeftModel

    from pyro_lora import fit
    from pyro_lora.guides import MeanFieldGuide

    tiny_bert().save_pretrained(tmp_path)
    net = PeftModel.from_pretrained(tiny_bert_base(), tmp_path, is_trainable=load == "is_trainable=True")
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_B" in n or "modules_to_save" in n}
    if load == "unfrozen by hand":  # peft's way to resume training an adapter loaded for inference
        for n, p in net.named_parameters():
            p.requires_grad_(n in before or "lora_A" in n)
    model = LoraModel(net, SequenceClassification(), random="A", prior=1.0, num_data=3)
    fit(model, MeanFieldGuide(model), [batch()], epochs=2, lr=0.05, progress=False)
    moved = {n for n, p in net.named_parameters() if n in before and not torch.equal(p, before[n])}
    # loaded frozen: B and the head stay as peft loaded them; loaded or unfrozen to train: both train as point estimates
    assert moved == (set() if load == "is_trainable=False" else set(before))


def test_fit_warns_of_a_head_frozen_before_it_ever_trained():
    from pyro_lora.guides import MeanFieldGuide

    # LoraConfig(inference_mode=True) froze the fresh head: fit trained the posterior against its random initialisation
    for inference_mode in (True, False):
        net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          task_type="SEQ_CLS", inference_mode=inference_mode))
        model = LoraModel(net, SequenceClassification(), random="AB", num_data=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, MeanFieldGuide(model), [batch()], epochs=1, progress=False)
        frozen = [str(w.message) for w in caught if "fit trains no parameter of" in str(w.message)]
        assert frozen == ([] if not inference_mode else [
            "fit trains no parameter of base_model.model.classifier: peft saves it with the adapter, but the adapter is in "
            "inference mode (LoraConfig(inference_mode=True), or loaded with is_trainable=False), which froze it while it "
            "still equals the base model's own module: for a head the checkpoint lacked, its random initialisation; build "
            "the adapter with inference_mode=False, or set requires_grad on it, to train it"])
    # a head frozen by hand is the user's choice: no warning
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    for name, p in net.named_parameters():
        if "modules_to_save" in name:
            p.requires_grad_(False)
    model = LoraModel(net, SequenceClassification(), random="AB", num_data=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, MeanFieldGuide(model), [batch()], epochs=1, progress=False)
    assert not [w for w in caught if "fit trains no parameter of" in str(w.message)]
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                      task_type="SEQ_CLS", inference_mode=True))
    model = LoraModel(net, SequenceClassification(), random="AB", num_data=3)
    with warnings.catch_warnings(record=True) as caught:  # train_network=False: the head is meant to stay
        warnings.simplefilter("always")
        fit(model, MeanFieldGuide(model), [batch()], epochs=1, progress=False, train_network=False)
    assert not [w for w in caught if "fit trains no parameter of" in str(w.message)]


def _rewritten_by(init, base):
    """``base`` under an adapter built with ``init`` after its preprocessing (LoRA-GA's gradients, CorDA's covariances)."""
    from peft import LoraGAConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.loraga import preprocess_loraga

    extra = {"lora_ga": {"lora_ga_config": LoraGAConfig(scale="weight_svd")}, "corda": {"corda_config": CordaConfig()}}.get(init, {})
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=init, **extra)
    if init == "lora_ga":
        preprocess_loraga(base, config, lambda: base(**batch()).loss.backward())
    elif init == "corda":
        rows = random_batch()  # CorDA's hooks take one example at a time
        preprocess_corda(base, config, lambda: [base(**{k: v[i : i + 1] for k, v in rows.items()}) for i in range(3)])
    return get_peft_model(base, config).eval()


@pytest.mark.parametrize("init", ["lora_ga", "corda", "pissa_niter_4"])
def test_an_adapter_whose_init_peft_cannot_redo_on_load_is_refused_by_export_naming_the_init(tmp_path, init):
    """LoRA-GA rewrote each base weight to W - s B0 A0 (by 2.6 in the tester's run) and export_adapter wrote it without a
    word: PeftModel.from_pretrained on the pretrained base has no gradients, falls back to a plain init and leaves the
    base as it is (probabilities 0.646 off, 20 of 24 classes). CorDA's reload is refused by peft (no covariances)."""
    torch.manual_seed(0)
    net = _rewritten_by(init, tiny_bert_base().eval())
    query = net.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    assert (query - tiny_bert_base().bert.encoder.layer[0].attention.self.query.weight).abs().max() > 1e-2
    with pytest.warns(UserWarning, match="moved part of each base weight"):
        model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=f"adapter 'default' \\(init_lora_weights='{init}'\\) rewrote the base weights it "
                       "adapts .*cannot redo .*unload\\(\\).save_pretrained.*init_lora_weights=True"):
        export_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    if init == "lora_ga":  # the reason, independently: peft's reload runs the pretrained base, not the residual
        from peft import PeftModel

        net.save_pretrained(tmp_path / "peft")
        reloaded = PeftModel.from_pretrained(tiny_bert_base().eval(), tmp_path / "peft")
        assert torch.equal(reloaded.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.weight,
                           tiny_bert_base().bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_whose_init_peft_redoes_exactly_on_load_exports_and_reloads_its_predictions(tmp_path, init):
    from peft import PeftModel

    net = _rewritten_by(init, tiny_bert_base().eval())
    _randomize_b(net)
    with pytest.warns(UserWarning, match="moved part of each base weight"):
        model = LoraModel(net, SequenceClassification())
    with torch.no_grad():
        probs = predict(model, None, [batch()]).probs
    export_adapter(model, tmp_path / "a")
    reloaded = PeftModel.from_pretrained(tiny_bert_base().eval(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(reloaded(**random_batch()).logits, -1), probs)


def test_an_adapter_trained_on_a_base_another_adapter_rewrote_is_refused_by_export(tmp_path):
    """PiSSA in adapter 'p' rewrote the base weights 'default' was trained on: its export carried a plain config, which
    peft reloads on the pretrained base (another function), without a word."""
    net = get_peft_model(tiny_bert_base(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()
    net.add_adapter("p", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights="pissa"))
    net.set_adapter("default")
    with pytest.warns(UserWarning, match="moved part"):
        model = LoraModel(net, SequenceClassification())
    with pytest.raises(ValueError, match=r"adapter 'p' \(init_lora_weights='pissa'\) rewrote the base weights adapter "
                       r"'default' was trained on .*pretrained base"):
        export_adapter(model, tmp_path / "a")


@pytest.mark.parametrize("ga_config", [False, True])
def test_lora_ga_without_its_gradients_leaves_the_base_and_is_no_rewrite(tmp_path, ga_config):
    """Without preprocess_loraga peft's LoRA-GA falls back to the default init (B = 0, the base untouched), yet the model
    warned that it moved part of each base weight and refused zero-shot under disable_adapter; a folder of a LoRA-GA
    adapter, which peft loads without gradients (a fallback), likewise."""
    from peft import LoraGAConfig

    from pyro_lora.pretrained import load_adapter

    extra = {"lora_ga_config": LoraGAConfig()} if ga_config else {}
    net = get_peft_model(tiny_bert_base().eval(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS",
                                                             init_lora_weights="lora_ga", **extra)).eval()
    with torch.no_grad():
        pretrained = torch.softmax(tiny_bert_base().eval()(**random_batch()).logits, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = LoraModel(net, SequenceClassification())
    with torch.no_grad(), net.disable_adapter():
        torch.testing.assert_close(predict(model, None, [batch()]).probs, pretrained)
    _randomize_b(net)  # trained, as far as the folder tells
    net.save_pretrained(tmp_path / "a")
    loaded = load_adapter(tiny_bert_base().eval(), tmp_path / "a").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = LoraModel(loaded, SequenceClassification())
    export_adapter(model, tmp_path / "b")


@pytest.mark.parametrize("option, plain", [({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens=None"),
                                           ({"init_lora_weights": "mica"}, "init_lora_weights=True")])
def test_a_lora_variant_is_refused_naming_the_option_that_set_it(option, plain):
    """aLoRA, MiCA (and VeLoRA, KaSA, MonteCLoRA) were refused with DoRA's advice: 'build the adapter with use_dora=False'."""
    (name, value), = option.items()
    with pytest.raises(ValueError, match=f"uses the peft variant \\w+ \\(set by {name}={value!r} in its LoraConfig\\).*"
                       f"plain LoraConfig \\({plain}\\)".replace("[", "\\[").replace("]", "\\]")) as refused:
        LoraModel(get_peft_model(tiny_bert_base(),
                                 LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", **option)), SequenceClassification())
    assert "use_dora" not in str(refused.value)


def test_every_entry_point_refuses_a_model_whose_adapter_was_deleted(tmp_path):
    """After net.delete_adapter('default') (peft switches to the remaining 'tmp'), predict, export_adapter and the rest
    raised a bare KeyError: 'default' from torch's ModuleDict; model.logits alone named the problem."""
    from pyro_lora import save_guide

    net = bert_with()
    model = LoraModel(net, SequenceClassification())
    guide = MAPGuide(model)
    net.add_adapter("tmp", LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's: the active adapter was deleted
        net.delete_adapter("default")
    calls = {"logits": lambda: model.logits(batch()), "predict": lambda: predict(model, guide, [batch()]),
             "export_adapter": lambda: export_adapter(guide, tmp_path / "a"), "save_guide": lambda: save_guide(guide, tmp_path / "g"),
             "fit": lambda: fit(model, guide, [batch()], epochs=1, progress=False), "mean": guide.mean,
             "sample": lambda: guide.sample(1), "a new guide": lambda: MAPGuide(model)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"built for adapter 'default', which it no longer holds \(net.delete_adapter\)"):
            call()


@pytest.mark.parametrize("targets", [["attn.c_proj"], ["c_attn"]])
def test_olora_on_a_transposed_conv1d_layer_is_refused_before_it_runs(targets):
    """peft's OLoRA factors GPT-2's Conv1D weight ([in, out]) as if it were [out, in]: on the square attention c_proj
    the adapter started 0.04 in logits away from the pretrained model without a word, on c_attn a raw shape error."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                    num_labels=2, pad_token_id=0)).eval()
    batch = {"input_ids": torch.randint(1, 64, (2, 5))}
    pretrained = base(**batch).logits.detach()
    net = get_peft_model(base, LoraConfig(r=4, target_modules=targets, fan_in_fan_out=True, init_lora_weights="olora",
                                          task_type="SEQ_CLS")).eval()
    if targets == ["attn.c_proj"]:  # what the refusal is for: the start is not the pretrained model
        assert (net(**batch).logits - pretrained).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"adapter 'default' \(init_lora_weights='olora'\) ran on .*c_proj|c_attn.*fan_in_fan_out=True"):
        LoraModel(net, SequenceClassification())


def test_pissa_on_a_transposed_conv1d_layer_starts_at_the_pretrained_model():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    base = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
                                                    num_labels=2, pad_token_id=0)).eval()
    batch = {"input_ids": torch.randint(1, 64, (2, 5))}
    pretrained = torch.softmax(base(**batch).logits.detach(), -1)
    net = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="pissa",
                                          task_type="SEQ_CLS")).eval()
    with pytest.warns(UserWarning, match="residual base weights"):
        model = LoraModel(net, SequenceClassification())
    torch.testing.assert_close(predict(model, None, [batch]).probs, pretrained, rtol=1e-4, atol=1e-5)


def _short_positions(family):
    """A tiny classifier of ``family`` whose position table holds 16 positions (Llama: rotary, no table)."""
    import transformers as T

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64, num_labels=2,
                 max_position_embeddings=16, pad_token_id=0)
    padded = small | {"max_position_embeddings": 18, "pad_token_id": 1}  # positions after padding_idx 1: 16 of 18 rows
    config, net, targets = {
        "gpt2": (T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=16, num_labels=2, pad_token_id=0),
                 T.GPT2ForSequenceClassification, ["c_attn"]),
        "bert": (T.BertConfig(**small), T.BertForSequenceClassification, ["query"]),
        "opt": (T.OPTConfig(**{k: v for k, v in small.items() if k != "intermediate_size"}, ffn_dim=32, word_embed_proj_dim=16),
                T.OPTForSequenceClassification, ["q_proj"]),
        "llama": (T.LlamaConfig(**small), T.LlamaForSequenceClassification, ["q_proj"]),
        "roberta": (T.RobertaConfig(**padded), T.RobertaForSequenceClassification, ["query"]),
        "xlm-roberta": (T.XLMRobertaConfig(**padded), T.XLMRobertaForSequenceClassification, ["query"]),
        "mpnet": (T.MPNetConfig(**padded), T.MPNetForSequenceClassification, ["q"]),
    }[family]
    torch.manual_seed(0)
    return get_peft_model(net(config).eval(), LoraConfig(r=2, target_modules=targets, task_type="SEQ_CLS",
                                                          fan_in_fan_out=family == "gpt2"))


@pytest.mark.parametrize("family, table", [("gpt2", "transformer.wpe"), ("bert", "bert.embeddings.position_embeddings"),
                                           ("opt", "model.decoder.embed_positions"), ("llama", None),
                                           ("roberta", "roberta.embeddings.position_embeddings"),
                                           ("xlm-roberta", "roberta.embeddings.position_embeddings"),
                                           ("mpnet", "mpnet.embeddings.position_embeddings")])
def test_rows_longer_than_a_learned_position_embedding_are_refused_naming_its_positions(family, table):
    """A tokenizer naming no model_max_length (SmolLM2's) let a collator build rows past GPT-2's n_positions: torch's
    raw 'IndexError: index out of range in self' from the position lookup. Refused naming the table and its 16
    positions (OPT's rows start at its offset 2; RoBERTa's, XLM-R's and MPNet's at padding_idx + 1, so 18 rows hold
    16 tokens: 17 crashed raw under the first version of this check); rows within run as plain transformers; rotary positions run on,
    said once: the model was not trained past max_position_embeddings (rows past it were scored without a word)."""
    model = LoraModel(_short_positions(family), SequenceClassification(), num_data=3)
    rows = lambda n: {"input_ids": torch.arange(1, n + 1).remainder(60).add(1).expand(2, n),  # noqa: E731
                      "attention_mask": torch.ones(2, n, dtype=torch.long), "labels": torch.tensor([0, 1])}
    with torch.no_grad():
        torch.testing.assert_close(model.logits(rows(16)),
                                   model.net(**{k: v for k, v in rows(16).items() if k != "labels"}).logits)
        if table is None:
            with pytest.warns(UserWarning, match="rows are 40 tokens long, past the 16 positions of the network's config "
                                                 r"\(max_position_embeddings, or a YaRN scaling's extension\).*max_length=16 or less"):
                model.logits(rows(40))
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                model.logits(rows(40))  # once per model
            return
        for run in (lambda: model.logits(rows(17)), lambda: predict(model, MAPGuide(model), [rows(17)])):
            with pytest.raises(ValueError, match=rf"rows are 17 tokens long, past the 16 positions the network's learned "
                                                 rf"position embedding \({re.escape('base_model.model.' + table)}\) holds"):
                run()
        if family in ("roberta", "xlm-roberta", "mpnet"):  # padding takes position padding_idx: 16 tokens padded to 18 run
            padded = {k: v.clone() for k, v in rows(18).items()}
            padded["input_ids"][:, 16:], padded["attention_mask"][:, 16:] = 1, 0
            torch.testing.assert_close(model.logits(padded),
                                       model.net(**{k: v for k, v in padded.items() if k != "labels"}).logits)


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_a_dynamic_rope_per_layer_type_is_no_edit_of_the_base(family):
    """ModernBERT (and Gemma 3) keep one rope type per layer type ({"full_attention": "dynamic", ...}): their
    full_attention_inv_freq, recomputed from each forward's length, was compared with the guide's build as if edited in
    place, so predict after fit on rows past max_position_embeddings was refused (Llama's single type was left out)."""
    import transformers as T

    from pyro_lora.pretrained import add_lora

    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=8, pad_token_id=0, num_labels=2)
    torch.manual_seed(0)
    if family == "llama":
        net, targets = T.LlamaForSequenceClassification(T.LlamaConfig(**small, rope_parameters=dynamic)), ["q_proj"]
    else:
        config = T.ModernBertConfig(**small, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                                    global_attn_every_n_layers=1, local_attention=4, rope_parameters={
                                        "full_attention": dynamic, "sliding_attention": {"rope_type": "default",
                                                                                         "rope_theta": 10000.0}})
        net, targets = T.ModernBertForSequenceClassification(config), ["Wqkv"]
    model = LoraModel(add_lora(net, r=2, targets=targets), SequenceClassification(), random="AB", num_data=8)
    guide = MAPGuide(model)
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(12))
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(4) % 2}
    fit(model, guide, [rows], lr=1e-2, progress=False)
    with torch.no_grad():
        expected = model.logits(rows, guide.mean()).softmax(-1)
    torch.testing.assert_close(predict(model, guide, [rows]).probs, expected)


def test_rows_within_a_rope_scaling_or_under_relative_positions_are_not_said_to_be_past_the_config():
    """The warning of rows past max_position_embeddings fired within a YaRN rope scaling that keeps the original length
    there (Qwen2.5's: x4, 64 positions of 16), and for DeBERTa-v3's relative positions (512 no limit). Scalings that
    name no original length (linear, dynamic NTK) or whose max_position_embeddings is already the extended length
    (Llama 3's llama3, x32 over 8192 in 131072 positions) extend nothing."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, LlamaForSequenceClassification

    from pyro_lora.model import _config_positions

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 max_position_embeddings=16, num_labels=2, pad_token_id=0)
    linear = LlamaConfig(**small, rope_scaling={"rope_type": "linear", "factor": 4.0})
    yarn = LlamaConfig(**small, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    assert _config_positions(LlamaForSequenceClassification(linear)) == 16
    assert _config_positions(LlamaForSequenceClassification(yarn)) == 64
    llama3 = {"rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0}
    assert _config_positions(LlamaForSequenceClassification(LlamaConfig(**small, rope_scaling=llama3))) == 16
    dynamic = LlamaConfig(**small, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert _config_positions(LlamaForSequenceClassification(dynamic)) == 16
    assert _config_positions(LlamaForSequenceClassification(LlamaConfig(**small))) == 16
    relative = DebertaV2Config(**{k: v for k, v in small.items() if k != "pad_token_id"}, relative_attention=True,
                               position_biased_input=False, pos_att_type=["p2c", "c2p"])
    assert _config_positions(DebertaV2ForSequenceClassification(relative)) is None
    torch.manual_seed(0)
    model = LoraModel(get_peft_model(LlamaForSequenceClassification(yarn).eval(), LoraConfig(r=2, target_modules=["q_proj"],
                                                                                             task_type="SEQ_CLS")),
                      SequenceClassification(), num_data=2)
    rows = {"input_ids": torch.arange(1, 41).remainder(60).add(1).expand(2, 40), "attention_mask": torch.ones(2, 40, dtype=torch.long),
            "labels": torch.tensor([0, 1])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model.logits(rows)


@pytest.mark.parametrize("where", ["base layers", "every linear layer"])
def test_a_network_quantized_by_torch_itself_is_refused_naming_the_module(where):
    """torch.ao's quantize_dynamic: no gradient runs through its kernels (the LoRA below it trained on the LoRA
    branch's gradient alone), and it scales activations per forward (SmolLM2's cloze probabilities 0.3 apart between
    batch sizes 1 and 6). LoraModel built on it, LoRA-XS and ScalaBL crashed reading its weight, a method."""
    from pyro_lora import ScalaBLModel
    from pyro_lora.loraxs import LoraXSModel

    net = tiny_llama()
    names = {n for n, m in net.named_modules() if n.endswith(".base_layer")} if where == "base layers" else {torch.nn.Linear}
    torch.ao.quantization.quantize_dynamic(net, names, dtype=torch.qint8, inplace=True)
    for build in (lambda: LoraModel(net, CausalLM()), lambda: LoraXSModel(net, CausalLM()),
                  lambda: ScalaBLModel(net, CausalLM())):
        with pytest.raises(ValueError, match=r"q_proj\.base_layer is a torch\.ao\.nn\.quantized\.dynamic.*PyTorch's own "
                                             r"quantisation.*no gradient runs through it.*bitsandbytes"):
            build()



def test_a_sparse_quantized_base_layer_of_torch_itself_is_refused_alike():
    sparse, engine = tiny_llama(), torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"  # its sparse kernels' one engine
    try:
        sparse.base_model.model.model.layers[0].self_attn.q_proj.base_layer = torch.ao.nn.sparse.quantized.dynamic.Linear(32, 32, 1, 4)
    finally:
        torch.backends.quantized.engine = engine
    with pytest.raises(ValueError, match=r"q_proj\.base_layer is a torch\.ao\.nn\.sparse\.quantized\.dynamic\..*Linear, a "
                                         r"module of PyTorch's own quantisation"):
        LoraModel(sparse, CausalLM())


def test_add_lora_on_a_model_quantized_by_torch_itself_names_the_quantization_not_an_empty_list_of_layers():
    from pyro_lora.pretrained import add_lora

    base = tiny_llama().get_base_model()
    torch.ao.quantization.quantize_dynamic(base, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    with pytest.raises(ValueError, match=r"is a torch\.ao\.nn\.quantized\.dynamic.*PyTorch's own quantisation"):
        add_lora(base, r=2)


def test_float_modules_of_torch_ao_are_not_taken_for_quantized_ones():
    """The refusal reads what a module does: FloatFunctional and QAT's fake quantisation run in float, with gradients."""
    net = tiny_llama()
    net.base_model.model.model.add = torch.ao.nn.quantized.FloatFunctional()
    net.base_model.model.model.layers[0].mlp.fake = torch.ao.quantization.FakeQuantize()
    LoraModel(net, CausalLM())


@pytest.mark.parametrize("rnn", [torch.nn.LSTM(4, 4), torch.nn.GRUCell(4, 4)], ids=["LSTM", "GRUCell"])
def test_a_dynamically_quantized_rnn_of_torch_itself_is_refused(rnn):
    """quantize_dynamic's default set holds LSTM, GRU and their cells, which keep their packed weights under other
    names than Linear's: the refusal keyed on Linear's passed them."""
    net = tiny_llama()
    net.base_model.model.model.rnn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(rnn), {type(rnn)},
                                                                             dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"rnn\.0 is a torch\.ao\.nn\.quantized\.dynamic.*PyTorch's own quantisation"):
        LoraModel(net, CausalLM())
