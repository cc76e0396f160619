"""Mean-field SVI over the LoRA of SmolLM2-135M on ARC-Easy, written directly against Pyro.

The LoRA A matrices are Pyro sample sites with an isotropic prior; the guide is BLoB-style mean-field;
the loop is the plain Pyro one (an ELBO and a torch optimizer, as in Pyro's ``examples/svi_torch.py``).
``pyro_lora.fit`` wraps the same loop with schedules, accumulation, autocast and checkpoints.

    python examples/svi_smollm2_arc.py                       # CPU, small subsets, a few minutes
    python examples/svi_smollm2_arc.py --device cuda --train 2000 --test 500 --epochs 3 --batch 8
"""

import argparse

import pyro
import torch
from pyro.infer import TraceMeanField_ELBO
from tqdm.auto import tqdm

from pyro_lora.guides import MeanFieldGuide
from pyro_lora import LoraModel, MultipleChoice, predict
from pyro_lora import data as D
from pyro_lora.metrics import summarize
from pyro_lora.pretrained import add_lora, load_pretrained
from pyro_lora.training import to_device


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    pyro.set_rng_seed(0)

    net, tokenizer = load_pretrained("smollm2", "causal_lm", device=args.device)
    net = add_lora(net, r=8).to(args.device)  # LoRA on q_proj, v_proj
    train = D.subset(D.load_records("arc_easy", "train"), args.train)
    test = D.subset(D.load_records("arc_easy", "test"), args.test)
    collate = D.ClozeCollator(tokenizer)  # a 135M model needs the cloze format (letters leave it at chance)
    train_loader = D.make_loader(train, collate, args.batch, shuffle=True)
    test_loader = D.make_loader(test, collate, args.batch)

    # p(A) = N(0, 0.2^2) per entry on every stacked lora_A site; B stays a trained point estimate
    model = LoraModel(net, MultipleChoice(format="cloze"), random="A", prior=0.2, num_data=len(train))
    guide = MeanFieldGuide(model).to(args.device)
    print({name: site.shape for name, site in model.sites.items()})

    elbo = TraceMeanField_ELBO()  # closed-form KL(q || p) per site
    optimizer = torch.optim.AdamW(list(guide.parameters()) + model.point_parameters(), lr=args.lr)
    net.train()
    with pyro.validation_enabled(False):
        for epoch in range(args.epochs):
            bar = tqdm(train_loader, desc=f"epoch {epoch}")
            for batch in bar:
                loss = elbo.differentiable_loss(model, guide, to_device(batch, args.device)) / len(train)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}")

    for name, kwargs in [("posterior mean", dict(mean=True)), (f"{args.samples} samples", dict(num_samples=args.samples))]:
        p = predict(model, guide, test_loader, **kwargs)
        print(name, {k: round(v, 4) for k, v in summarize(p.probs, p.labels).items()})


if __name__ == "__main__":
    main()
