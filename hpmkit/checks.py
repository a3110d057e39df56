"""Gradient-masking checks (Carlini et al. 2019; Athalye et al. 2018; Adv-DPNP section 4.5),
each a small function returning {"status": "pass" | "flag" | "n/a", "detail": ..., numbers}:
accuracy must fall as eps grows and reach ~0 at a large eps; twice the steps must not lower it
much; Square (black-box) must not beat the gradient attacks; a transfer attack from a surrogate
beating the end-to-end attack means obfuscated gradients (expected for HPM: why MSA exists)."""
import math
from dataclasses import dataclass, replace

import torch

from hpmkit.catalogue import CATALOGUE
from hpmkit.chunks import FixedBatches


def sweep_eps(norm, eps, dim):
    """eps x 0.25, 0.5, 1, 2, 4 up to a budget where any honest classifier can be fooled, and
    that budget: L-inf 0.5 (every image can become mid-grey), L2 0.5 sqrt(dim) (the same)."""
    large = 0.5 if norm == "Linf" else 0.5 * math.sqrt(dim)
    return sorted({m * eps for m in (0.25, 0.5, 1, 2, 4) if m * eps < large} | {large})


def check_eps_sweep(attack, accs, sweep, n, tol_n):
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
    ok = a2 >= a1 - tol_n
    return {
        "attack": attack, "steps": [steps, 2 * steps], "accuracy": [a1, a2], "n": n,
        "status": "pass" if ok else "flag",
        "detail": (f"{attack} {steps} steps {a1:.1%}, {2 * steps} steps {a2:.1%}"
                   + ("" if ok else "; the attack has not converged: use more --steps")),
    }


def check_square_vs_gradient(rr, tol):
    """rr: the row's results.RowResults (whole subset)."""
    accuracies = rr.accuracies
    grads = {k: v for k, v in accuracies.items() if k != "square"}
    if "square" not in accuracies or not grads:
        return {"status": "n/a", "detail": "needs square and a gradient attack"}
    best, sq = min(grads, key=grads.get), accuracies["square"]
    only_square = sum(1 for i, c in enumerate(rr.correct("square"))
                      if not c and all(rr.correct(k)[i] for k in grads))
    ok = sq >= grads[best] - tol
    return {
        "square": sq, "best_gradient": grads[best], "best_gradient_attack": best,
        "images_only_square_breaks": only_square, "status": "pass" if ok else "flag",
        "detail": (f"square {sq:.1%} vs best gradient attack {grads[best]:.1%} ({best}), whole "
                   f"subset; {only_square} images only Square breaks"
                   + ("" if ok else "; a black-box attack beats the gradients: masking")),
    }


def check_transfer_vs_end_to_end(rr, tol):
    grads = {k: v for k, v in rr.accuracies.items() if k != "square"}
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


def check_attack(row_name):
    """The attack of the eps sweep and the doubled steps: the strongest single gradient attack."""
    return "apgd-ce" if row_name == "base" else "apgd-ce/mix"


def check_key(attack, eps, steps):
    return f"{attack} eps={eps:.6g} steps={steps}"


@dataclass(frozen=True)
class Checks:
    """--checks: on the first n images of the subset, accuracy differences of tol tolerated; the
    context sensitivity over `orders` random orders of the whole subset."""
    n: int = 512
    tol: float = 0.02
    orders: int = 5


@torch.no_grad()
def predictions(row, data):
    """The real model's clean predictions (N,) on the fixed batches of data, each batch whole."""
    real = row.real()
    return torch.cat([real(data.chunk(i, i + 1).x).argmax(1).cpu() for i in range(len(data.batches))])


def context_sensitivity(row, data, orders, seed=0):
    """The clean images (N,) bool whose prediction changes when the subset's fixed batches are
    formed again in `orders` random orders (seeded): a per-image model changes none; HPM's batch
    context changes those whose label depends on who else is in the batch."""
    first = predictions(row, data)
    changed = torch.zeros(len(data), dtype=torch.bool)
    g = torch.Generator().manual_seed(seed)
    for _ in range(orders):
        perm = torch.randperm(len(data), generator=g)
        again = predictions(row, FixedBatches(data.x[perm], data.y[perm], data.batch_size, data.device))
        changed[perm] |= again != first[perm]
    return changed


@dataclass(frozen=True)
class CheckRun:
    """One check attack: its key in the row's check runs, the attack (a catalogue record), and the
    main setting with another eps or twice the steps."""
    key: str
    attack: object
    setting: object


def check_eps(setting, data):
    """The eps values of the sweep (the main eps among them), for images like data's."""
    return sorted(set(sweep_eps(setting.norm, setting.eps, data.x[0].numel())) | {setting.eps})


def check_runs(row_name, setting, sweep):
    """What --checks attacks on a row, on the first n images (evaluate.py's loop runs them): the
    strongest single gradient attack at every eps of the sweep, and at the main eps with twice the
    steps."""
    attack = CATALOGUE[check_attack(row_name)]
    settings = [replace(setting, eps=e) for e in sweep] + [replace(setting, steps=2 * setting.steps)]
    return [CheckRun(check_key(attack.name, s.eps, s.steps), attack, s) for s in settings]


def judge(row, rr, data, setting, sweep, checks):
    """The checks of a row (evaluate.py's ModelUnderTest) into its results rr (results.RowResults):
    the eps sweep and doubled steps from its check runs on the first n images (differences of
    checks.tol tolerated, never less than one image), Square and transfer from its main results
    (whole subset), the context sensitivity from the clean fixed batches `data`."""
    runs, attack, tol = rr.check_accuracies(), check_attack(row.name), checks.tol
    eps, steps, n = setting.eps, setting.steps, min(checks.n, len(data))
    tol_n = max(tol, 1 / n)
    rr.checks.update(
        eps_sweep=check_eps_sweep(attack, [runs[check_key(attack, e, steps)] for e in sweep], sweep, n, tol_n),
        doubled_steps=check_doubled_steps(attack, runs[check_key(attack, eps, steps)],
                                          runs[check_key(attack, eps, 2 * steps)], steps, n, tol_n),
        square_vs_gradient=check_square_vs_gradient(rr, tol))
    if row.name != "base":
        rr.checks["transfer_vs_end_to_end"] = check_transfer_vs_end_to_end(rr, tol)
    if checks.orders:
        changed = context_sensitivity(row, data, checks.orders)
        n, k, orders = len(changed), int(changed.sum()), checks.orders
        rr.checks["context_sensitivity"] = {
            "orders": orders, "n": n, "changed": k / n, "status": "pass" if k == 0 else "note",
            "detail": (f"{k} of {n} clean predictions ({k / n:.1%}) change when the batches are formed again "
                       f"in {orders} random orders" + ("" if k == 0 else ": a deployment's clean outputs "
                                                       "depend on who else is in the batch"))}
