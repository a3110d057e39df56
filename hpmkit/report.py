"""What a results file and the final report say: the notes on each version and attack, the
tables in the shape of the paper's Tables 1-2, the description of the run."""
import os
import platform
import re
import stat
from dataclasses import asdict
from textwrap import fill

import torch

from hpmkit.catalogue import BATCH_ADVERSARY, CATALOGUE, ORDER, Setting
from hpmkit.chunks import make_batches
from hpmkit.cli import CLIError
from hpmkit.files import atomic_write, kind_of

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
        "margin fell under that query (batch_attacks.square_search). A coordinate-wise search over a "
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
# What an attack name's suffix means: the model whose gradients it follows (the MSA surrogates, paper 3.7).
SURROGATES = {"fc": "the FC oracle", "soft": "the soft-hybrid model", "ste": "the real model (STE gradients)",
              "mix": "the mixture of fc, soft and ste (their mean log-softmax)",
              "fixed": "the model with its clean batch prototypes fixed"}


def surrogate_legend(names):
    """The line that says what the suffixes of these attack names mean ("" where none has one)."""
    used = [k for k in SURROGATES if any(n.endswith("/" + k) for n in names)]
    return ("attack/surrogate, the model the attack's gradients come from: "
            + "; ".join(f"{k} {SURROGATES[k]}" for k in used)) if used else ""


def budgets(rows, cfg, attacked):
    """The attack budgets of these rows, in words: the threat model's eps where a row without
    attacker slots ran an attack (attacked), the attacker slots' own eps where there are any."""
    slots = [r for r in rows if r.attackers]
    said = [f"{cfg.threat_model} eps {cfg.eps:.4g}"] if attacked or not slots else []
    if slots:
        E = slots[0].attacker_eps
        said.append(f"attacker slots {cfg.threat_model} eps {E:.4g}"
                    + (" (any image)" if cfg.threat_model == "Linf" and E >= 1 else ""))
    return ", ".join(said)
NO_ATTACK = "no attack"  # a row's robust accuracy when it ran none: its clean accuracy would mean nothing


def pct(v, digits=1):
    """An accuracy (a fraction) in percent; "n/a" where the row has none (an attack it does not run)."""
    return "n/a" if v is None else f"{100 * v:.{digits}f}"


def tables(results, rows, digits=1):
    """The final report's tables [(title, header, body rows of cells)], in percent with `digits`
    decimals: the paper's Tables 1-2 shape (clean, worst case, difference to base), every attack's
    accuracy (where any row ran one), then the rows of K attacker slots (attackers_table)."""
    stores = {r.name: results.row(r.name) for r in rows if not r.attackers}
    base = stores.get("base")

    def diff(v, ref, shown=True):
        return f"{100 * (v - ref):+.{digits}f}" if shown and None not in (v, ref) else ""

    def robust(s):
        return pct(s.worst_case, digits) if s.accuracies else NO_ATTACK

    summary = [[TITLES[name], pct(s.clean, digits), diff(s.clean, base and base.clean, name != "base"), robust(s),
                diff(s.worst_case, base and base.worst_case, name != "base" and bool(s.accuracies)
                     and bool(base and base.accuracies))]  # (a worst case without attacks compares nothing)
               for name, s in stores.items()]
    out = [("accuracy (%); robust: the worst case over all attacks",
            ["model", "clean", "vs base", "robust", "vs base"], summary)]
    names = sorted({a for s in stores.values() for a in s.accuracies}, key=ORDER.index)
    if names:  # (rows that ran no attack, K of B's runs: only the clean line above, and "no attack")
        body = [[a] + [pct(s.accuracy(a), digits) for s in stores.values()] for a in ["clean"] + names]
        body.append(["worst case"] + [robust(s) for s in stores.values()])
        out.append(("every attack, accuracy (%)", ["attack"] + [TITLES[n] for n in stores], body))
    slot_rows = [r for r in rows if r.attackers]
    if slot_rows:
        out.append(attackers_table(results, slot_rows, digits))
    return out


def attackers_table(results, rows, digits=1):
    """K of B: the attacker's own images and the benign ones, accuracy (%) clean, under each attack
    and in the worst case."""
    B, stores = results.subset["batch_size"], [results.row(r.name) for r in rows]
    names = sorted({a for s in stores for a in s.accuracies}, key=ORDER.index)
    body = [[a] + [pct(s.by_role(a, role), digits) for s in stores for role in ("own", "benign")]
            for a in ["clean"] + names]
    body.append(["worst case"] + [pct(s.by_role("worst_case", role), digits) if s.accuracies else NO_ATTACK
                                  for s in stores for role in ("own", "benign")])
    header = ["attack"] + [h for r in rows for h in (f"{r.attackers} of {B}: own", "benign")]
    return (f"attacker slots, accuracy (%) (eps {rows[0].attacker_eps:.4g}; the last K of each fixed batch)",
            header, body)


def checks_table(results, rows, cfg):
    """The gradient-masking checks of every row, as a table (None: no checks ran)."""
    if not cfg.checks:  # (RowResults.checks would add an empty entry to the results)
        return None
    body = [[r.name, name, c["status"], c["detail"]] for r in rows
            for name, c in results.row(r.name).checks.items() if name != "runs"]
    title = (f"gradient-masking checks (first {min(cfg.checks_n, results.subset['n'])} images of the subset; "
             f"tolerance {cfg.checks_tol:.1%})")
    return (title, ["row", "check", "status", "detail"], body) if body else None


def text_table(title, header, body):
    """A table as fixed-width text: the first column left, the others right-aligned."""
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    lines = [title] + ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                                 enumerate(zip(row, widths))).rstrip() for row in [header] + body]
    return "\n".join(lines)


def markdown_table(title, header, body):
    """A table in Markdown; columns of numbers right-aligned."""
    numbers = [i > 0 and all(re.fullmatch(r"[+-]?[\d.]*|n/a|no attack", str(r[i])) for r in body)
               for i in range(len(header))]
    rule = "|" + "|".join("---:" if right else "---" for right in numbers) + "|"
    return "\n".join([f"**{title}**", "", "| " + " | ".join(header) + " |", rule]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in body])


def versions():
    from importlib import metadata

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "pyautoattack", "robustbench"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


def version_line(cfg, default, rows):
    """What this run does, as lines: its version's notes (default: evaluate.VERSIONS[version]), or the
    flags that changed it and how; then the attacks each row runs (rows: evaluate's rows)."""
    version, hpm = cfg.version, [a for a in cfg.attacks if CATALOGUE[a].runs_on != "attackers"]
    extra = [a for a in hpm if a not in default["attacks"]]
    changes = {"--attacks": f"{len(set(hpm) & set(default['attacks']))} of the version's {len(default['attacks'])} "
                            "attacks" + (f" and {', '.join(extra)}" if extra else ""),
               "--steps": f"{cfg.steps} APGD steps, the version's {default['steps']}",
               "--queries": f"{cfg.queries} Square queries, the version's {Setting.queries}",
               "--restarts": f"{cfg.restarts} APGD restarts, the version's {Setting.restarts}"}
    changed = {"--attacks": set(hpm) != set(default["attacks"]), "--steps": cfg.steps != default["steps"],
               "--queries": cfg.queries != Setting.queries, "--restarts": cfg.restarts != Setting.restarts}
    flags = [f for f in changes if changed[f]]
    if flags:
        scored = ("every query of a whole fixed batch scored on the real model" if cfg.score_queries
                  else "final adversarial batches scored")
        line = f"version {version}, changed by {', '.join(flags)}: {'; '.join(changes[f] for f in flags)}; {scored}"
    else:
        line = f"version {version}: {VERSION_NOTES[version]}"
    width = max(len(r.name) for r in rows)
    return [line] + [f"  {r.name:<{width}}  " + (", ".join(a.name for a in r.attacks(cfg.attacks)) or "no attack")
                     for r in rows]


def describe(results, cfg, setting, rows, idx, n_total, banner):
    """The parts of the results file that say what was run, on what, with which software (banner:
    version_line's lines, the first notes)."""
    subset = {"n": len(idx), "of": n_total, "subset_seed": cfg.subset_seed, "batch_size": cfg.batch_size,
              "n_batches": len(make_batches(len(idx), cfg.batch_size)), "indices": idx.tolist()}
    notes = (list(banner)
             + [NOTES["worst_case"], NOTES["per_image"], NOTES["nonfinite"]]
             + ([NOTES["batch_apgd"], square_note(setting)] if "hpm/batch" in [r.name for r in rows] else [])
             + ([NOTES["score_queries"]] if cfg.score_queries else [])
             + ([NOTES["apgd_t"]] if any(a.startswith("apgd-t") for a in cfg.attacks) else [])
             + ([NOTES["flip"]] if "flip/mix" in cfg.attacks else [])
             + ([NOTES["batch_adversary"]] if set(cfg.attacks) & set(BATCH_ADVERSARY) else [])
             + ([NOTES["attackers"]] if cfg.attackers else []))
    results.describe(
        "evaluate.py: clean and robust accuracy (fractions) of the base model and HPM on one fixed "
        "subset, same batches, same attacks",
        {k: str(v) if k == "device" else v for k, v in sorted(asdict(cfg).items())}, versions(), subset,
        cfg.version, notes)


def print_header(banner, cfg, rows, n, n_total, device):
    """What the run is about to do, before the first attack (banner: version_line's lines)."""
    print("\n".join(banner))
    print(f"{cfg.model} on {cfg.dataset}: {n} of {n_total} test images (subset seed "
          f"{cfg.subset_seed}), batches of {cfg.batch_size}, {cfg.threat_model} eps {cfg.eps:.5g}, "
          f"{cfg.steps} APGD steps, {cfg.queries} Square queries, device {device}")
    if "hpm/batch" in [r.name for r in rows]:
        print("note: " + NOTES["batch_apgd"])


def print_report(results, rows, cfg, setting):
    """The final tables, the checks and where the results are."""
    print()
    print("\n\n".join(text_table(*t) for t in tables(results, rows)))
    checks = checks_table(results, rows, cfg)
    if checks is not None:
        print(f"\n{checks[0]}:")
        for row, name, status, detail in checks[2]:
            print(f"  {row:<10} {name:<23} {status:<5} {detail}")
    if "hpm/batch" in [r.name for r in rows] and results.row("hpm/batch").finished("square"):
        print("\nnote: " + square_note(setting))
    if cfg.out:
        print(f"\nresults: {cfg.out} (the tables: {beside_free(cfg.out, '.md')}; the plot: "
              f"{beside_free(cfg.out, '.png')})")


# What a run writes beside its results: OUT.md and OUT.png (OUT: --out without .json) ---------------

MD_MARKER = "<!-- written by evaluate.py beside {}: evaluate.py replaces this file, never one without this line -->"


def beside(out, ext):
    """The file beside the results file `out`: OUT.md or OUT.png, OUT its name without .json."""
    return (out[:-len(".json")] if out.endswith(".json") else out) + ext


def png_marker(out):
    """The .png's metadata (PNG tEXt chunks, Latin-1: a name escaped to ASCII) that say evaluate.py
    wrote it beside `out`."""
    return {"Software": "evaluate.py", "Source": os.path.basename(out).encode("ascii", "backslashreplace").decode()}


def is_ours(path, out):
    """The file at `path` is the .md or .png evaluate.py wrote beside the results file `out`."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)  # (the .md's first line; the .png's text chunks come before its pixels)
    if path.endswith(".md"):
        return head.split(b"\n")[0] == MD_MARKER.format(os.path.basename(out)).encode()
    return head.startswith(b"\x89PNG\r\n\x1a\n") and all(
        f"{k}\0{v}".encode() in head for k, v in png_marker(out).items())


def check_beside(out):
    """OUT.md and OUT.png before any work: each absent, or a writable file evaluate.py wrote beside
    this results file (is_ours); a run never replaces a file it did not write."""
    for path, what in ((beside(out, ".md"), "table"), (beside(out, ".png"), "plot")):
        if not os.path.exists(path):
            continue
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise CLIError(f"{path}, where evaluate.py writes the {what} of --out {out}, is {kind_of(mode)}; "
                           "move it away or choose another --out")
        if not is_ours(path, out):
            raise CLIError(f"{path} exists and is not the {what} evaluate.py writes beside {out}: it is never "
                           "replaced; move it away or choose another --out")
        if not mode & 0o222:
            raise CLIError(f"{path} is read-only; it is never replaced: make it writable (chmod u+w) or choose "
                           "another --out")


def markdown(results, rows, cfg):
    """OUT.md: the final report's tables in Markdown (percent, two decimals), under a marker line."""
    sub = results.subset
    lines = [MD_MARKER.format(os.path.basename(cfg.out)), "",
             f"# {cfg.model} on {cfg.dataset}: evaluate.py, version {cfg.version}", "",
             f"{sub['n']} of {sub['of']} test images (subset seed {sub['subset_seed']}), fixed batches of "
             f"{sub['batch_size']}, {cfg.threat_model} eps {cfg.eps:.5g}, {cfg.steps} APGD steps, "
             f"{cfg.queries} Square queries. Accuracy in percent of the subset; "
             f"{os.path.basename(cfg.out)} holds every number as a fraction, and per image.", ""]
    names = {a for r in rows for a in results.row(r.name).accuracies}
    if surrogate_legend(names):
        lines += [surrogate_legend(names) + ".", ""]
    for t in tables(results, rows, digits=2) + [checks_table(results, rows, cfg)]:
        if t is not None:
            title, header, body = t
            lines += [markdown_table(title, header, [[str(c).replace("|", "\\|") for c in r] for r in body]), ""]
    return "\n".join(lines)


def plot(results, rows, cfg, path):
    """OUT.png: every row's accuracy (%) clean, per attack and worst case, as grouped bars (attacker
    rows' own and benign apart); "n/a" and "no attack" are written where the bar would be."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # (no pyplot: no global state)
    from matplotlib.figure import Figure

    series = [(TITLES[r.name], results.row(r.name).accuracy, bool(results.row(r.name).accuracies))
              for r in rows if not r.attackers]
    series += [(f"{r.name} {role}", lambda a, s=results.row(r.name), role=role: s.by_role(a, role),
                bool(results.row(r.name).accuracies)) for r in rows if r.attackers for role in ("own", "benign")]
    names = sorted({a for r in rows for a in results.row(r.name).accuracies}, key=ORDER.index)
    cats, m = ["clean"] + names + ["worst_case"], len(series)
    fig = Figure(figsize=(8, 1.5 + len(cats) * (0.15 * m + 0.15)))
    FigureCanvasAgg(fig)
    ax, h = fig.add_subplot(), 0.8 / m
    for j, (label, accuracy, attacked) in enumerate(series):
        color = f"C{j % 10}"
        for i, a in enumerate(cats):
            y, v = i + (j - (m - 1) / 2) * h, accuracy(a)
            if a == "worst_case" and not attacked:
                v = None
            if v is None:
                ax.text(1, y, NO_ATTACK if a == "worst_case" else "n/a", va="center", fontsize=7, color="0.4",
                        style="italic")
                continue
            ax.barh(y, 100 * v, height=h, color=color, label=label if i == 0 else None)
            ax.text(100 * v + 1, y, f"{100 * v:.1f}", va="center", fontsize=7)  # (0% shows as 0.0, unlike n/a)
    ax.set_yticks(range(len(cats)), [a.replace("_", " ") for a in cats])
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xticks(range(0, 101, 20))
    legend = surrogate_legend(names)  # (the bars' suffixes, /fc /soft /ste /mix, explained under the axis)
    ax.set_xlabel("accuracy (%)" + ("\n" + fill(legend, 100) if legend else ""), fontsize=8 if legend else None)
    ax.set_ylabel("attack")
    attacked = any(results.row(r.name).accuracies for r in rows if not r.attackers)
    ax.set_title(f"{os.path.basename(str(cfg.model))} on {cfg.dataset}, {budgets(rows, cfg, attacked)}: "
                 "accuracy per attack", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight",
                                             metadata=png_marker(cfg.out)))


def replaceable(path, out):
    """evaluate.py may write `path` beside the results file `out`: absent, or a writable regular file
    it wrote there (its marker)."""
    if not os.path.exists(path):
        return True
    mode = os.stat(path).st_mode
    return stat.S_ISREG(mode) and bool(mode & 0o222) and is_ours(path, out)


def beside_free(out, ext):
    """Where evaluate.py writes OUT.md (ext ".md") or OUT.png: there while it may (replaceable), else
    the first of OUT-1.md, OUT-2.md, ... that it may: a file a user put there during the run stays."""
    path, n = beside(out, ext), 0
    while not replaceable(path, out):
        n += 1
        path = beside(out, f"-{n}{ext}")
    return path


def write_beside(results, rows, cfg):
    """OUT.md and OUT.png beside cfg.out, each written atomically; a file not ours that appeared there
    during the run is kept, and ours goes beside it (beside_free), said in one line."""
    out = cfg.out
    md, png = beside_free(out, ".md"), beside_free(out, ".png")
    moved = [f"{beside(out, ext)} -> {path}" for ext, path in ((".md", md), (".png", png)) if path != beside(out, ext)]
    if moved:
        print(f"note: a file not evaluate.py's appeared during the run where it writes beside {out}; it is kept, "
              f"and this run's went beside it: {'; '.join(moved)}")
    text = markdown(results, rows, cfg)
    atomic_write(md, lambda f: f.write(text.encode()))
    plot(results, rows, cfg, png)
