"""Adv-DPNP end to end on MNIST, as in its paper's Figure 2: LeNets++ with two-dimensional
features, trained with plain adversarial training and with Adv-DPNP, and a plot of the clean and
adversarial features with the learned prototypes.

    python -m experiments.run_dpnp_mnist                             # about 20 minutes on 2 CPU cores
    python -m experiments.run_dpnp_mnist --quick --out-dir /tmp/dpnp # the reduced run of the tests

It uses experiments.run_mnist's split (experiments.common: the embedded 10k test set, or
--mnist-dir). Both models share the LeNets++ backbone of Wen et al. (2016), 2-D features. "at": a
linear classifier trained on PGD examples with cross-entropy (Madry et al.). "dpnp": unified
prototypes on the circle of radius alpha (hpmkit/controls.py), trained end to end on Eq. 7 with
Algorithm 1's dual branch, their Adam learning rate alpha times the others' (ours: Adam's step
does not scale with a weight's size, and at 1e-3 prototypes of norm 40 stayed where they started,
some on top of each other). Both: L-inf eps 0.3, Adam 1e-3, the first 10% of the updates clean,
then eps ramped linearly to 0.3 by half of training (SETTINGS' ramp: with 2-D features and
run_mnist's faster ramp, plain AT stayed near chance). Ours, sized for a CPU (the paper trains
ResNets on CIFAR for 110 epochs). Writes fig2.png (features and prototypes) and fig2.json (clean
and PGD accuracy on held-out images).
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.common import EPS, make_splits, pgd_linf
from hpmkit import controls
from hpmkit.cli import progress_bar

SETTINGS = {
    "full": dict(n_train=5000, epochs=12, steps=5, batch_size=64, n_plot=1000, eval_steps=20, ramp=(0.1, 0.5)),
    "quick": dict(n_train=300, n_heldout=100, epochs=1, steps=1, batch_size=64, n_plot=100, eval_steps=2,
                  ramp=(0.1, 0.2)),
}
LAMBDAS = controls.DPNP_LAMBDAS["cifar10"]  # the paper's CIFAR-10 weights (MNIST: our choice)


class LeNetsPP(nn.Module):
    """LeNets++ (Wen et al. 2016): 2-D features, then `classifier` ("fc" or a DPNP head)."""

    def __init__(self, classifier="fc", alpha=40.0, K=10):
        super().__init__()

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 5, padding=2), nn.PReLU(), nn.Conv2d(c_out, c_out, 5, padding=2),
                    nn.PReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*stage(1, 32), *stage(32, 64), *stage(64, 128),  # (B, 128, 3, 3)
                                      nn.Flatten(), nn.Linear(128 * 3 * 3, 2), nn.PReLU())  # (B, 2)
        fc = nn.Linear(2, K)
        self.classifier = fc if classifier == "fc" else controls.DPNPHead(fc, alpha=alpha)

    def forward(self, x):
        return self.classifier(self.features(x))


def pgd(model, x, y, eps, steps):
    return pgd_linf(model, x, y, eps, steps) if eps > 0 and steps > 0 else x


def train(model, x, y, cfg, kind, device):
    """Adam 1e-3 (prototypes alpha * 1e-3) with SETTINGS' eps ramp; "at": CE on PGD examples;
    "dpnp": Eq. 7."""
    model.to(device).train()
    params = [{"params": [p for n, p in model.named_parameters() if n != "classifier.prototypes"]}]
    if kind == "dpnp":  # Adam's steps do not scale with a weight's size: prototypes of norm alpha
        params.append({"params": [model.classifier.prototypes], "lr": 1e-3 * model.classifier.alpha})
    opt = torch.optim.Adam(params, lr=1e-3)
    n_batches = (len(y) + cfg["batch_size"] - 1) // cfg["batch_size"]
    for epoch in range(cfg["epochs"]):
        if kind == "dpnp":
            model.classifier.renormalize()  # Algorithm 1, line 4
        perm = torch.randperm(len(y))
        bar = progress_bar(n_batches, f"{kind} epoch {epoch + 1}/{cfg['epochs']}")
        for b in range(n_batches):
            idx = perm[b * cfg["batch_size"]:(b + 1) * cfg["batch_size"]]
            xb, yb = x[idx].to(device).float().div(255), y[idx].to(device)
            progress = (epoch * n_batches + b + 1) / (cfg["epochs"] * n_batches)
            start, end = cfg["ramp"]
            eps = EPS * min(1.0, max(0.0, (progress - start) / (end - start)))
            x_adv = pgd(model, xb, yb, eps, cfg["steps"])
            if kind == "at":
                loss = F.cross_entropy(model(x_adv), yb)
            else:
                loss = controls.adv_dpnp_loss(model.classifier, model.features(xb), model.features(x_adv), yb,
                                          *LAMBDAS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.set_postfix_str(f"loss {loss.item():.3f}")
            bar.update(1)
        bar.close()
        print(f"  {kind} epoch {epoch + 1}/{cfg['epochs']}: loss {loss.item():.3f}")
    return model.eval()


def accuracy(model, x, y, eps, steps, device):
    """Clean and PGD (random start, `steps` steps) accuracy on uint8 images."""
    xf, yd = x.to(device).float().div(255), y.to(device)
    with torch.no_grad():
        clean = (model(xf).argmax(1) == yd).float().mean().item()
    x_adv = pgd(model, xf, yd, eps, steps)
    with torch.no_grad():
        return clean, (model(x_adv).argmax(1) == yd).float().mean().item()


def plot(models, x, y, path, note, device):
    """One panel per model: clean features (dots), PGD features (crosses), prototypes or classifier
    directions (stars), coloured by digit; one legend below the panels. Saved to path; returns the Figure."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    xf, yd = x.to(device).float().div(255), y.to(device)
    fig = Figure(figsize=(5 * len(models), 5.4), layout="constrained")  # keeps the legend in the image
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    colors = [f"C{c}" for c in range(10)]  # tab10: one colour per digit
    for ax, (kind, model) in zip(axes, models.items()):
        x_adv = pgd(model, xf, yd, EPS, 10)
        with torch.no_grad():
            z, z_adv = model.features(xf).cpu(), model.features(x_adv).cpu()
        for c in range(10):
            m = y == c
            ax.scatter(z[m, 0], z[m, 1], s=3, color=colors[c], alpha=0.6)
            ax.scatter(z_adv[m, 0], z_adv[m, 1], s=8, color=colors[c], marker="x", alpha=0.5)
        if kind == "dpnp":
            C = model.classifier.prototypes.detach().cpu()
        else:  # a linear classifier: its weight directions, scaled to the features' spread
            C = F.normalize(model.classifier.weight.detach().cpu(), dim=1) * z.norm(dim=1).quantile(0.9)
        ax.scatter(C[:, 0], C[:, 1], s=160, c=colors, marker="*", edgecolors="black")
        ax.set_title({"at": "adversarial training (CE)\nstars: FC weight directions, scaled to the features",
                      "dpnp": "Adv-DPNP\nstars: the learned prototypes"}[kind], fontsize=10)
        ax.set(xlabel="feature z_1 (no unit)", ylabel="feature z_2 (no unit)")
    marks = [Line2D([], [], color="gray", marker=m, linestyle="", markersize=s, label=label)
             for m, s, label in (("o", 4, "clean image"), ("x", 6, f"PGD-10 image (eps {EPS})"),
                                 ("*", 12, "prototype / weight direction"))]
    digits = [Patch(color=colors[c], label=f"digit {c}") for c in range(10)]
    fig.legend(handles=marks + digits, loc="outside lower center", ncol=7, fontsize=8)
    fig.suptitle(f"MNIST, LeNets++ 2-D features of held-out images\n{note}", fontsize=10)
    fig.savefig(path, dpi=110)
    return fig


def main(args):
    t0 = time.time()
    cfg = SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    x_tr, y_tr, x_ho, y_ho, source = make_splits(args.mnist_dir, cfg, args.seed)
    x_tr, y_tr, x_ho, y_ho = map(torch.from_numpy, (x_tr, y_tr, x_ho, y_ho))
    print(f"  {source}")
    models, results = {}, {}
    for kind in ("at", "dpnp"):
        torch.manual_seed(args.seed)  # the same backbone initialisation for both
        models[kind] = train(LeNetsPP("fc" if kind == "at" else "dpnp"), x_tr, y_tr, cfg, kind, device)
        torch.save(models[kind].state_dict(), out / f"lenets_{kind}.pt")
        n = min(1000, len(y_ho))
        clean, robust = accuracy(models[kind], x_ho[:n], y_ho[:n], EPS, cfg["eval_steps"], device)
        results[kind] = {"clean": clean, "pgd": robust, "n": n, "pgd_steps": cfg["eval_steps"]}
        print(f"  {kind}: held-out clean {clean:.1%}, PGD-{cfg['eval_steps']} (eps {EPS}) {robust:.1%}")
    n_plot = min(cfg["n_plot"], len(y_ho))
    note = f"{n_plot} held-out images, PGD-10 at eps {EPS}"
    plot(models, x_ho[:n_plot], y_ho[:n_plot], out / "fig2.png", note, device)
    minutes = (time.time() - t0) / 60
    (out / "fig2.json").write_text(json.dumps(
        {"settings": cfg, "lambdas": LAMBDAS, "accuracy": results, "minutes": minutes, "data": source}, indent=1))
    print(f"fig2.png, fig2.json in {out} ({minutes:.1f} min)")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced run of the test suite")
    p.add_argument("--out-dir", default="runs/dpnp_mnist",
                   help="where the models and plot go (default runs/dpnp_mnist)")
    p.add_argument("--mnist-dir", default=None, help="MNIST idx files (default: the embedded test set)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the initialisation and the attacks (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
