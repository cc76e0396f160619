"""Laplace's prior precision: the evidence against a dense reference, matrices the data leave unconstrained, and
the validation-NLL grid."""

import math
import warnings

import pytest
import torch
from conftest import tiny_bert, tiny_bert_base
from peft import LoraConfig, get_peft_model
from test_laplace import bert_data, bert_model, dense_precision, mlp_data, mlp_model

from pyro_lora.guides.laplace import LaplaceGuide
from pyro_lora.likelihoods import SequenceClassification
from pyro_lora.model import LoraModel

def flat_norms(guide):
    return torch.cat([f.loc.reshape(f.prior_precision.numel(), -1).pow(2).sum(-1) for f in guide.factors])


def dense_evidence(model, guide, data):
    loglik = sum(
        torch.log_softmax(model.logits(b, guide.mean()), -1).gather(1, b["labels"][:, None]).sum() for b in data
    )
    lam = torch.cat([f.prior_precision for f in guide.factors])
    sizes = torch.tensor([f.loc.numel() // f.prior_precision.numel() for f in guide.factors for _ in f.prior_precision])
    logdet = torch.linalg.slogdet(dense_precision(guide).double())[1]
    return loglik - 0.5 * (logdet - (sizes * lam.log()).sum() + (lam * flat_norms(guide)).sum())


# ---------------------------------------------------------------- KFAC factors


@pytest.mark.parametrize("per_layer", [False, True])
def test_evidence_matches_dense_and_increases_during_optimisation(per_layer):
    model = bert_model()
    data = bert_data()
    guide = LaplaceGuide(model, rank=3, prior_precision={"query.lora_A": [0.5, 2.0]}).fit(data, progress=False)
    assert guide.prior_precision["query.lora_A"].tolist() == [0.5, 2.0]
    assert guide.prior_precision["value.lora_B"].tolist() == [1, 1]
    dense = dense_evidence(model, guide, data)
    torch.testing.assert_close(guide.log_marginal_likelihood().double(), dense, rtol=1e-4, atol=1e-3)
    # three sequences determine next to none of a matrix's parameters (gamma ~ 1e-5): without the per-layer bound
    # (min_effective_parameters=0) the optimum is the evidence's own
    history = guide.optimize_prior_precision("marglik", per_layer=per_layer, min_effective_parameters=0)
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(history, history[1:]))
    assert history[-1] > history[0] + 1.0
    best = guide.log_marginal_likelihood()
    torch.testing.assert_close(best.double(), dense_evidence(model, guide, data), rtol=1e-4, atol=1e-3)
    lam = {k: v.clone() for k, v in guide.prior_precision.items()}
    assert (len({round(float(x), 6) for v in lam.values() for x in v}) > 1) == per_layer
    for factor in (0.95, 1.05):  # a maximum: moving any lambda lowers the evidence
        assert guide.log_marginal_likelihood({k: v * factor for k, v in lam.items()}) < best
        if per_layer:
            one = dict(lam, **{"value.lora_B": lam["value.lora_B"] * torch.tensor([factor, 1.0])})
            assert guide.log_marginal_likelihood(one) < best
    assert guide.log_marginal_likelihood(5.0) != best  # evaluating elsewhere does not change lambda
    assert guide.log_marginal_likelihood() == best


def zero_b_bert_model(kind="query"):
    """``bert_model`` with the LoRA B of ``kind``'s layers at zero, peft's init: the Fisher of their A is exactly zero."""
    model = bert_model()
    with torch.no_grad():
        for n, p in model.net.named_parameters():
            if "lora_B" in n and f".{kind}." in n:
                p.zero_()
    return model


@pytest.mark.parametrize("per_layer", [False, True])
def test_zero_curvature_matrices_are_named_and_left_out_of_the_evidence(per_layer):
    model = zero_b_bert_model()
    data = bert_data(lengths=(7, 5, 4, 6, 3, 7))
    guide = LaplaceGuide(model, rank=3, prior_precision={"query.lora_A": [0.5, 2.0]}).fit(data, progress=False)
    assert list(guide.sites) == ["query.lora_A", "query.lora_B", "value.lora_A", "value.lora_B"]
    assert guide.flat_matrices().tolist() == [True, True] + [False] * 6
    # their exact evidence term is 0 for every lambda; Laplace's -lambda |A|^2 / 2 drove lambda to 2e-6
    assert guide.log_marginal_likelihood({"query.lora_A": 1e-6}) == guide.log_marginal_likelihood({"query.lora_A": 1e3})
    with pytest.warns(UserWarning, match="zero curvature") as record:
        history = guide.optimize_prior_precision("marglik", per_layer=per_layer, min_effective_parameters=0)
    (message,) = [str(w.message) for w in record if "zero curvature" in str(w.message)]
    assert all(f"query.lora_A ({path})" in message for path in model.sites["query.lora_A"].layers)
    assert "query.lora_B" not in message and "value." not in message
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(history, history[1:]))
    lam = {k: v.clone() for k, v in guide.prior_precision.items()}
    if per_layer:
        assert lam["query.lora_A"].tolist() == [0.5, 2.0] and "keep their lambda" in message
    else:
        assert len({float(x) for v in lam.values() for x in v}) == 1 and "fitted on the other matrices" in message
    # the evidence is the dense one without the flat matrices' -lambda |A|^2 / 2, and lambda is its maximum
    norms = guide.factors[0].loc.pow(2).flatten(1).sum(-1)
    dense = dense_evidence(model, guide, data) + 0.5 * (lam["query.lora_A"] * norms).sum()
    best = guide.log_marginal_likelihood()
    torch.testing.assert_close(best.double(), dense.double(), rtol=1e-4, atol=1e-3)
    for factor in (0.95, 1.05):
        assert guide.log_marginal_likelihood({k: v * factor for k, v in lam.items() if k != "query.lora_A"}) < best


def test_zero_curvature_everywhere_fits_nothing_and_a_normal_fit_says_nothing():
    # a normal fit: every matrix informed (effective numbers of parameters 0.9 to 1.8), nothing said, the bound
    # inactive: the same lambda as the unbounded evidence optimum
    guide = LaplaceGuide(mlp_model(), fisher="exact", rank=3).fit(mlp_data(), progress=False)
    assert not guide.flat_matrices().any() and not guide.uninformed_matrices().any()
    guide.optimize_prior_precision("marglik", per_layer=True, min_effective_parameters=0)
    unbounded = torch.cat(list(guide.prior_precision.values()))
    guide.set_prior_precision(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        guide.optimize_prior_precision("marglik", per_layer=True)
    assert torch.equal(torch.cat(list(guide.prior_precision.values())), unbounded)
    guide = LaplaceGuide(bert_model(), rank=3).fit(bert_data(), progress=False)
    assert not guide.flat_matrices().any()
    guide.set_prior_precision(0.5)
    for f in guide.factors:
        f.small_vals.zero_()  # no curvature anywhere
    with pytest.warns(UserWarning, match="no matrix has curvature, nothing is fitted"):
        history = guide.optimize_prior_precision("marglik")
    assert len(history) == 1 and all(bool((v == 0.5).all()) for v in guide.prior_precision.values())


def small_b_bert(b_scale, seed=0):
    """The adversarial tester's setting: 2 labels, a sharp head, B ~ N(0, 1) * ``b_scale`` (a few steps from peft's
    zero init when small), and 48 sequences."""
    net = tiny_bert_base(num_labels=2, seed=seed)
    net.classifier.weight.data.normal_(0, 1.0)
    net = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0).mul_(b_scale)
    g = torch.Generator().manual_seed(3)
    data = []
    for _ in range(3):
        lengths = torch.randint(4, 13, (16,), generator=g)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        ids = torch.randint(1, 64, (16, 12), generator=g) * mask
        data.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (16,), generator=g)})
    return LoraModel(net.eval(), SequenceClassification(), num_data=48), data


def precisions(guide):
    return torch.cat([guide.prior_precision[k] for k in guide.sites])


@pytest.mark.parametrize("b_scale", [1e-3, 1e-4, 3e-5])
def test_little_curvature_keeps_lambda_bounded_and_names_the_matrices(b_scale):
    # a B of scale 1e-4 made value.lora_A's Fisher ~1e-8 of the largest, above the zero-curvature cutoff: its
    # per-layer evidence optimum lambda ~ sqrt(sum g) / |A| fell to 2.7e-4 (prior std 61, swamping the sampled
    # predictive) without a word
    model, data = small_b_bert(b_scale)
    guide = LaplaceGuide(model, fisher="exact", rank=3).fit(data, progress=False)
    flat, held = guide.flat_matrices(), guide.uninformed_matrices()
    assert not (flat & held).any() and held.any()
    names = guide.matrix_names()
    assert len(names) == len(held) and all(n.startswith(("query.lora_", "value.lora_")) and "(base_model." in n for n in names)
    norms = flat_norms(guide).double()
    bound = 0.1 / norms
    guide.optimize_prior_precision("marglik", per_layer=True, min_effective_parameters=0)
    unbounded = precisions(guide).double()
    assert (unbounded[held] < bound[held]).all() and (unbounded[~held & ~flat] >= bound[~held & ~flat]).all()
    assert unbounded[held].min() < 1e-2 * bound[held].max()  # what the evidence alone gave
    guide.set_prior_precision(1.0)
    with pytest.warns(UserWarning, match="little curvature") as record:
        guide.optimize_prior_precision("marglik", per_layer=True)
    (message,) = [str(w.message) for w in record if "little curvature" in str(w.message)]
    named = [n for n in names if n in message]
    assert named == [n for n, h in zip(names, held.tolist()) if h]  # every held matrix (site and module path), no other
    assert "held at that bound" in message and "prior std per entry at most 3.2 |theta*|" in message
    lam = precisions(guide).double()
    torch.testing.assert_close(lam[held], bound[held], rtol=1e-5, atol=0)  # held at the bound, bounded below
    torch.testing.assert_close(lam[~held & ~flat], unbounded[~held & ~flat], rtol=1e-5, atol=0)  # the others as before
    assert (lam[flat] == 1.0).all()
    # the bound is the constrained maximum: the evidence rises below it, falls above it
    best = guide.log_marginal_likelihood()
    for factor, better in ((0.5, True), (2.0, False)):
        moved = lam.clone()
        moved[held] *= factor
        start, moved_lam = 0, {}
        for k in guide.sites:
            n = guide.prior_precision[k].numel()
            moved_lam[k] = moved[start : start + n].float()
            start += n
        assert (guide.log_marginal_likelihood(moved_lam) > best) == better
    # the shared lambda is fitted on all curved matrices and is not pulled down by the barely informed ones: it
    # does not move as their curvature shrinks (B ~ 1e-2 to 1e-4: 0.32 each time), it gives their A a prior no
    # wider than the per-layer bound, and no bound applies (nothing said)
    guide.set_prior_precision(1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guide.optimize_prior_precision("marglik")
    assert not [w for w in caught if "little curvature" in str(w.message)]
    shared = float(precisions(guide)[0])
    if not flat[4:6].any():  # value.lora_A curved (B ~ 1e-3, 1e-4): held per layer
        assert held[4:6].all() and names[4].startswith("value.lora_A")
        assert shared >= bound[4:6].max() and shared > 50 * unbounded[4:6].max()
        other, other_data = small_b_bert(1e-2)
        other_guide = LaplaceGuide(other, fisher="exact", rank=3).fit(other_data, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other_guide.optimize_prior_precision("marglik")
        assert float(precisions(other_guide)[0]) == pytest.approx(shared, rel=0.02)


def test_a_normal_scale_b_is_not_held():
    model, data = small_b_bert(1.0)
    guide = LaplaceGuide(model, fisher="exact", rank=3).fit(data, progress=False)
    assert not guide.flat_matrices().any() and not guide.uninformed_matrices().any()
    guide.optimize_prior_precision("marglik", per_layer=True, min_effective_parameters=0)
    unbounded = precisions(guide)
    guide.set_prior_precision(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        guide.optimize_prior_precision("marglik", per_layer=True)
    assert torch.equal(precisions(guide), unbounded)


@pytest.mark.filterwarnings("ignore:LaplaceGuide val_nll")  # an optimum on the grid's edge: tested below
def test_val_nll_grid_picks_the_best_value():
    model = bert_model()
    guide = LaplaceGuide(model).fit(bert_data(), progress=False)
    val = bert_data(lengths=(6, 6, 3, 5), seed=5)
    grid = [0.01, 1.0, 100.0]
    for predictive in ("glm", "samples"):
        nlls = guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid, predictive=predictive, num_samples=4,
                                              refine=False)
        assert len(nlls) == 3
        assert guide.prior_precision["query.lora_A"][0].item() == pytest.approx(grid[min(range(3), key=nlls.__getitem__)])
    guide.set_prior_precision(1.0)
    probit = guide.predict_glm(val)
    nll = -probit.probs.gather(1, probit.labels[:, None]).log().mean()
    assert guide.optimize_prior_precision("val_nll", val_loader=val, grid=[1.0])[0] == pytest.approx(float(nll), rel=1e-5)


def test_val_nll_optimum_on_the_grid_edge_warns_and_bad_grids_are_refused():
    # fisher="exact": no sampled labels, so the NLL curve is deterministic; its minimum is near lambda = 5e-6
    # (NLL 1.09765 against 1.09784 at 5e-7 and 1.09776 at 5e-5; flat at 1.09784 from 1e-3 up)
    guide = LaplaceGuide(bert_model(), fisher="exact").fit(bert_data(), progress=False)
    val = bert_data(lengths=(6, 6, 3, 5), seed=5)
    lam = lambda: guide.prior_precision["query.lora_A"][0].item()  # noqa: E731
    for grid in ([5e-7, 5e-6, 5e-5], [5e-7, 5e-5, 5e-6]):  # inside the grid (by value, whatever the order): silent
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid, refine=False)
        assert lam() == pytest.approx(5e-6)
    with pytest.warns(UserWarning, match=r"largest grid value lambda = 5e-07 .*extend the grid above 5e-07"):
        guide.optimize_prior_precision("val_nll", val_loader=val, grid=[5e-8, 5e-9, 5e-7])
    assert lam() == pytest.approx(5e-7)  # still set: the best the grid has
    with pytest.warns(UserWarning, match=r"smallest grid value lambda = 5e-05 .*extend the grid below 5e-05"):
        guide.optimize_prior_precision("val_nll", val_loader=val, grid=[5e-5, 5e-4, 5e-3])
    assert lam() == pytest.approx(5e-5)
    with warnings.catch_warnings():  # one value is no search: nothing to warn about
        warnings.simplefilter("error")
        guide.optimize_prior_precision("val_nll", val_loader=val, grid=[5e-5])
    for bad in ([1.0, float("inf")], [float("nan"), 1.0], [0.0, 1.0], [-1.0, 1.0], [1e-50, 1.0], []):
        with pytest.raises(ValueError, match="finite positive"):
            guide.optimize_prior_precision("val_nll", val_loader=val, grid=bad)
        assert lam() == pytest.approx(5e-5)  # a refused grid changes nothing
    # "12" raised a raw error, a 2-d grid was flattened, True read as 1
    for bad, match in (("12", "a list or tuple of numbers"), ([[1e-5, 1e-4], [1e-3, 1e-2]], "numbers only"),
                       ([True, 1e-4], "numbers only"), (True, "numbers only")):
        with pytest.raises(ValueError, match=f"grid must (be|hold) {match}"):
            guide.optimize_prior_precision("val_nll", val_loader=val, grid=bad)
        assert lam() == pytest.approx(5e-5)
    assert guide.optimize_prior_precision("val_nll", val_loader=val, grid=torch.tensor(5e-5)) == \
        guide.optimize_prior_precision("val_nll", val_loader=val, grid=[5e-5])  # one number: a one-value grid
    guide._grid_nll_glm = lambda *args: [1.0, float("nan"), 2.0]  # argmin took the nan as the best: 1e-4
    with pytest.raises(ValueError, match="NLL is nan at lambda = 0.0001"):
        guide.optimize_prior_precision("val_nll", val_loader=val, grid=[1e-5, 1e-4, 1e-3])
    assert lam() == pytest.approx(5e-5)  # the nan grid set nothing


def test_val_nll_refines_between_the_best_grid_values_neighbours():
    # the deterministic curve of the test above: minimum near lambda = 5e-6 on a coarse grid
    guide = LaplaceGuide(bert_model(), fisher="exact").fit(bert_data(), progress=False)
    val = bert_data(lengths=(6, 6, 3, 5), seed=5)
    fine = torch.logspace(math.log10(5e-7), math.log10(5e-5), 41)
    brute = guide.optimize_prior_precision("val_nll", val_loader=val, grid=fine.tolist(), refine=False)
    coarse = guide.optimize_prior_precision("val_nll", val_loader=val, grid=[5e-7, 5e-6, 5e-5], refine=False)
    nlls = guide.optimize_prior_precision("val_nll", val_loader=val, grid=[5e-7, 5e-6, 5e-5])
    assert len(nlls) == 3 + 7 and nlls[:3] == coarse  # the grid, then 7 values between 5e-7 and 5e-5
    lam = guide.prior_precision["query.lora_A"][0].item()
    assert min(nlls) <= min(coarse) and min(nlls) == pytest.approx(min(brute), abs=2e-5)
    # the refining grid's step is 10^0.25: the chosen lambda is within half a step of the brute-force optimum
    assert abs(math.log10(lam) - math.log10(float(fine[int(torch.tensor(brute).argmin())]))) <= 0.125 + 1e-6


def test_val_nll_refines_a_best_value_at_an_end_of_the_grid_towards_its_neighbour():
    """An optimum between the grid's smallest value and its neighbour was left at the end, unrefined, with a warning
    to extend the grid below it (a dense search found it inside the first interval); LLLA refined there already."""
    guide = LaplaceGuide(bert_model(), fisher="exact").fit(bert_data(), progress=False)
    val = bert_data(lengths=(6, 6, 3, 5), seed=5)
    fine = torch.logspace(math.log10(5e-7), math.log10(5e-5), 41)
    brute = guide.optimize_prior_precision("val_nll", val_loader=val, grid=fine.tolist(), refine=False)
    optimum = float(fine[int(torch.tensor(brute).argmin())])
    grid = [optimum / 2, optimum * 5, optimum * 50]
    with pytest.warns(UserWarning, match="smallest grid value"):  # unrefined, the end is the best the grid has
        coarse = guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid, refine=False)
    assert min(range(3), key=coarse.__getitem__) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refined inside the first interval: no edge to warn about
        nlls = guide.optimize_prior_precision("val_nll", val_loader=val, grid=grid)
    assert len(nlls) == 3 + 7 and min(nlls) < coarse[0] and min(nlls) == pytest.approx(min(brute), abs=2e-5)
    lam = guide.prior_precision["query.lora_A"][0].item()
    assert optimum / 2 < lam < optimum * 5
    # the refining step is a decade / 8, the brute grid's 0.05 decade
    assert abs(math.log10(lam) - math.log10(optimum)) <= 0.0625 + 0.025 + 1e-6


def test_arguments_a_method_would_not_read_are_refused_before_the_validation_data_is():
    """"marglik" took a val_loader, a grid and predictive="bogus" and ignored them; min_effective_parameters=inf pinned
    every lambda at e^25 (True was read as 1, nan and -5 as 0); a refused "val_nll" call had used up a generator, so the
    corrected retry said "val_loader is empty"."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    guide = LaplaceGuide(bert_model()).fit(bert_data(), progress=False)
    val = bert_data(lengths=(6, 6, 3, 5), seed=5)
    lam = {n: p.clone() for n, p in guide.prior_precision.items()}
    for kwargs, message in [({"val_loader": val}, "reads no val_loader"), ({"grid": [1.0]}, "reads no grid"),
                            ({"predictive": "samples"}, "scores no predictive"), ({"predictive": "bogus"}, "predictive must be"),
                            ({"method": "val_nll"}, "needs val_loader"), ({"method": "typo"}, "method must be")]:
        with pytest.raises(ValueError, match=message):
            guide.optimize_prior_precision(**{"method": "marglik", **kwargs})
    for bad in (math.inf, math.nan, -5.0, True):
        with pytest.raises(ValueError, match=r"min_effective_parameters must be a finite number >= 0, got"):
            guide.optimize_prior_precision(per_layer=True, min_effective_parameters=bad)
    batches = iter(val)
    for kwargs in ({"per_layer": True}, {"predictive": "bogus"}, {"grid": [0.0]}):
        with pytest.raises(ValueError):
            guide.optimize_prior_precision("val_nll", val_loader=batches, **kwargs)
    assert all(torch.equal(lam[n], p) for n, p in guide.prior_precision.items())
    assert len(guide.optimize_prior_precision("val_nll", val_loader=batches, grid=[1.0, 2.0], refine=False)) == 2
    llla = LastLayerLaplaceGuide(bert_model()).fit(bert_data(), progress=False)
    with pytest.raises(ValueError, match=r"method='marglik' maximises the evidence .* reads no val_loader or grid"):
        llla.optimize_prior_precision("marglik", val_loader=val, grid=[1.0])


def test_a_fit_on_another_number_of_examples_than_num_data_is_warned():
    """A model of num_data=48 fitted on its first 8 rows (or its 48 twice) gave the posterior and evidence of 8 (or 96)
    examples without a word: the evidence lambda 0.0027 (0.0091) for 0.0064, the GLM variance 2.5x (0.7x)."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    data = bert_data()  # 3 examples
    for guide_class in (LaplaceGuide, LastLayerLaplaceGuide):
        for num_data, said in ((6, "part of"), (2, "more than")):
            model = LoraModel(tiny_bert(r=2), SequenceClassification(), num_data=num_data)
            with pytest.warns(UserWarning, match=rf"{guide_class.__name__}.fit summed the curvature of 3 examples, but the "
                                                 rf"model was built with num_data={num_data} .*\({said} the training set\)"):
                guide_class(model).fit(data, progress=False)
        for model in (LoraModel(tiny_bert(r=2), SequenceClassification(), num_data=3),
                      LoraModel(tiny_bert(r=2), SequenceClassification())):
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                guide_class(model).fit(data, progress=False)


def split_rows(batch, groups):
    """``batch``'s rows in the batches ``groups`` (lists of row indices), each padded on the right to its longest."""
    out = []
    for rows in groups:
        width = int(batch["attention_mask"][rows].sum(-1).max())
        out.append({k: v[rows][:, :width] if v.dim() == 2 else v[rows] for k, v in batch.items()})
    return out


@pytest.mark.parametrize("num_data", [None, 2])
def test_a_refit_over_other_examples_says_it_replaced_the_first_fit(num_data):
    """laplace-torch users may expect a second fit to add its data (its override=False): fit(first 2 rows) then
    fit(the other 2) kept the second half's curvature alone, without a word where both halves were as many examples
    (num_data=None, and num_data=2 where neither is part of the training set by count). The same examples again, in
    another order and batching, say nothing; one label changed is other examples."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    (whole,) = bert_data(lengths=(7, 5, 4, 6), seed=3)
    first, second = split_rows(whole, [[0, 1], [2, 3]])
    relabelled = {**second, "labels": (second["labels"] + 1) % 3}
    for guide_class in (LaplaceGuide, LastLayerLaplaceGuide):
        model = LoraModel(tiny_bert(r=2), SequenceClassification(), num_data=num_data)
        guide = guide_class(model).fit([first], progress=False)
        with pytest.warns(UserWarning, match=rf"{guide_class.__name__}.fit replaced the earlier fit over 2 examples by one "
                                             "over a different set of 2 examples: a fit replaces, it does not add to the "
                                             "curvature, so the posterior and the evidence are those of these 2 examples "
                                             "alone; to fit on all of them, give every example in one loader"):
            guide.fit([second], progress=False)
        other = LoraModel(model.net, SequenceClassification())
        alone, both = (float(guide_class(other).fit(d, progress=False).log_marginal_likelihood()) for d in ([second], [whole]))
        assert int(guide.num_data) == 2
        assert float(guide.log_marginal_likelihood()) == pytest.approx(alone, rel=1e-5) != both  # the second half's alone
        with warnings.catch_warnings():  # the same examples again, reordered, rebatched and padded to other widths
            warnings.simplefilter("error", UserWarning)
            guide.fit(split_rows(second, [[1], [0]]), progress=False)
        with pytest.warns(UserWarning, match="by one over a different set of 2 examples"):
            guide.fit([relabelled], progress=False)


def test_a_refit_of_a_loaded_fit_says_it_cannot_compare_the_examples(tmp_path):
    """A loaded fit's examples are not saved: its refit is said, as one that may be over other examples."""
    from pyro_lora import load_guide, save_guide

    guide = LaplaceGuide(LoraModel(tiny_bert(r=2), SequenceClassification())).fit(bert_data(), progress=False)
    save_guide(guide, tmp_path / "g")
    loaded = load_guide(tmp_path / "g", LoraModel(tiny_bert(r=2), SequenceClassification()))
    with pytest.warns(UserWarning, match=r"LaplaceGuide.fit replaced the earlier fit over 3 examples by one over 3 "
                                         r"examples \(the loaded fit's examples are not saved, so they cannot be compared\)"):
        loaded.fit(bert_data(), progress=False)
    with warnings.catch_warnings():  # now its examples are known
        warnings.simplefilter("error", UserWarning)
        loaded.fit(bert_data(), progress=False)


@pytest.mark.parametrize("guide_class", ["laplace", "llla"])
def test_a_refit_over_the_same_examples_with_entries_the_network_never_reads_says_nothing(guide_class):
    """The fingerprint hashed every tensor of a batch: a refit over the same examples with an ``idx`` column (as HF
    GLUE datasets carry), a batch counter, a float attention mask or BERT's all-zero token_type_ids left out (what BERT
    reads where it is missing) warned of 'a different set of examples', the evidence equal to the last digit."""
    from pyro_lora.guides import LastLayerLaplaceGuide

    make = LaplaceGuide if guide_class == "laplace" else LastLayerLaplaceGuide
    (batch,) = bert_data()
    batch = {**batch, "token_type_ids": torch.zeros_like(batch["input_ids"])}
    guide = make(LoraModel(tiny_bert(r=2), SequenceClassification())).fit([batch], progress=False)
    evidence = float(guide.log_marginal_likelihood())
    same = [{k: v for k, v in batch.items() if k != "token_type_ids"},
            {**batch, "attention_mask": batch["attention_mask"].float()},
            {**batch, "idx": torch.tensor([17, 3, 9])},
            {**batch, "step": torch.tensor(4)}]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for b in same:
            guide.fit([b], progress=False)
            assert float(guide.log_marginal_likelihood()) == pytest.approx(evidence, rel=1e-6)
    other = {**batch, "token_type_ids": batch["attention_mask"].clone()}  # a token type the network reads
    with pytest.warns(UserWarning, match="by one over a different set of 3 examples"):
        guide.fit([other], progress=False)


def test_the_row_digest_masks_entries_by_their_name_not_their_shape():
    """A letter batch whose padded width T equals its number of choices K: the choice mask [B, K] was masked by the
    attention mask [B, T] (one shape): the same questions batched together or apart differed (a false alarm), and a
    question offered 3 choices then 4 did not (a miss: the evidence moved from -5.87 to -6.23)."""
    from conftest import tiny_llama
    from test_padding import _tokens, letter_batch

    from pyro_lora import MultipleChoice

    records, labels = [(_tokens(3, 1), 3), (_tokens(4, 2), 4)], torch.tensor([2, 3])
    together = [letter_batch(records, "left") | {"labels": labels}]
    assert together[0]["input_ids"].shape == together[0]["choice_mask"].shape  # T = K = 4
    apart = [letter_batch([r], "left") | {"labels": labels[i:i + 1]} for i, r in enumerate(records)]
    model = LoraModel(tiny_llama(r=2), MultipleChoice([10, 11, 12, 13], format="letter"))
    guide = LaplaceGuide(model, fisher="exact").fit(together, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        guide.fit(apart, progress=False)
    three = letter_batch(records, "right") | {"labels": labels}
    guide.fit([three], progress=False)
    with pytest.warns(UserWarning, match="by one over a different set of 2 examples"):
        guide.fit([{**three, "choice_mask": torch.ones_like(three["choice_mask"])}], progress=False)


def test_load_state_dict_into_a_fitted_guide_forgets_the_examples_of_the_fit_it_replaces():
    """laplace-torch's save / restore habit: a guide fitted on D1 given the state_dict of one fitted on D2 kept D1's
    fingerprint: its refit on D1 (replacing the D2 fit) was silent, and on D2 was said to be over other examples."""
    d1, d2 = bert_data(), bert_data(seed=5)
    g1 = LaplaceGuide(LoraModel(tiny_bert(r=2), SequenceClassification())).fit(d1, progress=False)
    g2 = LaplaceGuide(LoraModel(tiny_bert(r=2), SequenceClassification())).fit(d2, progress=False)
    g1.load_state_dict(g2.state_dict())
    with pytest.warns(UserWarning, match=r"examples \(the loaded fit's examples are not saved, so they cannot be compared\)"):
        g1.fit(d1, progress=False)


@pytest.mark.parametrize("layout", ["letter", "cloze"])
def test_the_row_digest_is_of_the_examples_not_their_order_batching_or_padding(layout):
    """The fingerprint a refit is compared by: the same multiple-choice examples in one batch or one per batch (another
    padding width, side and number of choice columns, a cloze record's dummy rows left out) give one key; a token or a
    label changed, or an example twice, another."""
    from test_padding import CLOZE_RECORDS, LETTER_RECORDS, cloze_batch, letter_batch

    from pyro_lora.data import RowDigest

    records, collate = (LETTER_RECORDS, letter_batch) if layout == "letter" else (CLOZE_RECORDS, cloze_batch)

    def key(batches):
        rows = RowDigest(("input_ids", "attention_mask"))
        for b in batches:
            rows.add(b, b["labels"].shape[0])
        return rows.key()

    together = key([collate(records)])
    assert key([collate([r], side) for r, side in zip(reversed(records), ("left", "right", "left"))]) == together
    labelled = collate(records)
    labelled["labels"][1] = 1
    changed = collate(records)
    changed["input_ids"][tuple(changed["attention_mask"].bool().nonzero()[0].tolist())] += 1
    assert len({together, key([labelled]), key([changed]), key([collate(records), collate(records[:1])])}) == 4


def test_the_row_digest_of_token_level_batches_leaves_the_padding_labels_out():
    """A CausalLM batch's labels are [B, T] with -100 at the padding: hashed whole, the same examples batched together
    and one per batch gave two keys (the padding width went into it); a real token's label changed still counts."""
    from pyro_lora.data import RowDigest

    def batch(rows, width):
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def key(batches):
        rows = RowDigest(("input_ids", "attention_mask"))
        for b in batches:
            rows.add(b, b["input_ids"].shape[0])
        return rows.key()

    rows = [[5, 6, 7, 8], [9, 10]]
    together = key([batch(rows, 4)])
    assert key([batch(rows[:1], 4), batch(rows[1:], 2)]) == key([batch(rows[::-1], 6)]) == together
    relabelled = batch(rows, 4)
    relabelled["labels"][1, 0] = -100  # a prompt token no longer scored
    assert key([relabelled]) != together
