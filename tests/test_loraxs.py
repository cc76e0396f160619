"""LoRA-XS: the SVD initialisation, R = 0 / R = I against the base network, frozen A/B, parameter counts."""

import copy
import warnings

import pytest
import torch
from conftest import random_batch, tiny_bert, tiny_bert_base, tiny_llama
from test_training import toy_data

from pyro_lora.guides import MAPGuide
from pyro_lora import CausalLM, LoraModel, SequenceClassification, fit
from pyro_lora.loraxs import LoraXSModel, base_weight, init_lora_xs, lora_xs_parameter_counts


def truncated(w, r):
    """Best rank-r approximation of ``w`` and its squared Frobenius error, in float64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], s[r:].pow(2).sum()


def test_svd_init_is_the_truncated_svd_with_orthonormal_b():
    net = tiny_llama(r=4, targets=("q_proj", "v_proj"))  # q_proj 32 x 32, v_proj 16 x 32
    model = LoraXSModel(net, CausalLM(), svd_init=False)
    init_lora_xs(net, replace_trained=True)  # over the fixture's random B
    for path, layer in model.layers.items():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        w0 = base_weight(layer)
        best, error = truncated(w0, 4)
        torch.testing.assert_close(b @ a, best, rtol=0, atol=1e-5)
        torch.testing.assert_close((w0.double() - b @ a).pow(2).sum(), error, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-5)
        gram = a @ a.T  # rows of diag(S_r) V_r^T: orthogonal, norms the singular values, descending
        singular = torch.linalg.svdvals(w0.double())[:4]
        torch.testing.assert_close(gram, torch.diag(singular.pow(2)), rtol=0, atol=1e-4)


def test_svd_init_is_deterministic_and_refuses_too_large_ranks():
    net = tiny_llama(r=4, random_b=False)
    init_lora_xs(net)
    first = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_" in n:
                p.normal_()
    init_lora_xs(net, replace_trained=True)
    for n, p in net.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, first[n]), n
    with pytest.raises(ValueError, match="exceeds min"):
        init_lora_xs(tiny_llama(r=20))  # v_proj is 16 x 32


def test_a_trained_lora_is_not_overwritten_without_being_asked():
    """A LoRA trained elsewhere (Trainer) handed to LoraXSModel had its A and B replaced by the SVD without a word:
    the user's adapter was gone from their own network. Refused before any write; a fresh adapter, one set up by
    LoRA-XS before (a rebuilt run) and replace_trained=True pass."""
    net = tiny_bert(r=2)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="a trained LoRA, which would be lost.*replace_trained=True"):
        LoraXSModel(net, SequenceClassification())
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if "lora_" in n)
    LoraXSModel(net, SequenceClassification(), replace_trained=True)
    svd = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    assert not torch.equal(svd[next(n for n in svd if "lora_B" in n)], before[next(n for n in svd if "lora_B" in n)])
    LoraXSModel(net, SequenceClassification())  # already LoRA-XS's SVD: rebuilt without a word
    assert all(torch.equal(p, svd[n]) for n, p in net.named_parameters() if "lora_" in n)
    LoraXSModel(tiny_bert(r=2, random_b=False), SequenceClassification())  # peft's B = 0
    from peft import LoraConfig, get_peft_model

    # the SVD as a bfloat16 adapter stores it (rounded by up to 2^-8 relative, cast to float32 since) is LoRA-XS's
    # still: rebuilt; and peft's "orthogonal" init, a non-zero B with B A = 0, holds nothing to lose
    for dtype, init in ((torch.bfloat16, True), (torch.float32, "orthogonal")):
        net = get_peft_model(tiny_bert_base(num_labels=2).to(dtype), LoraConfig(
            r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=init),
            autocast_adapter_dtype=False)
        assert {p.dtype for n, p in net.named_parameters() if "lora_B" in n} == {dtype}
        LoraXSModel(net, SequenceClassification())
        LoraXSModel(net, SequenceClassification())


def test_an_a_trained_beside_the_svds_b_is_a_trained_lora():
    """An adapter set up by LoRA-XS whose A alone was trained since (B frozen at the SVD's) passed as "already
    LoRA-XS": its A, 0.05 off, was overwritten without a word."""
    net = tiny_bert(r=2, random_b=False)
    LoraXSModel(net, SequenceClassification())
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_A" in n:
                p.add_(0.05)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="a trained LoRA, which would be lost"):
        LoraXSModel(net, SequenceClassification())
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if "lora_" in n)


def test_a_float64_base_gets_a_float64_svd():
    """A float32 SVD left a float64 base's B orthonormal and B A the best rank-r approximation to 1e-6 only."""
    net = tiny_llama(r=4, targets=("q_proj", "v_proj"), random_b=False).double()
    model = LoraXSModel(net, CausalLM())
    for layer in model.layers.values():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(b @ a, truncated(base_weight(layer), 4)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("group", ["kind", "matrix"])
def test_r_zero_is_the_base_network_and_r_identity_adds_the_rank_r_part(group):
    model = LoraXSModel(tiny_bert(r=4, random_b=False), SequenceClassification(), group=group)
    batch = random_batch()
    zeros = model.adapter_values()
    assert all(torch.equal(v, torch.zeros(s.shape)) for v, s in zip(zeros.values(), model.sites.values()))
    base = tiny_bert_base(seed=0).eval()  # the same weights tiny_bert wraps
    torch.testing.assert_close(model.logits(batch, zeros), base(**batch).logits, rtol=1e-5, atol=1e-6)

    eye = {n: torch.eye(4).expand(s.shape).clone() for n, s in model.sites.items()}
    scaling = 2.0  # lora_alpha / r
    modules = dict(base.named_modules())
    with torch.no_grad():
        for path in model.layers:
            linear = modules[path.removeprefix("base_model.model.")]
            linear.weight += scaling * truncated(linear.weight, 4)[0].float()
    torch.testing.assert_close(model.logits(batch, eye), base(**batch).logits, rtol=1e-4, atol=1e-5)


def test_only_the_cores_and_the_head_train():
    model = LoraXSModel(tiny_bert(num_labels=2, random_b=False), SequenceClassification(), num_data=48)
    lora = {n: p.detach().clone() for n, p in model.net.named_parameters() if "lora_" in n}
    names = {id(p): n for n, p in model.net.named_parameters()}
    assert all("classifier" in names[id(p)] for p in model.point_parameters())
    guide = MAPGuide(model)
    losses = fit(model, guide, toy_data(), epochs=3, lr=3e-2, progress=False)
    assert sum(losses[-6:]) < sum(losses[:6])
    for n, p in model.net.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, lora[n]) and not p.requires_grad, n
    assert all(v.abs().sum() > 0 for v in guide.mean().values())
    with pytest.raises(ValueError, match="always the R cores"):
        LoraXSModel(tiny_bert(), SequenceClassification(), random="AB")


def test_parameter_counts():
    model = LoraXSModel(tiny_bert(r=4, random_b=False), SequenceClassification())
    counts = lora_xs_parameter_counts(model)
    assert len(counts["per_layer"]) == 4
    assert all(c == {"lora_xs": 16, "lora": 4 * (32 + 32)} for c in counts["per_layer"].values())
    assert (counts["lora_xs"], counts["lora"]) == (64, 1024)
    assert counts["lora_xs"] == sum(s.numel for s in model.sites.values())


def test_loraxs_refuses_what_would_train_or_decompose_something_else_and_a_refusal_writes_nothing():
    """lora_bias=True trained d_out bias numbers per layer beside the cores; a PiSSA adapter's SVD was the residual's
    (R = 0 was 0.59 off the pretrained layer); an all-zero base weight was blamed on peft's B; a LoraXSModel refused for
    its prior had already overwritten every A and B."""
    from peft import LoraConfig, get_peft_model

    def adapted(**options):
        config = LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS", **options)
        return get_peft_model(tiny_bert_base(), config)

    with pytest.raises(ValueError, match=r"lora_B \(peft's lora_bias=True\) trains .*LoRA-XS trains the r x r cores only"):
        LoraXSModel(adapted(lora_bias=True), SequenceClassification())
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*SVD of the residual"):
        LoraXSModel(adapted(init_lora_weights="pissa"), SequenceClassification())
    net = adapted()
    with torch.no_grad():
        net.base_model.model.bert.encoder.layer[1].attention.self.value.base_layer.weight.zero_()
    with pytest.raises(ValueError, match=r"base weight of .*layer.1.attention.self.value has numerical rank below the "
                                         "LoRA rank 2: it is all zero;"):
        LoraXSModel(net, SequenceClassification())
    for net in (adapted(), tiny_bert(r=2, random_b=False)):
        before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
        for bad in ({"prior": -1.0}, {"num_data": 0}, {"group": "nonsense"}):
            with pytest.raises(ValueError):
                LoraXSModel(net, SequenceClassification(), **bad)
            assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("width", [384, 768])
def test_a_rank_deficient_base_weight_of_a_realistic_width_is_refused(width):
    """A rank-4 base weight under LoRA rank 8 was refused at width 32 only: at 384 its fp32 SVD's zeros come out
    at 7e-7 of the largest singular value (the old bound 1.2e-7), so half of every core multiplied rounding noise.
    Exactly rank 8, and a full-rank weight, pass."""
    from peft import LoraConfig, get_peft_model

    def adapted(rank):
        generator = torch.Generator().manual_seed(width + rank)
        net = get_peft_model(torch.nn.Sequential(torch.nn.Linear(width, width)), LoraConfig(r=8, target_modules=["0"]))
        weight = torch.randn(width, width, generator=generator) * 0.02
        if rank:
            weight = torch.randn(width, rank, generator=generator) @ torch.randn(rank, width, generator=generator) * 0.02
        with torch.no_grad():
            net.base_model.model[0].base_layer.weight.copy_(weight)
        return net

    with pytest.raises(ValueError, match=r"base weight of .*0 has numerical rank below the LoRA rank 8: its singular value "
                                         r"8 is \S+ of its largest, within width x float32 eps = \S+ of it, where a float32 "
                                         "SVD cannot tell it from zero"):
        init_lora_xs(adapted(4))
    for rank in (8, 0):
        net = adapted(rank)
        init_lora_xs(net)
        a = net.base_model.model[0].lora_A["default"].weight
        assert a.norm(dim=1).min() > 1e-3 * a.norm(dim=1).max()


@pytest.mark.parametrize("options, says", [
    ({"bias": "lora_only"}, r"peft's bias='lora_only' trains base biases \(128 numbers, .*query.base_layer.bias the first\)"
                            r".*build the adapter with bias='none'"),
    ({"bias": "all"}, r"peft's bias='all' trains base biases \(\d+ numbers.*build the adapter with bias='none'"),
    ({"target_modules": ["query", "word_embeddings"]}, r"LoRA on an embedding layer \(target_modules names it\) trains its "
                                                       r"A and B \(192 numbers.*leave the embedding out of target_modules"),
    ({"trainable_token_indices": [7, 40]}, r"peft's trainable_token_indices trains embedding rows"),
    ({"modules_to_save": ["pooler"]}, r"peft's modules_to_save trains a copy of a module other than the classification "
                                      r"head \(1056 numbers, base_model.model.bert.pooler.*leave it out of modules_to_save"),
    ({"unfrozen": "bert.encoder.layer.0.output.LayerNorm.weight"}, r"base parameters are trainable \(unfrozen by hand\) "
                                                                    r"\(32 numbers.*requires_grad_\(False\)"),
    ({"lora_bias": True}, r"a bias on lora_B \(peft's lora_bias=True\) trains d_out numbers per layer \(128 numbers"),
], ids=["lora_only", "all", "embedding", "tokens", "pooler", "by_hand", "lora_bias"])
@pytest.mark.parametrize("svd_init", [True, False])
def test_options_training_numbers_beside_the_cores_are_refused_before_any_work(options, says, svd_init):
    """peft's bias='lora_only' moved the base biases by up to 0.44 in fit while lora_xs_parameter_counts reported the 16
    core numbers (128 bias numbers trained beside them, outside SWAG's posterior); an embedding LoRA, trainable tokens,
    a pooler in modules_to_save or a base parameter unfrozen by hand trained alike, with at most a generic warning;
    lora_bias=True was refused only when the SVD ran (not rebuilding with svd_init=False)."""
    from peft import LoraConfig, get_peft_model

    options = dict(options)
    unfrozen = options.pop("unfrozen", None)
    config = dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS") | options
    net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(**config))
    if unfrozen:
        net.base_model.model.get_parameter(unfrozen).requires_grad_(True)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before find_lora_layers' embedding warning
        with pytest.raises(ValueError, match=says) as refused:
            LoraXSModel(net, SequenceClassification(), num_data=48, svd_init=svd_init)
    assert "LoRA-XS trains the r x r cores only" in str(refused.value)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
    if svd_init:
        with pytest.raises(ValueError, match=says):
            init_lora_xs(net)


def test_the_classification_head_trains_beside_the_cores_but_an_output_embedding_is_refused():
    """The head (peft's SEQ_CLS classifier, named in modules_to_save or not) is the one point estimate beside the cores;
    a causal LM's lm_head in modules_to_save (V x d numbers) is no classification head."""
    from peft import LoraConfig, get_peft_model

    for head in (None, ["classifier"]):  # peft's SEQ_CLS default, and naming it
        net = get_peft_model(tiny_bert_base(num_labels=2), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                                      modules_to_save=head))
        model = LoraXSModel(net, SequenceClassification())
        assert [n for n, _ in model.named_point_parameters()] == [
            "base_model.model.classifier.modules_to_save.default.weight", "base_model.model.classifier.modules_to_save.default.bias"]
    net = tiny_llama(r=2, random_b=False)
    net.add_adapter("lm", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    net.set_adapter("lm")
    with pytest.raises(ValueError, match=r"modules_to_save trains a copy of a module other than the classification head "
                                         r"\(2048 numbers, base_model.model.lm_head.modules_to_save.lm.weight the first\)"):
        LoraXSModel(net, CausalLM())


def test_a_core_between_a_zero_b_is_refused_not_trained_to_nothing():
    """A core over a fresh peft LoRA (B = 0) kept A and B frozen: B R A x stayed 0, every LoRA gradient was zero, and
    30 epochs trained the head alone without a word."""
    from peft import LoraConfig, get_peft_model

    def fresh():
        return get_peft_model(tiny_bert_base(), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))

    with pytest.raises(ValueError, match=r"random='R' keeps the layers' A and B frozen \(LoRA-XS\), and 4 of them are all "
                                         r"zeros .*lora_B.*build the LoraXSModel with svd_init=True"):
        LoraXSModel(fresh(), SequenceClassification(), svd_init=False)
    model = LoraXSModel(fresh(), SequenceClassification())  # A and B from the SVD: the cores move the output
    assert all(layer.lora_B["default"].weight.any() for layer in model.layers.values())


def test_the_model_at_its_start_is_the_base_network_and_a_core_needs_a_loraxs_model():
    """model.logits(batch) and predict(model, None) ran peft's own forward, i.e. R = I (logits 0.87 off the base network
    the untrained LoRA-XS model is); they run R = 0. LoraModel(random="R") over a trained LoRA started its cores at 0,
    dropping the adapter's B A (logits 2.29 off): "R" is refused outside LoraXSModel, as "S" outside ScalaBLModel."""
    from peft import LoraConfig, get_peft_model

    from pyro_lora import predict

    base = tiny_bert_base().eval()
    batch = random_batch()
    with torch.no_grad():
        want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    net = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    model = LoraXSModel(net, SequenceClassification())
    with torch.no_grad():
        torch.testing.assert_close(model.logits(batch), want, atol=1e-5, rtol=0)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(predict(model, None, [unlabelled]).probs, want.softmax(-1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"random='R' \(LoRA-XS core\) needs the layers a LoraXSModel prepares.*"
                                         r"build a LoraXSModel"):
        LoraModel(tiny_bert(), SequenceClassification(), random="R")


def test_layers_running_another_adapter_are_refused_before_the_svd_is_written():
    """net.base_model.set_adapter("y") switches the layers and leaves net.active_adapter at "x": LoraXSModel overwrote
    x's trained A and B (8 matrices) with the SVD, and only the first forward refused."""
    from peft import LoraConfig

    net = tiny_bert(random_b=False)
    net.add_adapter("y", LoraConfig(r=2, target_modules=["query", "value"]))
    net.base_model.set_adapter("y")
    before = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match=r"runs adapter\(s\) \['y'\], but this LoraModel hands it adapter 'default'.*"
                                         r"net.set_adapter\('default'\)"):
        LoraXSModel(net, SequenceClassification())
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if "lora_" in n)
