"""Gradient-masking checks (Carlini et al. 2019; Athalye et al. 2018; Adv-DPNP section 4.5),
each a small function returning {"status": "pass" | "flag" | "n/a", "detail": ..., numbers}:
accuracy must fall as eps grows and reach ~0 at a large eps; twice the steps must not lower it
much; Square (black-box) must not beat the gradient attacks; a transfer attack from a surrogate
beating the end-to-end attack means obfuscated gradients (expected for HPM: why MSA exists)."""
import math

from hpmkit.chunks import batch_loader, chunk_sizes, make_batches
from hpmkit.jobs import row_store, run_job
from hpmkit.loading import WarningCounter


def sweep_eps(norm, eps, dim):
    """eps x 0.25, 0.5, 1, 2, 4 up to a budget where any honest classifier can be fooled, and
    that budget: L-inf 0.5 (every image can become mid-grey), L2 0.5 sqrt(dim) (the same)."""
    large = 0.5 if norm == "Linf" else 0.5 * math.sqrt(dim)
    return sorted({m * eps for m in (0.25, 0.5, 1, 2, 4) if m * eps < large} | {large})


def check_eps_sweep(attack, accs, sweep, n, tol_n):
    """Accuracy must fall as eps grows and reach ~0 at the largest eps of the sweep."""
    rises = [e for e, a, b in zip(sweep[1:], accs, accs[1:]) if b > a + tol_n]
    ok = not rises and accs[-1] <= tol_n
    return {
        "attack": attack, "eps": sweep, "accuracy": accs, "n": n, "status": "pass" if ok else "flag",
        "detail": (f"{attack} at eps " + " ".join(f"{e:.4g}" for e in sweep) + ": "
                   + " ".join(f"{100 * a:.1f}" for a in accs) + "%"
                   + (f"; accuracy rises at eps {rises[0]:.4g}" if rises else "")
                   + ("" if accs[-1] <= tol_n else
                      f"; not ~0 at eps {sweep[-1]:.4g}, where an honest classifier is fooled: "
                      "the gradients do not lead the attack")),
    }


def check_doubled_steps(attack, a1, a2, steps, n, tol_n):
    """Twice the steps must not lower the accuracy by more than the tolerance."""
    ok = a2 >= a1 - tol_n
    return {
        "attack": attack, "steps": [steps, 2 * steps], "accuracy": [a1, a2], "n": n,
        "status": "pass" if ok else "flag",
        "detail": (f"{attack} {steps} steps {a1:.1%}, {2 * steps} steps {a2:.1%}"
                   + ("" if ok else "; the attack has not converged: use more --steps")),
    }


def check_square_vs_gradient(store, tol):
    """A black-box attack must not beat the best gradient attack (whole subset)."""
    grads = {k: v for k, v in store["attacks"].items() if k != "square"}
    if "square" not in store["attacks"] or not grads:
        return {"status": "n/a", "detail": "needs square and a gradient attack"}
    best, sq = min(grads, key=grads.get), store["attacks"]["square"]
    only_square = sum(1 for i, c in enumerate(store["correct"]["square"])
                      if not c and all(store["correct"][k][i] for k in grads))
    ok = sq >= grads[best] - tol
    return {
        "square": sq, "best_gradient": grads[best], "best_gradient_attack": best,
        "images_only_square_breaks": only_square, "status": "pass" if ok else "flag",
        "detail": (f"square {sq:.1%} vs best gradient attack {grads[best]:.1%} ({best}), whole "
                   f"subset; {only_square} images only Square breaks"
                   + ("" if ok else "; a black-box attack beats the gradients: masking")),
    }


def check_transfer_vs_end_to_end(store, tol):
    """A transfer attack from a surrogate beating the end-to-end (/ste) attack: obfuscated gradients."""
    grads = {k: v for k, v in store["attacks"].items() if k != "square"}
    transfer = {k: v for k, v in grads.items() if not k.endswith("/ste")}
    end2end = {k: v for k, v in grads.items() if k.endswith("/ste")}
    if not (transfer and end2end):
        return {"status": "n/a", "detail": "needs an /ste attack and an fc/soft/mix one"}
    bt, be = min(transfer, key=transfer.get), min(end2end, key=end2end.get)
    ok = transfer[bt] >= end2end[be] - tol
    return {
        "best_transfer": transfer[bt], "best_transfer_attack": bt,
        "best_end_to_end": end2end[be], "best_end_to_end_attack": be,
        "status": "pass" if ok else "flag",
        "detail": (("" if ok else "(expected for HPM: obfuscated gradients; this is why "
                    "MSA exists) ") + f"best transfer {transfer[bt]:.1%} ({bt}) vs best "
                   f"end-to-end {end2end[be]:.1%} ({be}), whole subset"),
    }


def gradient_masking_checks(row_name, runs, store, *, eps, sweep, steps, n, tol):
    """The four checks as {name: {"status": "pass" | "flag" | "n/a", "detail": str, numbers...}}.

    runs: accuracies of the check attacks on the first n images, keyed by check_key();
    store: the row's main results (whole subset); sweep: the eps values of the sweep.
    tol: the accuracy difference tolerated; on the n check images, never less than one image.
    """
    attack = check_attack(row_name)
    tol_n = max(tol, 1 / n)
    out = {
        "eps_sweep": check_eps_sweep(attack, [runs[check_key(attack, e, steps)] for e in sweep],
                                     sweep, n, tol_n),
        "doubled_steps": check_doubled_steps(attack, runs[check_key(attack, eps, steps)],
                                             runs[check_key(attack, eps, 2 * steps)], steps, n, tol_n),
        "square_vs_gradient": check_square_vs_gradient(store, tol),
    }
    if row_name != "base":
        out["transfer_vs_end_to_end"] = check_transfer_vs_end_to_end(store, tol)
    return out


def check_attack(row_name):
    """The attack of the eps sweep and the doubled steps: the strongest single gradient attack."""
    return "apgd-ce" if row_name == "base" else "apgd-ce/mix"


def check_key(attack, eps, steps):
    return f"{attack} eps={eps:.6g} steps={steps}"


def run_checks(rows, x, y, results, attack_chunk, *, norm, eps, steps, queries, batch_size, seed,
               checks_n, tol, fit, on_update=None, device="cpu", progress=True, score_queries=False,
               restarts=1, chunk=None, ranks=None):
    """--checks: the eps sweep and doubled steps on the first `checks_n` images of the subset
    (cut into the same fixed batches), attacked by attack_chunk (evaluate.py's); the other two
    checks from the main results. fit: the evaluation's gpu.MemoryFit."""
    n = min(checks_n, len(y))
    batches = make_batches(n, batch_size)
    batch = batch_loader(x[:n], y[:n], batches, device)
    sweep = sorted(set(sweep_eps(norm, eps, x[0].numel())) | {eps})
    for row in rows:
        checks = row_store(results, row.name).setdefault("checks", {})
        runs = checks.get("runs")
        if runs is None or runs["n"] != n:  # first time, or another --checks-n: start again
            runs = checks["runs"] = {"n": n, "accuracy": {}, "correct": {}, "batches_done": {},
                                     "timings_s": {}}
        attack = check_attack(row.name)
        for e, s in [(e, steps) for e in sweep] + [(eps, 2 * steps)]:
            key = check_key(attack, e, s)
            if key in runs["accuracy"]:
                continue
            job = fit(lambda first, end, e=e, s=s: attack_chunk(
                row, attack, *batch(first, end), chunk_sizes(batches, first, end), norm=norm, eps=e,
                steps=s, queries=queries, seed=seed, warnings=WarningCounter(),
                score_queries=score_queries, restarts=restarts), row.name, batches)
            correct = run_job(runs, key, batches, job, desc=f"{row.name} check {key}", chunk=chunk,
                              show_progress=progress, on_update=on_update, ranks=ranks,
                              key=f"{row.name}|check {key}")
            runs["accuracy"][key] = sum(correct) / n
        checks.update(gradient_masking_checks(row.name, runs["accuracy"], row_store(results, row.name),
                                              eps=eps, sweep=sweep, steps=steps, n=n, tol=tol))
        if on_update is not None:
            on_update()
    return results
