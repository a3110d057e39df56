"""The MNIST miniature of the paper's Fig. 1 and Table 1: the whole method on real data, on a laptop.

    python -m experiments.run_mnist --quick                 # the quick form: 1.8 min on 2 idle CPU cores
    python -m experiments.run_mnist                         # the miniature: 43 min on 2 shared CPU cores
    python -m experiments.run_mnist --mnist-dir ~/data      # with the 60k training set: the full-size run

Stages, each a block of main() (everything lands in --out-dir, default runs/mnist; with --quick
runs/mnist-quick; docs/mnist.md shows a run):
1. data      train.npz and heldout.npz: with only the 10k test set (embedded, experiments/data/mnist), a
             seeded split of it; with the training files too (--mnist-dir), the standard 60k / 10k split.
2. models    three small CNNs: cnn_fc.pt and cnn_l2.pt (FC and l2 classifier), trained normally, and
             cnn_fc_at.pt (FC, PGD adversarial training at L-inf eps 0.3, Madry et al.'s MNIST setting):
             the embedded model (experiments.train_mnist_model), trained here only with --mnist-dir.
3. fig1      Fig. 1 in miniature: APGD-CE against cnn_fc and cnn_l2 at several eps -> fig1.md/.json/.png.
4. finetune  python finetune.py on cnn_fc_at.pt and train.npz -> head.pt.
5. evaluate  python evaluate.py on heldout.npz -> results.json (strong, with the checks),
             results_paper.json (--version paper), results_attackers_*.json (K of B).
6. table1    Table 1 in miniature -> table1.md; who holds the batch -> threat.md; summary.md.

Choices that are ours (the paper has no MNIST experiment): the CNN, the training schedules
(experiments.common.train), the split, and every reduction of the attack budgets made to fit 2 CPU
cores; all of them are in SETTINGS below and are printed into summary.md.
"""
import argparse
import datetime
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from experiments.common import (EPS, MODEL_PATH, SmallCNN, accuracy, cli_path, embedded_model, machine,
                                make_splits, parse_with_command, run_script, train)
from hpmkit.catalogue import ATTACKER_ATTACKS
from hpmkit.results import Results

# Every knob of the run, full and quick, sized for 2 CPU cores (not from the paper). The quick run's
# 128 images are the first of the full run's 500 (the same subset seed: a prefix of one permutation).
SETTINGS = {
    "full": dict(
        n_train=5000,          # training part of the 10k test set (the rest is held out)
        split=5000,            # the embedded model's split: it trained on the first 5,000
        batch_size=64,         # CNN training
        epochs=3,              # normal training of cnn_fc and cnn_l2 (Fig. 1)
        at_epochs=10,          # adversarial training of cnn_fc_at with --mnist-dir (warm-up and ramp: the first 2)
        at_steps=7,            # PGD steps per training batch (Madry: 40)
        fig1_eps=[0.0, 0.05, 0.1, 0.15, 0.2, 0.3],
        fig1_n=1000,           # held-out images attacked for Fig. 1
        fig1_steps=20,         # APGD-CE iterations for Fig. 1 (AutoAttack: 100)
        ft_args=[],            # extra finetune.py flags (none: the paper's 10 IKL steps, 1 epoch, all 5,000 images)
        # evaluate.py: 500 held-out images (paper: 25% of the test set), 20 APGD steps (paper: 40),
        # 1000 Square queries (paper: 5000), the checks on the same 500 images
        eval_args=["--n-examples", "500", "--steps", "20", "--queries", "1000", "--checks-n", "500"],
        attackers="1,8",       # K of B = 64: one attacker image per batch, and one in eight
        attacker_eps=[EPS, 1.0],  # the threat model's budget around natural images, and any image
    ),
    "quick": dict(
        n_train=5000, split=5000, batch_size=64, epochs=1, at_epochs=1, at_steps=2,
        fig1_eps=[0.0, 0.1, 0.3], fig1_n=200, fig1_steps=10,
        ft_args=["--per-class", "100"],  # 1,000 training images
        eval_args=["--n-examples", "128", "--steps", "10", "--queries", "100", "--checks-n", "64"],
        attackers="8", attacker_eps=[1.0],
    ),
}


# 3. Fig. 1: FC versus l2 classifier under APGD-CE ------------------------------------------

def fig1(models, x, y, eps_list, steps, seed, device):
    """{"fc": [acc at each eps], "l2": [...]}: AutoAttack's APGD-CE (perturb: attacks the correctly
    classified images) on the same held-out images at every eps.

    eps 0 runs the attack too (it cannot move an image), so the first point is the clean accuracy.
    """
    from hpmkit.autoattack import APGDAttack

    xf, yd = x.to(device).float().div(255), y.to(device)
    curves = {}
    for name, model in models.items():
        curves[name] = []
        for eps in eps_list:
            t0 = time.time()
            attack = APGDAttack(model, n_iter=steps, norm="Linf", eps=eps, seed=seed, loss="ce", device=device)
            x_adv = attack.perturb(xf, yd).detach()
            assert (x_adv - xf).abs().max() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
            with torch.no_grad():
                curves[name].append((model(x_adv).argmax(1) == yd).float().mean().item())
            print(f"  fig1 {name} classifier  eps {eps:<5g} accuracy {curves[name][-1]:7.2%}  "
                  f"({time.time() - t0:.1f} s)")
    return curves


def plot_fig1(eps_list, curves, path, note):
    """Accuracy versus eps, both classifiers: the shape of the paper's Fig. 1. Saved to path;
    returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), layout="constrained")  # keeps the legend beside the axes in the image
    ax = fig.add_subplot()
    for name, label in (("fc", "FC classifier"), ("l2", "l2 classifier")):
        ax.plot(eps_list, [100 * a for a in curves[name]], marker="o", label=label)
    ax.set_xlabel("L-inf eps of APGD-CE (pixel values in [0, 1])")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"MNIST, normally trained small CNNs\n{note}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: never over a curve
    fig.savefig(path, dpi=120)
    return fig


def fig1_table(eps_list, curves):
    """Markdown: one row per classifier, accuracy (%) at each eps."""
    lines = ["| eps | " + " | ".join(f"{e:g}" for e in eps_list) + " |",
             "|---|" + "---:|" * len(eps_list)]
    for name, label in (("fc", "FC classifier"), ("l2", "l2 classifier")):
        lines.append(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for a in curves[name]) + " |")
    return "\n".join(lines)


# 6. Table 1 in miniature ---------------------------------------------------------------------

ROWS = (("base", "base (FC, adversarially trained)"), ("hpm/batch", "HPM, batch context"),
        ("hpm/image", "HPM, image context"))


def pct(v):
    """A fraction as a table cell: percent to one decimal, "–" where not measured."""
    return "–" if v is None else f"{100 * v:.1f}"


def combined(row, prefix):
    """Accuracy under the best of several attacks per image (e.g. MSA: APGD-CE over all surrogates)."""
    names = [a for a in row.accuracies if a.split("/")[0] == prefix]
    if not names:
        return None
    per_image = [all(c) for c in zip(*(row.correct(a) for a in names))]
    return sum(per_image) / len(per_image)


def table1(results):
    """The paper's Table 1 shape plus every attack: (compact markdown, per-attack markdown)."""
    base = results.row("base")
    lines = ["| model | clean | APGD-CE | APGD-DLR | APGD-T | Square | worst case | vs base |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in ROWS:
        r = results.row(name)
        delta = "" if name == "base" else f"{100 * (r.worst_case - base.worst_case):+.1f}"
        lines.append(f"| {label} | {pct(r.clean)} | {pct(combined(r, 'apgd-ce'))} | "
                     f"{pct(combined(r, 'apgd-dlr'))} | {pct(combined(r, 'apgd-t'))} | "
                     f"{pct(r.accuracy('square'))} | {pct(r.worst_case)} | {delta} |")
    compact = "\n".join(lines)

    attacks = list(dict.fromkeys(a for name, _ in ROWS for a in results.row(name).accuracies))
    lines = ["| accuracy (%) | " + " | ".join(label for _, label in ROWS) + " |",
             "|---|" + "---:|" * len(ROWS)]
    for a in ["clean"] + attacks + ["worst_case"]:
        cells = [pct(results.row(name).accuracy(a)) for name, _ in ROWS]
        lines.append(f"| {a.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return compact, "\n".join(lines)


def checks_table(results):
    """Markdown: evaluate.py's gradient-masking checks, one line per row and check."""
    lines = ["| model | check | status | detail |", "|---|---|---|---|"]
    for name, label in ROWS:
        for check, c in results.row(name).checks.items():
            if check != "runs":
                lines.append(f"| {label} | {check} | {c['status']} | {c['detail']} |")
    return "\n".join(lines)


def versions_table(by_version):
    """Markdown: worst case (%) of every row under each version of evaluate.py, and its cost in
    backbone passes per image (checks excluded) and in minutes of attacks."""
    lines = ["| version | " + " | ".join(label for _, label in ROWS) + " | backbone passes / image | minutes |",
             "|---|" + "---:|" * (len(ROWS) + 2)]
    for version, results in by_version.items():
        rows = [results.row(name) for name, _ in ROWS]
        passes = sum(r.passes_per_image(a) or 0 for r in rows for a in r.accuracies)
        minutes = sum(r.seconds(a) for r in rows for a in r.accuracies) / 60
        lines.append(f"| {version} | " + " | ".join(pct(r.worst_case) for r in rows)
                     + f" | {passes:,.0f} | {minutes:.1f} |")
    return "\n".join(lines)


def threat_table(results, threats):
    """Markdown: who holds the batch. Worst-case accuracy (%) of the base model and of HPM when the
    attacker holds every image of a fixed batch, K of its B slots (own: the attacker's images;
    collateral: the benign ones, clean and under attack), or one image alone. threats: {the
    attacker's eps: the results of its K-of-B run}."""
    base, batch, alone = (results.row(n) for n in ("base", "hpm/batch", "hpm/image"))
    B = results.subset["batch_size"]
    lines = ["| who holds the batch | attacker's budget | base model | HPM |", "|---|---|---:|---:|",
             f"| the whole fixed batch (hpm/batch) | eps {EPS:g} | {pct(base.worst_case)} | {pct(batch.worst_case)} |"]
    for E, res in threats.items():
        budget = f"eps {E:g}" if E < 1 else "any image (eps 1)"
        for name, r in res.rows().items():
            if not name.startswith("hpm/attackers-"):
                continue
            K, slots = name.split("-")[-1], r.attacker_slots

            def base_on(role, record):  # the base model on the same images: a per-image model
                picked = [c for c, s in zip(base.correct(record), slots) if s == (role == "own")]
                return pct(sum(picked) / len(picked))
            # With any image allowed the attacker's own images are wrong on any model (it submits an
            # image of another class): the base model's own row is not measured there.
            own_base = base_on("own", "worst_case") if E <= EPS else "– (any image: not measured)"
            lines.append(f"| {K} of {B}: the attacker's own images | {budget} | {own_base} | {pct(r.own)} |")
            lines.append(f"| {K} of {B}: the benign images, clean {pct(r.benign_clean)} | {budget} | "
                         f"{base_on('benign', 'clean')} (no collateral) | {pct(r.benign)} |")
    lines.append(f"| each image alone (hpm/image) | eps {EPS:g} | {pct(base.worst_case)} | {pct(alone.worst_case)} |")
    return "\n".join(lines)


def verdict(results):
    """A plain sentence per context: did HPM's worst case beat the base model's, on the same images?"""
    base = results.row("base").correct("worst_case")
    n = len(base)
    out = []
    for name, label in ROWS[1:]:
        hpm_wc = results.row(name).correct("worst_case")
        gain = sum(h and not b for h, b in zip(hpm_wc, base))  # robust for HPM only
        loss = sum(b and not h for h, b in zip(hpm_wc, base))  # robust for the base only
        d = (sum(hpm_wc) - sum(base)) / n
        significant = abs(gain - loss) > 2 * (gain + loss) ** 0.5  # sign test, about 95%
        word = ("beat" if d > 0 and significant else "did not clearly beat" if d > 0 else "did not beat")
        noise = ("beyond noise (sign test)" if significant else "within noise") if d != 0 else "a tie"
        out.append(f"{label}: HPM {word} the base model here: worst case {100 * sum(hpm_wc) / n:.1f}% vs "
                   f"{100 * sum(base) / n:.1f}% ({100 * d:+.1f} points on {n} images, {noise}; {gain} "
                   f"images robust only with HPM, {loss} only with the base model).")
    return out


def about(cfg, quick):
    """What this run is, and what it is not, in plain words (printed first and last, and in
    summary.md)."""
    ev = dict(zip(cfg["eval_args"][::2], cfg["eval_args"][1::2]))
    full = dict(zip(SETTINGS["full"]["eval_args"][::2], SETTINGS["full"]["eval_args"][1::2]))
    embedded = json.loads(MODEL_PATH.with_suffix(".json").read_text())
    model = (f"the embedded adversarially trained CNN (held-out clean accuracy "
             f"{100 * embedded['heldout_clean_accuracy']:.1f}%, {cli_path(MODEL_PATH.with_suffix('.json'))})")
    if not quick:
        return (f"The MNIST miniature: {model}, its HPM head fine-tuned on the 5,000 training images, evaluated "
                f"on {ev['--n-examples']} held-out images with {ev['--steps']} APGD steps and {ev['--queries']} "
                "Square queries, K of B for K = " + cfg["attackers"].replace(",", " and ") + " at eps "
                + " and ".join(f"{e:g}" for e in cfg["attacker_eps"]) + " (docs/mnist.md). It is not the "
                "paper's experiment (the paper has no MNIST); the attack budgets are reduced to fit 2 CPU cores.")
    return (f"The quick form of the main job: {model}, its HPM head fine-tuned on 1,000 training images, "
            f"evaluated on {ev['--n-examples']} held-out images (the first of the full run's "
            f"{full['--n-examples']}) with {ev['--steps']} APGD steps (full run {full['--steps']}) and "
            f"{ev['--queries']} Square queries ({full['--queries']}); K of B only for K = {cfg['attackers']} "
            "attacker images that may be any image. Its table is within a few points of the full run's on the "
            f"same images, with about 4 points of sampling noise at {ev['--n-examples']} images. It is not the "
            f"MNIST miniature: Fig. 1's CNNs train for {cfg['epochs']} epoch and the checks run on "
            f"{ev['--checks-n']} images; the full run is python -m experiments.run_mnist (docs/mnist.md).")


# The script -----------------------------------------------------------------------------------

def main(args):
    t_start = time.time()
    cfg = SETTINGS["quick" if args.quick else "full"]
    out = Path(args.out_dir).resolve()
    load_start = os.getloadavg()[0]
    device = torch.device(args.device)
    timings = {}

    def stage(name):
        timings[name] = time.time()

    def done(name, text):
        timings[name] = time.time() - timings[name]
        print(f"[{name}] {text} ({timings[name]:.0f} s)")

    print(about(cfg, args.quick) + "\n")
    stage("data")
    x_tr, y_tr, x_ho, y_ho, source = make_splits(args.mnist_dir, cfg, args.seed)
    print(f"  {source}")
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "train.npz", x=x_tr, y=y_tr)
    np.savez_compressed(out / "heldout.npz", x=x_ho, y=y_ho)
    x_tr, y_tr, x_ho, y_ho = map(torch.from_numpy, (x_tr, y_tr, x_ho, y_ho))
    done("data", f"train.npz {tuple(x_tr.shape)}, heldout.npz {tuple(x_ho.shape)}")

    stage("models")
    embedded = args.mnist_dir is None  # the embedded split: the embedded model trained on its training part
    print(f"  {cfg['epochs']} epoch(s) of normal training; cnn_fc_at: " + (
        f"the embedded model ({cli_path(MODEL_PATH)}: PGD adversarial training at eps {EPS}, "
        "experiments.train_mnist_model)" if embedded else
        f"{cfg['at_epochs']} epoch(s) of PGD adversarial training (eps {EPS}, {cfg['at_steps']} steps)"))
    models = {}
    for key, classifier, epochs, at_steps in (("cnn_fc", "fc", cfg["epochs"], 0),
                                              ("cnn_l2", "l2", cfg["epochs"], 0),
                                              ("cnn_fc_at", "fc", cfg["at_epochs"], cfg["at_steps"])):
        torch.manual_seed(args.seed)
        if key == "cnn_fc_at" and embedded:
            models[key] = embedded_model().to(device)
        else:
            models[key] = train(SmallCNN(classifier), x_tr, y_tr, epochs, cfg["batch_size"], device, key, at_steps)
        torch.save(models[key], out / f"{key}.pt")
    clean = {k: accuracy(m, x_ho, y_ho, device) for k, m in models.items()}
    done("models", "held-out clean accuracy " + ", ".join(f"{k} {v:.1%}" for k, v in clean.items()))

    stage("fig1")
    n1 = min(cfg["fig1_n"], len(y_ho))
    print(f"  APGD-CE, {cfg['fig1_steps']} iterations, on the first {n1} held-out images")
    curves = fig1({"fc": models["cnn_fc"], "l2": models["cnn_l2"]}, x_ho[:n1], y_ho[:n1],
                  cfg["fig1_eps"], cfg["fig1_steps"], args.seed, device)
    fig1_md = fig1_table(cfg["fig1_eps"], curves)
    (out / "fig1.md").write_text(fig1_md + "\n")
    (out / "fig1.json").write_text(json.dumps({"eps": cfg["fig1_eps"], "accuracy": curves, "n": n1,
                                               "steps": cfg["fig1_steps"], "attack": "APGD-CE (perturb)",
                                               "models": {"fc": "cnn_fc.pt", "l2": "cnn_l2.pt"}}, indent=1))
    plot_fig1(cfg["fig1_eps"], curves, out / "fig1.png",
              f"APGD-CE, {cfg['fig1_steps']} iterations, {n1} held-out images")
    done("fig1", "fig1.md, fig1.json, fig1.png")

    stage("finetune")
    ft_argv = ["finetune.py", "--model", cli_path(out / "cnn_fc_at.pt"), "--dataset", "mnist",
               "--data", cli_path(out / "train.npz"), "--out", cli_path(out / "head.pt"),
               "--seed", str(args.seed), "--device", args.device] + cfg["ft_args"]
    run_script(ft_argv, out / "finetune.log")
    done("finetune", "head.pt")

    stage("evaluate")  # the default (strong) version, with the checks; then the paper's protocol

    def evaluate(name, *extra, checks=False):  # evaluate.py -> results{name}.json; its argv
        argv = ["evaluate.py", "--head", cli_path(out / "head.pt"), "--model", cli_path(out / "cnn_fc_at.pt"),
                "--dataset", "mnist", "--data", cli_path(out / "heldout.npz"),
                "--out", cli_path(out / f"results{name}.json")] + ["--checks"] * checks
        argv += ["--overwrite", "--seed", str(args.seed), "--subset-seed", str(args.seed),
                 "--device", args.device, *cfg["eval_args"], *extra]
        run_script(argv, out / f"evaluate{name}.log")
        return argv

    ev_argv = evaluate("", checks=True)
    paper_argv = evaluate("_paper", "--version", "paper")
    threats = {}  # K of B: the attacker's slots, at the threat model's eps and as any image
    for E in cfg["attacker_eps"]:
        tag = "_attackers_" + ("any" if E >= 1 else "eps")
        evaluate(tag, "--contexts", "batch", "--attacks", ",".join(ATTACKER_ATTACKS), "--attackers",
                 cfg["attackers"], "--attacker-eps", f"{E:g}")
        threats[E] = Results.read(out / f"results{tag}.json")
    done("evaluate", "results.json (version strong), results_paper.json (version paper), "
                     + ", ".join(f"results_attackers_{'any' if E >= 1 else 'eps'}.json" for E in threats)
                     + " (K of B)")

    stage("table1")
    results = Results.read(out / "results.json")
    versions_md = versions_table({"strong": results, "paper": Results.read(out / "results_paper.json")})
    compact, per_attack = table1(results)
    checks_md, verdicts = checks_table(results), verdict(results)
    threat_md = threat_table(results, threats)
    (out / "table1.md").write_text(compact + "\n\n" + per_attack + "\n\n" + checks_md + "\n")
    (out / "threat.md").write_text(threat_md + "\n")
    done("table1", "table1.md")

    total = time.time() - t_start
    ec = results.config
    title = ("Quick form of the MNIST main job (not the MNIST miniature: reduced budgets, 128 images)" if args.quick
             else "MNIST miniature of Fig. 1 and Table 1")
    summary = f"""# {title}

{about(cfg, args.quick)}

Command: `{args.command}` ({'reduced run, --quick' if args.quick else 'full run'})
Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; machine: {machine()}; device {args.device}.
Total time: {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}); 1-minute
load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above ~2 means other processes
shared the CPUs).

Data: {source}. Settings (not from the paper; sized for 2 CPU cores): {json.dumps(cfg)}.
Models: small CNN (conv 5x5 16, conv 5x5 32, linear 128, classifier); Adam 1e-3, batch {cfg['batch_size']}.
cnn_fc_at: PGD adversarial training, L-inf eps {EPS}, {cfg['at_steps']} steps of 2.5 eps / steps from a
random start (Madry et al.: 40 steps of 0.01, 100 epochs of 60k images), {cfg['at_epochs']} epoch(s): the first
10% of the updates clean, eps ramped linearly 0 -> {EPS} over the next 10%.
cnn_fc and cnn_l2 start from the same backbone initialisation (same seed); only the classifier differs.
Held-out clean accuracy: {', '.join(f'{k} {100 * v:.1f}%' for k, v in clean.items())}.

## Fig. 1 in miniature: FC versus l2 classifier, trained normally

APGD-CE (AutoAttack, `perturb`, {cfg['fig1_steps']} iterations; AutoAttack's default is 100) on the
first {n1} held-out images; accuracy (%) at each L-inf eps. Plot: fig1.png.

{fig1_md}

## Who holds the batch

The attacker perturbs every image of a fixed batch (the paper's adversarial batch), K of its B
slots among benign images (the last K, DIA's convention; own: the attacker's images
misclassified; collateral: the benign images misclassified through the batch prototypes), or
each image alone; the base model (per image) beside it, on the same images. Worst case (%):

{threat_md}

## Table 1 in miniature: base (FC, adversarially trained) versus HPM

    {shlex.join(['python'] + ft_argv)}
    {shlex.join(['python'] + ev_argv)}

Evaluation: {ec['n_examples']} held-out images (subset seed {ec['subset_seed']}), batches of
{ec['batch_size']}, L-inf eps {ec['eps']:g}, APGD {ec['steps']} iterations (paper: 40), Square
{ec['queries']} queries (paper: 5000), gradient-masking checks on the first
{min(ec['checks_n'], ec['n_examples'])} images. APGD-CE and APGD-DLR columns for HPM: the Mixed
Surrogate Attack, an image counted robust only if it survives all four surrogates (fc, soft, ste,
mix); the worst case is over clean and every attack. Accuracy (%):

{compact}

Every attack:

{per_attack}

Both versions of evaluate.py on the same head, images and batches (worst case, %; `strong` is
the default and is the table above; `paper` is the paper's protocol exactly):

    {shlex.join(['python'] + paper_argv)}

{versions_md}

Gradient-masking checks:

{checks_md}

## Did HPM beat the base model?

""" + "\n".join(f"- {v}" for v in verdicts) + "\n"
    (out / "summary.md").write_text(summary)
    print("\n" + "\n\n".join([fig1_md, compact, threat_md, versions_md, "\n".join(verdicts)]))
    print("\n" + about(cfg, args.quick))
    print(f"\nall artefacts in {out}; summary: {out / 'summary.md'} ({total / 60:.1f} min)")
    return {"out": out, "fig1": curves, "results": results, "clean": clean, "seconds": total}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the reduced run of the test suite: a few hundred images, one epoch, very few steps")
    p.add_argument("--out-dir", help="where every artefact is written (default: runs/mnist, with --quick "
                   "runs/mnist-quick: the quick form never writes over the full run's folder)")
    p.add_argument("--mnist-dir", default=None,
                   help="MNIST idx files (.gz or not), directly or in MNIST/raw/; with the train-* files "
                        "the 60k set trains and the test set is held out (default: the embedded test set)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the training and the attacks")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parse_with_command(p, "experiments.run_mnist", argv)
    args.out_dir = args.out_dir or ("runs/mnist-quick" if args.quick else "runs/mnist")
    return args


if __name__ == "__main__":
    main(parse_args())
