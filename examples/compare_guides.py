"""Swap posterior guides over one trained LoRA and compare them: MiniLM on SST-2, on the CPU.

Train a MAP LoRA once, then give the same network several guides (each through its own
``LoraModel`` view with the random sites it needs) and score them on the same test set.

    python examples/compare_guides.py                 # a few minutes on 2 CPU cores
    python examples/compare_guides.py --device cuda --train 4000 --epochs 5
"""

import argparse

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO

from pyro_lora.guides import MAPGuide, MeanFieldGuide, bayesianize
from pyro_lora import LoraModel, SequenceClassification, fit, predict
from pyro_lora import data as D
from pyro_lora.metrics import summarize
from pyro_lora.pretrained import add_lora, load_pretrained


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    pyro.set_rng_seed(0)

    net, tokenizer = load_pretrained("minilm", "classification", num_labels=2, device=args.device)
    net = add_lora(net, r=8).to(args.device)
    train = D.subset(D.load_records("sst2", "train"), args.train)
    anchors = D.subset(train, min(128, len(train)))  # TFB draws its anchors from the training set
    test = D.subset(D.load_records("sst2", "test"), args.test)
    collate = D.ClassificationCollator(tokenizer)
    loader = lambda records, shuffle=False: D.make_loader(records, collate, 16, shuffle=shuffle)  # noqa: E731
    likelihood = SequenceClassification()

    # 1. MAP: plain LoRA fine-tuning through the Pyro model, then write it into the adapter
    model = LoraModel(net, likelihood, random="AB", num_data=len(train))
    map_guide = MAPGuide(model)
    fit(model, map_guide, loader(train, shuffle=True), epochs=args.epochs, lr=args.lr)
    model.write_adapter({k: v.detach() for k, v in map_guide.mean().items()})
    trained = {n: p.detach().clone() for n, p in net.named_parameters() if "lora_" in n or p.requires_grad}

    def reset():
        with torch.no_grad():
            params = dict(net.named_parameters())
            for n, v in trained.items():
                params[n].copy_(v)

    # 2. guides over the same network; each starts from the MAP
    def meanfield():
        m = LoraModel(net, likelihood, random="A", prior=0.1, num_data=len(train))
        g = MeanFieldGuide(m)
        fit(m, g, loader(train, shuffle=True), epochs=args.epochs, lr=args.lr, elbo=TraceMeanField_ELBO())
        return m, g

    def tfb():
        m = LoraModel(net, likelihood, random="AB", num_data=len(train))
        return m, bayesianize(m, loader(anchors), criterion="flip", tolerance=0.01, high=0.2, num_samples=args.samples)

    rows = []
    for name, build in [("map", lambda: (model, map_guide)), ("meanfield", meanfield), ("tfb", tfb)]:
        reset()
        m, g = build()
        p = predict(m, g, loader(test), num_samples=args.samples)
        rows.append((name, summarize(p.probs, p.labels)))
    print("| guide | accuracy | ECE x100 | NLL | Brier |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['accuracy']:.3f} | {r['ece']:.2f} | {r['nll']:.3f} | {r['brier']:.3f} |")


if __name__ == "__main__":
    main()
