"""What a results file and the final report say: the notes on each version and attack, the
tables in the shape of the paper's Tables 1-2, the description of the run."""
import platform

import torch

from hpmkit.catalogue import BATCH_ADVERSARY, ORDER
from hpmkit.chunks import make_batches

VERSION_NOTES = {
    "paper": "the paper's protocol (APGD-CE and APGD-DLR on the four MSA surrogates, 40 steps, "
             "then Square); only final adversarial batches are scored",
    "strong": "the paper's attacks plus APGD-T (fc and mix surrogates) and the adaptive flip "
              "attack, 100 APGD steps, every query of a whole fixed batch scored on the real model, "
              "and in the batch context a Square that queries whole fixed batches only and the batch "
              "as the adversary's (joint, then target on every image left standing)",
}

NOTES = {
    "batch_apgd": (
        "hpm/batch: APGD runs AutoAttack's attack_single_run on whole batches, so the surrogate "
        "sees the full batch at every step; each image keeps its last surrogate-fooling iterate, "
        "else its highest-loss iterate; the whole adversarial batch is re-scored on the real model."),
    "batch_square": (
        "hpm/batch square: after its first query AutoAttack's Square queries only the images of a "
        "batch it has not yet fooled, a batch composition different from the one scored. The "
        "attack is weaker than it could be; the number stays honest because every final "
        "adversarial batch is re-scored whole."),
    "per_image": (
        "base and hpm/image are per-image models: end-to-end APGD and Square use AutoAttack's "
        "perturb (standard path; it attacks only the initially correct images, shrinking batches, "
        "which changes nothing for a per-image model); transfer attacks (fc/soft/mix) use "
        "attack_single_run on the whole batch."),
    "worst_case": (
        "worst_case: an image counts as robust only if it is correct clean and under every "
        "finished attack of its row; accuracies are fractions of the subset."),
    "nonfinite": "an image whose logits are not finite after an attack counts as misclassified.",
    "score_queries": (
        "every query: each query an attack makes with a whole fixed batch inside the threat model "
        "(every APGD iterate, every query of the fixed-batch Square, the first query of "
        "AutoAttack's Square) is an adversarial batch in its own right and is "
        "scored on the real model in the same context; an image counts as fooled by the attack if "
        "any scored query or its final batch fooled it. Queries of part of a batch, or with an "
        "image outside the eps-ball or [0, 1], are never scored."),
    "batch_square_fixed": (
        "hpm/batch square (version strong, L-inf): every query is the whole fixed batch; each "
        "still-correct image proposes its own square, all in one query, and keeps it if its own "
        "margin fell under that query (square_fixed_batch). A coordinate-wise search over a "
        "batch-dependent model: the batch an image accepted its proposal in differs from the "
        "next one by the other images' accepted proposals."),
    "flip": (
        "flip/mix (adaptive, HPM rows): targeted APGD on the FC oracle pushes every image toward "
        "its real runner-up class, flipping FC assignments to move the batch prototypes; then "
        "APGD-CE on the mixture starts from that batch. Both final batches are re-scored whole."),
    "batch_adversary": (
        "joint/* and target/* (batch context): the batch as the adversary's. joint: the whole batch "
        "ascends the summed CW margin losses of the images no scored batch has fooled yet, so that "
        "fooled images move on as helpers. target: for each image correct clean and under every "
        "earlier attack, a copy of its whole fixed batch ascends that one image's CW margin (all "
        "others helpers) until a scored batch fools it; cost (images standing) x steps x batch size. "
        "Every iterate is scored whole; an image counts as fooled by the attack only if a scored "
        "batch fooled it (for target, the kept batch is the clean one: each target had its own)."),
    "attackers": (
        "hpm/attackers-K (K of B): the attacker holds the last K slots of every fixed batch (DIA's "
        "convention; a short last batch keeps its first image benign) and moves them within its own "
        "eps around their natural images (1 under L-inf: any image); the other images are benign and "
        "exactly clean in every scored batch. own: the attacker's images (MSA on its slots alone); "
        "benign: the other images, which only the batch prototypes can change (spread: their summed "
        "clamped margins; victim: each standing image alone, a copy of its batch per victim; square: "
        "no gradients). Every query is a whole fixed batch scored on the real model."),
    "apgd_t": (
        "apgd-t: AutoAttack's targeted DLR attack, min(9, K - 1) target classes (the highest "
        "clean logits after the top one) with one run each; an image counts as fooled if any "
        "target's run fooled it. Batch context: each run perturbs the whole batch (targets from "
        "the surrogate's clean logits), and every run's final batch is re-scored whole."),
}


def square_note(setting):
    """The note on Square in the batch context: the fixed-batch Square (strong, L-inf) or the library's."""
    return NOTES["batch_square_fixed" if setting.square_on_whole_batches else "batch_square"]


TITLES = {"base": "base", "hpm/batch": "HPM (batch)", "hpm/image": "HPM (image)", "dpnp": "DPNP"}


def format_tables(results, rows):
    """The paper's Tables 1-2 shape (clean, worst case, difference to base), then every attack; then
    the rows of K attacker slots (own and benign, per attack)."""
    stores = {r.name: results.row(r.name) for r in rows if not r.attackers}
    base = stores.get("base")

    def diff(v, ref):
        return "" if v is None or ref is None else f"({100 * (v - ref):+.1f})"

    lines = [f"{'model':<13}{'clean':>8}{'':>8}{'robust':>8}{'':>8}  (worst case over all attacks)"]
    for name, s in stores.items():
        ref_c = base.clean if name != "base" else None
        ref_r = base.worst_case if name != "base" else None
        lines.append(f"{TITLES[name]:<13}{pct(s.clean):>8}{diff(s.clean, ref_c):>8}"
                     f"{pct(s.worst_case):>8}{diff(s.worst_case, ref_r):>8}")
    names = sorted({a for s in stores.values() for a in s.accuracies}, key=ORDER.index)
    lines += ["", f"{'accuracy (%)':<16}" + "".join(f"{TITLES[n]:>13}" for n in stores)]
    for a in ["clean"] + names + ["worst_case"]:
        cells = [s.accuracy(a) for s in stores.values()]
        lines.append(f"{a.replace('_', ' '):<16}" + "".join(f"{pct(c):>13}" for c in cells))
    slot_rows = [r for r in rows if r.attackers]
    if slot_rows:
        lines += ["", attackers_table(results, slot_rows)]
    return "\n".join(lines)


def pct(v):
    return "" if v is None else f"{100 * v:.1f}"


def attackers_table(results, rows):
    """K of B: the attacker's own images and the benign ones, accuracy (%) clean, under each attack
    and in the worst case."""
    B = results.subset["batch_size"]
    head = "".join(f"{f'{r.attackers} of {B}: own':>16}{'benign':>9}" for r in rows)
    lines = [f"attacker slots (eps {rows[0].attacker_eps:.4g}; the last K of each fixed batch)",
             f"{'accuracy (%)':<22}" + head]
    stores = [results.row(r.name) for r in rows]
    names = sorted({a for s in stores for a in s.accuracies}, key=ORDER.index)
    for a in ["clean"] + names + ["worst_case"]:
        lines.append(f"{a.replace('_', ' '):<22}" + "".join(f"{pct(s.by_role(a, 'own')):>16}{pct(s.by_role(a, 'benign')):>9}"
                                                       for s in stores))
    return "\n".join(lines)


def versions():
    from importlib import metadata

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "pyautoattack", "robustbench"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


def version_line(cfg, default):
    """What this run's version does: its notes when it runs the version's defaults (default:
    evaluate.VERSIONS[version]), else what the flags made of it."""
    if list(cfg["attacks"]) == list(default["attacks"]) and cfg["steps"] == default["steps"]:
        return f"version {cfg['version']}: {VERSION_NOTES[cfg['version']]}"
    return (f"version {cfg['version']}, changed by --attacks/--steps: {', '.join(cfg['attacks'])}; "
            f"{cfg['steps']} APGD steps; " + ("every query of a whole fixed batch scored on the real model"
                                             if cfg["score_queries"] else "final adversarial batches scored"))


def describe(results, cfg, setting, rows, idx, n_total, banner):
    """The parts of the results file that say what was run, on what, with which software."""
    subset = {"n": len(idx), "of": n_total, "subset_seed": cfg["subset_seed"], "batch_size": cfg["batch_size"],
              "n_batches": len(make_batches(len(idx), cfg["batch_size"])), "indices": idx.tolist()}
    notes = ([banner]
             + [NOTES["worst_case"], NOTES["per_image"], NOTES["nonfinite"]]
             + ([NOTES["batch_apgd"], square_note(setting)] if "hpm/batch" in [r.name for r in rows] else [])
             + ([NOTES["score_queries"]] if cfg["score_queries"] else [])
             + ([NOTES["apgd_t"]] if any(a.startswith("apgd-t") for a in cfg["attacks"]) else [])
             + ([NOTES["flip"]] if "flip/mix" in cfg["attacks"] else [])
             + ([NOTES["batch_adversary"]] if set(cfg["attacks"]) & set(BATCH_ADVERSARY) else [])
             + ([NOTES["attackers"]] if cfg.get("attackers") else []))
    results.describe(
        "evaluate.py: clean and robust accuracy (fractions) of the base model and HPM on one fixed "
        "subset, same batches, same attacks",
        {k: str(v) if k == "device" else v for k, v in sorted(cfg.items())}, versions(), subset,
        cfg["version"], notes)


def print_header(banner, cfg, rows, n, n_total, device):
    """What the run is about to do, before the first attack."""
    print(banner)
    print(f"{cfg['model']} on {cfg['dataset']}: {n} of {n_total} test images (subset seed "
          f"{cfg['subset_seed']}), batches of {cfg['batch_size']}, {cfg['threat_model']} eps {cfg['eps']:.5g}, "
          f"{cfg['steps']} APGD steps, {cfg['queries']} Square queries, device {device}")
    if "hpm/batch" in [r.name for r in rows]:
        print("note: " + NOTES["batch_apgd"])


def print_report(results, rows, cfg, setting):
    """The final tables, the checks and where the results are."""
    print()
    print(format_tables(results, rows))
    if cfg["checks"]:
        n = min(cfg["checks_n"], results.subset["n"])
        print(f"\ngradient-masking checks (first {n} images of the subset; tolerance "
              f"{cfg['checks_tol']:.1%}):")
        for r in rows:
            for name, c in results.row(r.name).checks.items():
                if name != "runs":
                    print(f"  {r.name:<10} {name:<23} {c['status']:<5} {c['detail']}")
    if "hpm/batch" in [r.name for r in rows]:
        print("\nnote: " + square_note(setting))
    print(f"\nresults: {cfg['out']}")
