"""The paper's sensitivity analysis (Eq. 3-13, Figures 2 and 3), computed and measured on our models.

    python -m experiments.run_theory            # after experiments.run_mnist (reads runs/mnist); ~2.5 min
    python -m experiments.run_theory --quick --mnist-run /tmp/mnist --out-dir /tmp/theory   # the tests' run

Writes into --out-dir (default runs/theory):
- fig2.png: F_X(c) = P(|cos theta_c| / |sin theta_d| <= c) for directions uniform on the sphere in
  R^d, several d (Eq. 9, experiments.theory.cdf_isotropic), and the table of F_X at a few (d, c).
- fig3_paper.png: Eq. 12-13 with the paper's ResNet-50 statistics (Section 3.4), alpha = 1/1000.
- fig3_mnist.png: the same measured on the MNIST miniature's two normally trained CNNs (cnn_fc.pt,
  cnn_l2.pt; 128-d features) on held-out images: the angles between a feature and its own class's
  reference vector (FC weight row / l2 prototype) and the others', their fitted Eq. 12 mixtures,
  and the modelled (Eq. 13) versus empirical CDF of |cos theta_c| / |sin theta_d| (the two angles
  of the same image and class).
- attack.png: APGD-CE (AutoAttack) adversarial examples on the FC model and on the l2 model, on the
  images the attack fools: the feature perturbation's |cos gamma| to the true class's reference
  vector, and the measured S_c (Eq. 3) and S_d (Eq. 4), against a random corner of the eps-ball
  on the same images.
- theory.json and theory.md: every number above.
Not the paper's setting (ImageNet ResNet-50): ours, on what this project can run.
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from experiments.common import EPS, machine, parse_with_command
from experiments import theory

DIMS = (2, 8, 32, 128, 512, 2048)
CS = (0.05, 0.1, 0.2, 0.5, 1.0)
SETTINGS = {"full": dict(n=1000, steps=20, grid=201), "quick": dict(n=64, steps=2, grid=21)}


def angles_to_references(z, refs, y):
    """(positive angles (n,), negative angles (n, K-1), all angles (n, K)) between features z (n, D)
    and reference vectors refs (K, D)."""
    cos = (z @ refs.T) / (np.linalg.norm(z, axis=1, keepdims=True) * np.linalg.norm(refs, axis=1))
    theta = np.arccos(np.clip(cos, -1, 1))
    own = np.zeros_like(theta, dtype=bool)
    own[np.arange(len(y)), y] = True
    return theta[own], theta[~own], theta


def fit_stats(pos, neg, k):
    """Eq. 12's parameters fitted to measured angles: (alpha, mu+, sigma+, mu-, sigma-), radians."""
    return (1 / k, *theory.fit_truncated_normal(pos), *theory.fit_truncated_normal(neg))


def attack_side(fc, l2, x, y, steps, seed):
    """For APGD-CE examples on each model: |cos gamma| of the feature perturbation to the true
    class's reference vector, S_c (FC) or S_d (l2), and the same for random signed perturbations.

    Measured on the images the attack fools (classified right, then wrong): APGD's perturb attacks
    only the images classified right and keeps only the examples that fool, so every other image
    comes back unchanged; its zero perturbation has no direction (counted, such images drew a
    spike at |cos gamma| = 0 and S = 0)."""
    from hpmkit.autoattack import APGDAttack

    out = {}
    for name, model in (("fc", fc), ("l2", l2)):
        x_adv = APGDAttack(model, n_iter=steps, norm="Linf", eps=EPS, seed=seed, loss="ce",
                           device=x.device).perturb(x, y).detach()
        with torch.no_grad():
            fooled = (model(x).argmax(1) == y) & (model(x_adv).argmax(1) != y)
        x_0, x_adv, y_0 = x[fooled], x_adv[fooled], y[fooled]
        x_rand = (x_0 + EPS * torch.randint_like(x_0, 0, 2).mul(2).sub(1)).clamp(0, 1)  # a corner of the ball
        with torch.no_grad():
            z, zs = model.features(x_0).double().numpy(), {k: model.features(v).double().numpy()
                                                            for k, v in (("apgd", x_adv), ("random", x_rand))}
        refs = (model.classifier.weight if name == "fc" else model.classifier.prototypes).detach().double().numpy()
        w = refs[y_0.numpy()]  # (n, D) the true class's reference vector
        sensitivity = theory.sensitivity_fc if name == "fc" else theory.sensitivity_l2
        for kind, z_adv in zs.items():
            dz = z_adv - z
            cos_g = np.abs((dz * w).sum(1)) / (np.linalg.norm(dz, axis=1) * np.linalg.norm(w, axis=1) + 1e-12)
            s = [float(sensitivity(a, b, c)) for a, b, c in zip(z, w, dz)]
            out[f"{name}/{kind}"] = {"abs_cos_gamma": cos_g.tolist(), "S": s}
    return out


def quantiles(v):
    return {q: float(np.quantile(np.asarray(v), p)) for q, p in (("q25", 0.25), ("median", 0.5), ("q75", 0.75))}


def figure(width, height):
    """A Figure outside pyplot (nothing to close; a test can inspect it); constrained layout keeps
    legends outside the axes inside the image."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_fig2(fig2, grid):
    """Fig. 2: F_X(c) against c for several feature dimensions d (Eq. 9); the legend right of the axes."""
    fig = figure(6.2, 3.8)
    ax = fig.add_subplot()
    cs = np.linspace(0, 1, grid)
    for d, curve in fig2.items():
        ax.plot(cs, curve, label=f"d = {d}")
    ax.set(xlabel="c = |cos γ| (no unit)", ylabel="F_X(c) = P(|cos θ_c| / |sin θ_d| ≤ c)",
           title="Fig. 2: directions uniform on the sphere in R^d (Eq. 9)")
    ax.legend(title="feature dim.", fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def plot_fig3(data, title):
    """Fig. 3: the Eq. 12 densities of theta_c and theta_d (with the measured angles where data has
    them) and Eq. 13's CDF (with the empirical one); one legend below the three panels."""
    fig = figure(13, 4.6)
    axes = fig.subplots(1, 3)
    t = np.linspace(0, math.pi, 721)
    for ax, which, name in ((axes[0], "c", "FC classifier\nθ_c: angle of z to the FC weight rows"),
                            (axes[1], "d", "l2 classifier\nθ_d: angle of z to the prototypes")):
        measured = data["angles"][which] if "angles" in data else ()
        for angles, color, whose in zip(measured, ("tab:orange", "tab:blue"), ("own class", "other classes")):
            ax.hist(np.degrees(angles), bins=60, density=True, alpha=0.4, color=color, label=f"{whose}, measured")
        _, mp, sp, mn, sn = data["stats"][which]
        for mu, sd, color, label in ((mp, sp, "tab:red", "own class (μ+, σ+)"),
                                     (mn, sn, "tab:green", "other classes (μ-, σ-)")):  # per radian, in degrees
            ax.plot(np.degrees(t), theory.truncated_normal_pdf(t, mu, sd) * math.pi / 180, color=color,
                    label=f"Eq. 12, {label}")
        ax.set(xlabel="angle (degrees)", ylabel="density (per degree)", title=name, xlim=(0, 180))
    axes[2].plot(data["c"], data["model"], color="black", label="Eq. 13, modelled")
    if "empirical" in data:
        axes[2].plot(data["c"], data["empirical"], "--", color="tab:purple",
                     label="measured ratio (same image and class)")
    axes[2].set(xlabel="c (no unit)", ylabel="P(|cos θ_c| / |sin θ_d| ≤ c)", ylim=(0, 1.02),
                title="FC against l2\nEq. 13: CDF of |cos θ_c| / |sin θ_d|")
    handles, labels = axes[0].get_legend_handles_labels()
    more = axes[2].get_legend_handles_labels()
    fig.legend(handles + more[0], labels + more[1], loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(title)
    return fig


ATTACK_LABELS = {"fc/apgd": "FC, APGD-CE", "fc/random": "FC, random corner of the eps-ball",
                 "l2/apgd": "l2, APGD-CE", "l2/random": "l2, random corner of the eps-ball"}


def plot_attack(attack, steps):
    """Histograms of |cos gamma| and of S (log scale) for each model and perturbation; the legend below."""
    fig = figure(10, 4.4)
    axes = fig.subplots(1, 2)
    s_all = np.concatenate([a["S"] for a in attack.values()])
    s_bins = np.geomspace(s_all[s_all > 0].min(), s_all.max(), 41)
    for key, a in attack.items():
        axes[0].hist(a["abs_cos_gamma"], bins=40, range=(0, 1), histtype="step", label=ATTACK_LABELS.get(key, key))
        axes[1].hist(a["S"], bins=s_bins, histtype="step")
    axes[0].set(xlabel="|cos γ| (no unit)", ylabel="images",
                title="alignment of Δz with\nthe true class's reference vector")
    axes[1].set(xscale="log", xlabel="S (relative change of the true class's logit, no unit)", ylabel="images",
                title="sensitivity\nS_c (Eq. 3) for FC, S_d (Eq. 4) for l2")
    fig.legend(loc="outside lower center", ncol=2, fontsize=9)
    n = {key.split("/")[0]: len(a["S"]) for key, a in attack.items()}
    fig.suptitle(f"The attack's side: APGD-CE ({steps} steps) against a random corner of the eps-ball (eps {EPS})\n"
                 f"on the held-out images the attack fools ({n.get('fc')} on FC, {n.get('l2')} on l2)")
    return fig


def plot(out_dir, fig2, paper, mnist, attack, cfg):
    """Every figure, saved into out_dir."""
    n = len(mnist["angles"]["c"][0])
    for name, fig in (("fig2.png", plot_fig2(fig2, cfg["grid"])),
                      ("fig3_paper.png", plot_fig3(paper, "Fig. 3 with the paper's ResNet-50 statistics "
                                                          "(Section 3.4; α = 1/1000)")),
                      ("fig3_mnist.png", plot_fig3(mnist, f"Fig. 3 measured on the MNIST miniature's two "
                                                          f"normally trained CNNs ({n} held-out images)")),
                      ("attack.png", plot_attack(attack, cfg["steps"]))):
        fig.savefig(out_dir / name, dpi=120)


def main(args):
    cfg = SETTINGS["quick" if args.quick else "full"]
    out, mnist_run = Path(args.out_dir), Path(args.mnist_run)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cs = np.linspace(0, 1, cfg["grid"])
    fig2 = {d: [theory.cdf_isotropic(c, d) for c in cs] for d in DIMS}
    table = {d: {c: theory.cdf_isotropic(c, d) for c in CS} for d in DIMS}
    printed = {d: theory.cdf_isotropic_as_printed(1.0, d) / theory.cdf_isotropic(1.0, d) for d in DIMS}
    paper = {"stats": theory.PAPER_RESNET50, "c": cs.tolist(),
             "model": [theory.cdf_empirical(c, theory.PAPER_RESNET50) for c in cs]}

    needed = [mnist_run / f for f in ("cnn_fc.pt", "cnn_l2.pt", "heldout.npz")]
    if not all(p.exists() for p in needed):
        raise SystemExit(f"{mnist_run} lacks {', '.join(p.name for p in needed if not p.exists())}: "
                         f"run `python -m experiments.run_mnist --out-dir {mnist_run}` first")
    fc, l2 = (torch.load(mnist_run / f"cnn_{k}.pt", weights_only=False).eval() for k in ("fc", "l2"))
    with np.load(mnist_run / "heldout.npz") as f:
        x = torch.from_numpy(f["x"][:cfg["n"]]).float() / 255
        y = torch.from_numpy(f["y"][:cfg["n"]])
    with torch.no_grad():
        z_c, z_d = fc.features(x).double().numpy(), l2.features(x).double().numpy()
    k = fc.classifier.out_features
    pos_c, neg_c, th_c = angles_to_references(z_c, fc.classifier.weight.detach().double().numpy(), y.numpy())
    pos_d, neg_d, th_d = angles_to_references(z_d, l2.classifier.prototypes.detach().double().numpy(), y.numpy())
    stats_ = {"c": fit_stats(pos_c, neg_c, k), "d": fit_stats(pos_d, neg_d, k)}
    ratio = (np.abs(np.cos(th_c)) / np.abs(np.sin(th_d))).ravel()  # the same image and class
    mnist = {"stats": stats_, "c": cs.tolist(), "model": [theory.cdf_empirical(c, stats_) for c in cs],
             "empirical": [float((ratio <= c).mean()) for c in cs],
             "angles": {"c": (pos_c, neg_c), "d": (pos_d, neg_d)}}
    attack = attack_side(fc, l2, x, y, cfg["steps"], args.seed)
    plot(out, fig2, paper, mnist, attack, cfg)

    deg = {w: [round(math.degrees(v), 2) if i else round(v, 4) for i, v in enumerate(s)] for w, s in stats_.items()}
    summary = {
        "command": args.command, "machine": machine(), "seconds": round(time.time() - t0, 1),
        "table": {str(d): {str(c): v for c, v in row.items()} for d, row in table.items()},
        "eq11_printed_over_cdf_at_c1": {str(d): v for d, v in printed.items()},
        "paper_fig3_cdf": {str(c): theory.cdf_empirical(c, theory.PAPER_RESNET50) for c in CS},
        "mnist_fitted_stats_degrees": deg, "mnist_n": int(len(y)), "mnist_feature_dim": int(z_c.shape[1]),
        "mnist_cdf": {str(c): {"model": theory.cdf_empirical(c, stats_), "empirical": float((ratio <= c).mean())}
                      for c in CS},
        "attack": {key: {"n": len(a["S"]), "abs_cos_gamma": quantiles(a["abs_cos_gamma"]), "S": quantiles(a["S"])}
                   for key, a in attack.items()},
    }
    (out / "theory.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["| d | " + " | ".join(f"c = {c}" for c in CS) + " |", "|---|" + "---:|" * len(CS)]
    lines += [f"| {d} | " + " | ".join(f"{table[d][c]:.4f}" for c in CS) + " |" for d in DIMS]
    lines += ["", "| measured on (images fooled) | quantity | q25 | median | q75 |", "|---|---|---:|---:|---:|"]
    for key, a in summary["attack"].items():
        for q in ("abs_cos_gamma", "S"):
            lines.append(f"| {key} ({a['n']}) | {q} | " + " | ".join(f"{a[q][p]:.3g}" for p in ("q25", "median", "q75"))
                         + " |")
    lines += ["", "| c | paper stats, Eq. 13 | MNIST, Eq. 13 fitted | MNIST, measured |", "|---:|---:|---:|---:|"]
    lines += [f"| {c} | {summary['paper_fig3_cdf'][str(c)]:.4f} | {summary['mnist_cdf'][str(c)]['model']:.4f} | "
              f"{summary['mnist_cdf'][str(c)]['empirical']:.4f} |" for c in CS]
    lines += ["", f"MNIST fitted Eq. 12 (alpha, mu+, sigma+, mu-, sigma-; degrees): fc {deg['c']}, l2 {deg['d']}"]
    (out / "theory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\n{out}: fig2.png fig3_paper.png fig3_mnist.png attack.png theory.json theory.md "
          f"({summary['seconds']:.0f} s)")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few images and steps (the tests' run)")
    p.add_argument("--mnist-run", default="runs/mnist", help="experiments.run_mnist's output folder")
    p.add_argument("--out-dir", default="runs/theory", help="where the figures and tables go")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks and random perturbations")
    return parse_with_command(p, "experiments.run_theory", argv)


if __name__ == "__main__":
    main(parse_args())
