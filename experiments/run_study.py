"""The fine-tuning study on the MNIST miniature: does HPM beat its base model, and under which
fine-tuning? A reference implementation must tell "the method does not help" from "our port
differs", so every setting that could change the answer is fine-tuned and evaluated the same way.

    python -m experiments.run_study          # after run_mnist (it reuses runs/mnist); 2 CPU cores
    python -m experiments.run_study --quick --mnist-run /tmp/mnist --out-dir /tmp/study   # the tests' run

It reuses experiments.run_mnist's artefacts in --mnist-run (train.npz, heldout.npz and the
adversarially trained CNN cnn_fc_at.pt), running it there first if they are missing. Then, for each
setting: finetune.py with the setting's flags, and evaluate.py (its default version, strong; both
contexts) on the same held-out images, batches and seeds, through their command lines. Settings:
the mixer's start (average, global, default) x the training attack's mode (ste, soft, fc) x the
IKL class weights (ema, fixed), all with the official attack loss (the official defaults: average
/ ste / ema / official), plus the first landing's defaults (average, ste, fixed, attack on the
whole training loss), plus two controls (hpmkit/controls.py): an NCM head and an Adv-DPNP head.
Writes study.json, study.md (the table) and study.png (the plot). All settings are ours (the paper
has no MNIST experiment); the evaluation budget (EVAL) is reduced to fit 2 CPU cores, which
weakens the attacks for every row alike.
"""
import argparse
import itertools
import json
import re
import time
from pathlib import Path

from experiments.common import cli_path, machine, parse_with_command, run_script
from hpmkit.results import Results

GRID = [dict(mixer_init=m, attack_mode=a, class_weights=w, attack_loss="official")
        for m, a, w in itertools.product(("average", "global", "default"), ("ste", "soft", "fc"),
                                         ("ema", "fixed"))]
FIRST_LANDING = dict(mixer_init="average", attack_mode="ste", class_weights="fixed", attack_loss="train")
OFFICIAL = dict(mixer_init="average", attack_mode="ste", class_weights="ema", attack_loss="official")
# l2 to C_global alone; Adv-DPNP's prototypes, with the paper's DFA weight (2) and without DFA,
# through which alone the adversarial branch reaches the prototypes when the backbone is frozen
CONTROLS = [dict(head="ncm"), dict(head="dpnp"), dict(head="dpnp", lambda_dfa=0.0)]
EVAL = {"full": ["--n-examples", "128", "--steps", "10", "--queries", "300"],
        "quick": ["--n-examples", "32", "--steps", "2", "--queries", "10"]}
QUICK_SETTINGS = [OFFICIAL, CONTROLS[1]]  # an HPM head and a control without a batch context


def name_of(s):
    if "head" in s:
        return s["head"] + (f" (lambda_DFA {s['lambda_dfa']:g})" if "lambda_dfa" in s else "")
    return f"{s['mixer_init']}/{s['attack_mode']}/{s['class_weights']}/{s['attack_loss']}"


def tag_of(name):
    """A setting's name as a file-name part."""
    return re.sub(r"[^\w.-]+", "_", name).strip("_")


def flags_of(s):
    if "head" in s:
        return ["--head", s["head"]] + (["--lambda-dfa", str(s["lambda_dfa"])] if "lambda_dfa" in s else [])
    return ["--mixer-init", s["mixer_init"], "--attack-mode", s["attack_mode"],
            "--class-weights", s["class_weights"], "--attack-loss", s["attack_loss"]]


def row(results, name):
    """One row of a results file: "base", "hpm/batch", or the per-image row ("hpm/image", which
    is the NCM head's only one, or the DPNP head's "dpnp"); None where the run has no such row."""
    rows = results.rows()
    return rows["dpnp"] if name == "hpm/image" and "dpnp" in rows else rows.get(name)


def table(runs):
    """Markdown: one line per setting; worst case (%) per row and the difference to the base."""
    def cells(r):
        if r is None:  # a control has no batch context
            return "–", "–", "–"
        return f"{100 * r.clean:.1f}", f"{100 * r.worst_case:.1f}", f"{100 * (r.worst_case - base):+.1f}"

    lines = ["| setting: HPM (mixer / attack mode / class weights / attack loss), or a control head "
             "| clean | batch context | vs base | clean | per image | vs base |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        res = r["results"]
        base = row(res, "base").worst_case
        mark = {name_of(OFFICIAL): " (official defaults)", name_of(FIRST_LANDING): " (first landing)",
                "ncm": " (control: l2 to C_global alone)", "dpnp": " (control: Adv-DPNP head)",
                "dpnp (lambda_DFA 0)": " (control: Adv-DPNP head without DFA)"}.get(r["name"], "")
        lines.append(f"| {r['name']}{mark} | " + " | ".join(cells(row(res, "hpm/batch"))) + " | "
                     + " | ".join(cells(row(res, "hpm/image"))) + " |")
    base = row(runs[0]["results"], "base")
    lines.append(f"| base model (its own FC head) | | | | {100 * base.clean:.1f} | {100 * base.worst_case:.1f} | |")
    return "\n".join(lines)


def plot(runs, path, note):
    """Worst case of HPM in both contexts per setting, against the base model's; each bar carries
    its value, so a worst case of 0% reads "0.0%", and a setting without a batch context (a control)
    reads "n/a" with no bar. Saved to path; returns the Figure."""
    from matplotlib.figure import Figure

    names = [r["name"] for r in runs]
    ys = range(len(runs))
    fig = Figure(figsize=(8, 0.34 * len(runs) + 2.4), layout="constrained")  # keeps the legend in the image
    ax = fig.add_subplot()
    for offset, ctx, color, label in ((-0.2, "hpm/batch", "tab:red", "HPM, batch context"),
                                      (0.2, "hpm/image", "tab:blue", "HPM, per image (a control: its head)")):
        values = [row(r["results"], ctx) for r in runs]
        ax.barh([y + offset for y, v in zip(ys, values) if v is not None],
                [100 * v.worst_case for v in values if v is not None], height=0.4, color=color, label=label)
        for y, v in zip(ys, values):
            if v is None:  # not applicable: no such row, which is not a worst case of 0%
                ax.text(1, y + offset, "n/a (no batch context)", va="center", fontsize=8, color="dimgray",
                        style="italic")
            else:
                ax.text(100 * v.worst_case + 0.5, y + offset, f"{100 * v.worst_case:.1f}%", va="center", fontsize=8,
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.3))  # legible over the base line
    base = 100 * row(runs[0]["results"], "base").worst_case
    ax.axvline(base, color="black", linestyle="--", label=f"base model ({base:.1f}%)")
    ax.set_yticks(list(ys), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("worst-case robust accuracy (%)")
    ax.set_ylabel("fine-tuning setting, or a control head")
    ax.set_title(f"MNIST miniature: HPM fine-tuning settings\n{note}", fontsize=9)
    fig.legend(fontsize=8, loc="outside lower center", ncol=3, frameon=False)  # below the axes: never over a bar
    fig.savefig(path, dpi=120)
    return fig


def main(args):
    t0 = time.time()
    mnist, out = Path(args.mnist_run).resolve(), Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    needed = ("train.npz", "heldout.npz", "cnn_fc_at.pt")
    if not all((mnist / f).is_file() for f in needed):
        print(f"[prepare] {mnist} lacks {', '.join(needed)}: running experiments.run_mnist there first")
        run_script(["-m", "experiments.run_mnist", "--out-dir", cli_path(mnist), "--device", args.device]
                + (["--quick"] if args.quick else []), out / "run_mnist.log")
    settings = QUICK_SETTINGS if args.quick else GRID + [FIRST_LANDING] + CONTROLS
    eval_args = EVAL["quick" if args.quick else "full"]
    runs = []
    for i, s in enumerate(settings, 1):
        tag = tag_of(name_of(s))
        head, res = out / f"head_{tag}.pt", out / f"results_{tag}.json"
        t1, seconds = time.time(), out / f"seconds_{tag}.txt"
        print(f"[{i}/{len(settings)}] {name_of(s)}")
        if not res.is_file():  # a rerun skips the settings already done (and keeps their time)
            run_script(["finetune.py", "--model", cli_path(mnist / "cnn_fc_at.pt"), "--dataset", "mnist",
                     "--data", cli_path(mnist / "train.npz"), "--out", cli_path(head), "--overwrite",
                     "--seed", str(args.seed), "--device", args.device, "--no-progress"]
                    + (["--steps", "2"] if args.quick else []) + flags_of(s), out / f"finetune_{tag}.log")
            run_script(["evaluate.py", "--head", cli_path(head), "--model", cli_path(mnist / "cnn_fc_at.pt"),
                     "--data", cli_path(mnist / "heldout.npz"),
                     "--out", cli_path(res), "--overwrite", "--seed", str(args.seed), "--device",
                     args.device, "--no-progress"] + eval_args, out / f"evaluate_{tag}.log")
            seconds.write_text(f"{time.time() - t1:.1f}\n")
        runs.append({"name": name_of(s), "setting": s, "results": Results.read(res),
                     "seconds": float(seconds.read_text()) if seconds.is_file() else None})
    md = table(runs)
    note = (f"evaluate.py version strong, {eval_args[1]} held-out images, {eval_args[3]} APGD steps, "
            f"{eval_args[5]} Square queries")
    plot(runs, out / "study.png", note)
    minutes = (time.time() - t0) / 60
    known = [r["seconds"] for r in runs if r["seconds"] is not None]
    compute = f"{sum(known) / 60:.1f} min of fine-tuning and evaluation over {len(known)} settings"
    if len(known) < len(runs):
        compute += f" ({len(runs) - len(known)} settings from an earlier run, time not recorded)"
    base = row(runs[0]["results"], "base").worst_case

    def best_of(r):
        return max(row(r["results"], c).worst_case for c in ("hpm/batch", "hpm/image")
                   if row(r["results"], c) is not None)

    best = max(runs, key=best_of)
    best_wc = best_of(best)
    verdict = (f"No setting beat the base model ({100 * base:.1f}%): the best worst case is "
               f"{100 * best_wc:.1f}% ({best['name']}{', a tie' if best_wc == base else ''})."
               if best_wc <= base else
               f"Best setting {best['name']}: {100 * best_wc:.1f}% vs base {100 * base:.1f}% "
               f"({100 * (best_wc - base):+.1f} points).")
    text = (f"# Fine-tuning study, MNIST miniature\n\nCommand: `{args.command}` ({compute}; "
            f"machine: {machine()}).\n\nEvaluation: {note}; worst case (%) over every "
            f"attack, same images, batches and seeds for every row.\n\n{md}\n\n{verdict}\n")
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps(
        {"eval_args": eval_args, "minutes_this_invocation": minutes, "compute": compute, "verdict": verdict,
         "runs": [{k: r[k] for k in ("name", "setting", "seconds")} | {
             key: {n: getattr(row(r["results"], n), key, None) for n in ("base", "hpm/batch", "hpm/image")}
             for key in ("worst_case", "clean")} for r in runs]}, indent=1))
    print("\n" + md + "\n\n" + verdict + f"\n\nstudy: {out / 'study.md'}, {out / 'study.png'} ({minutes:.1f} min)")
    return runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the reduced study of the test suite: two "
                   "settings, a few images, very few steps")
    p.add_argument("--mnist-run", default="runs/mnist",
                   help="experiments.run_mnist's output folder to reuse (default runs/mnist)")
    p.add_argument("--out-dir", default="runs/study", help="where the study is written (default runs/study)")
    p.add_argument("--seed", type=int, default=0, help="seed of every fine-tuning and evaluation (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return parse_with_command(p, "experiments.run_study", argv)


if __name__ == "__main__":
    main(parse_args())
