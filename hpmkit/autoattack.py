"""The adapter over AutoAttack: the one module that imports the library and owns how it is called.

An upgrade of the library touches this file alone: the `autoattack` alias, the attack objects
with our settings (APGDAttack, APGDAttack_targeted and SquareAttack are re-exported for the
experiments), its random streams and its warnings. The library draws on the CPU generator, seeded
alike for every batch; a chunk of G fixed batches is attacked in one run, and every batch gets the
very numbers it gets when attacked alone, so a per-image model gets the sequential form's results
(tested), a batch-dependent one the same attack up to float rounding.
"""
import importlib
import math
import re
import sys

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # PyPI's AutoAttack
from pyautoattack.square import SquareAttack


def alias_autoattack():
    """robustbench imports `autoattack`; PyPI ships AutoAttack as `pyautoattack`. Needed before
    robustbench is imported, and before unpickling a model whose classes come from robustbench."""
    if "autoattack" in sys.modules:
        return
    try:
        importlib.import_module("autoattack")  # the upstream package, if installed
    except ImportError:
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
        for sub in ("state", "autopgd_base", "square", "other_utils", "checks"):
            try:
                sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
            except ImportError:
                pass


# The library's attack objects --------------------------------------------------------------

def library_attack(kind, model, setting, device, warnings=None, n_target_classes=1, loss=None):
    """AutoAttack's object for "square", "apgd-ce", "apgd-dlr", "apgd-cw" (APGD on `loss`, ours:
    pgd.cw_loss) or "apgd-t" (n_target_classes target classes), attacking `model`, with the
    settings we use everywhere. warnings: a WarningCounter (the library's logger)."""
    s = setting
    if kind == "square":
        return SquareAttack(model, norm=s.norm, n_queries=s.queries, eps=s.eps, p_init=0.8, n_restarts=1,
                            seed=s.seed, verbose=False, device=device)
    common = dict(n_iter=s.steps, norm=s.norm, eps=s.eps, seed=s.seed, eot_iter=1, rho=0.75, verbose=False,
                  device=device, logger=warnings)
    if kind == "apgd-t":
        return APGDAttack_targeted(model, n_restarts=1, n_target_classes=n_target_classes, **common)
    if kind == "apgd-cw":
        return APGDLoss(model, loss, n_restarts=s.restarts, **common)
    return APGDAttack(model, n_restarts=s.restarts, loss=kind.split("-")[1], **common)


class APGDLoss(APGDAttack):
    """AutoAttack's APGD on a loss of ours, loss(logits, y) -> (B,) to maximise. The library picks
    its loss by name inside attack_single_run; ours takes the place of its "dlr" slot."""

    def __init__(self, model, loss, **kw):
        super().__init__(model, loss="dlr", **kw)
        self.own_loss = loss

    def dlr_loss(self, logits, y):
        return self.own_loss(logits, y)


def final_batch(x, x_best, robust, loss_best, x_best_adv):
    """From attack_single_run's outputs: each image's last iterate that fooled the model (robust
    False), else its highest-loss iterate."""
    return torch.where(robust.view(-1, *[1] * (x.dim() - 1)), x_best, x_best_adv)


# Its random streams, replayed per fixed batch of a chunk ----------------------------------

def seed_all(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


class BatchStreams:
    """One copy of the seeded CPU random stream per fixed batch of a chunk."""

    def __init__(self, seed, n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.states = [torch.get_rng_state()] * n

    def draw(self, g, fn):
        """fn() on batch g's stream, which then moves on; the global generator is left alone."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.states[g])
            out = fn()
            self.states[g] = torch.get_rng_state()
        return out


def batch_index(sizes, device=None):
    """Each image's fixed batch in a chunk of batches of these sizes: (sum(sizes),)."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)


def apgd_start(apgd, x, t):
    """APGD's random start from the draw t on the CPU (as attack_single_run computes it)."""
    t = 2 * t.to(apgd.device) - 1 if apgd.norm == "Linf" else t.to(apgd.device)
    return x + apgd.eps * torch.ones_like(x) * apgd.normalize(t)


def apgd_draw(apgd, shape):
    return torch.rand(shape) if apgd.norm == "Linf" else torch.randn(shape)


def tiled_starts(apgd, x, batch_size, n_runs, seed):
    """The starts of n_runs attack_single_run calls on one seeded fixed batch, for every batch of
    x (batch_size images each, at least 1): for x one batch, exactly the starts the library draws
    itself after seed_all(seed)."""
    seed_all(seed)
    G = len(x) // batch_size
    return [apgd_start(apgd, x, apgd_draw(apgd, (batch_size, *x.shape[1:])).repeat(G, *[1] * (x.dim() - 1)))
            for _ in range(n_runs)]


def perturb_chunk(apgd, x, y, sizes, n_target_classes=0):
    """AutoAttack's APGD perturb (APGDAttack, or APGDAttack_targeted with n_target_classes) as if
    called on each fixed batch of the chunk in turn: the correctly classified images of all
    batches in one attack_single_run per restart (and target class), each batch's starts from its
    own stream."""
    apgd.init_hyperparam(x)
    group = batch_index(sizes)
    streams = BatchStreams(apgd.seed, len(sizes))
    with torch.no_grad():
        acc = apgd.model(x).max(1)[1] == y
    adv = x.clone()
    for target_class in range(2, n_target_classes + 2) if n_target_classes else [None]:
        for _ in range(apgd.n_restarts):
            idx = acc.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            x_f, y_f = x[idx], y[idx]
            if target_class is not None:
                with torch.no_grad():
                    apgd.y_target = apgd.model(x_f).sort(dim=1)[1][:, -target_class]
            counts = torch.bincount(group[idx.cpu()], minlength=len(sizes)).tolist()
            t = torch.cat([streams.draw(g, lambda n=n: apgd_draw(apgd, (n, *x.shape[1:])))
                           for g, n in enumerate(counts) if n])
            _, acc_curr, _, adv_curr = apgd.attack_single_run(x_f, y_f, x_init=apgd_start(apgd, x_f, t))
            fooled = (acc_curr == 0).nonzero().squeeze(1)
            acc[idx[fooled]] = False
            adv[idx[fooled]] = adv_curr[fooled]
    return adv


def square_sides(n_queries, c, h, w, p_init=0.8):
    """The side of the square at each of n_queries queries on images (c, h, w), as the library's
    Square (L-inf) schedules it (p_selection): at least 1, at most the image's smaller side."""
    sq = SquareAttack(None, n_queries=n_queries, p_init=p_init)
    return [min(max(int(round(math.sqrt(sq.p_selection(i) * c * h * w / c))), 1), min(h, w))
            for i in range(n_queries)]


@torch.no_grad()
def square_chunk(sq, x, y, sizes):
    """AutoAttack's SquareAttack.perturb (L-inf, one restart) as if called on each fixed batch of
    the chunk in turn, as one loop over all their images. The library draws one square (place
    and signs) per query for all the images it attacks; here each image gets its batch's."""
    sq.init_hyperparam(x)
    c, h, w = x.shape[1:]
    group = batch_index(sizes, x.device)
    adv = x.clone()
    idx = (sq.predict(x).max(1)[1] == y).nonzero().squeeze(1)
    if idx.numel() == 0:
        return adv
    xs, ys = x[idx], y[idx]
    counts = torch.bincount(group[idx], minlength=len(sizes)).tolist()
    sides = square_sides(sq.n_queries, c, h, w, sq.p_init)
    streams = BatchStreams(sq.seed, len(sizes))

    def schedule(n):  # the library's draws on a batch of n images: the start, then one square per query
        start = sq.random_choice([n, c, 1, w])
        draws = [(sq.random_int(0, h - s), sq.random_int(0, w - s), sq.random_choice([c, 1, 1])) for s in sides]
        return start, *(torch.cat(d) if k < 2 else torch.stack(d) for k, d in enumerate(zip(*draws)))
    attacked = [g for g, n in enumerate(counts) if n]
    plans = [streams.draw(g, lambda n=counts[g]: schedule(n)) for g in attacked]
    x_best = (xs + sq.eps * torch.cat([p[0] for p in plans])).clamp(0., 1.)
    top, left, sign = (torch.stack([p[k] for p in plans]) for k in (1, 2, 3))  # (G', queries[, c, 1, 1])
    slot = torch.zeros(len(sizes), dtype=torch.long, device=x.device)
    slot[attacked] = torch.arange(len(attacked), device=x.device)
    gs = slot[group[idx]]  # each attacked image's row in top, left and sign
    margin_min, loss_min = sq.margin_and_loss(x_best, ys)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    for i, s in enumerate(sides):
        ia = (margin_min > 0.0).nonzero().squeeze(1)
        if ia.numel() == 0:
            break
        g = gs[ia]
        t, l = top[g, i][:, None], left[g, i][:, None]
        window = (((rows >= t) & (rows < t + s))[:, None, :, None]
                  & ((cols >= l) & (cols < l + s))[:, None, None, :])  # (n, 1, h, w)
        x_curr, x_best_curr = xs[ia], x_best[ia]
        x_new = torch.where(window, x_best_curr + 2. * sq.eps * sign[g, i], x_best_curr)
        x_new = torch.min(torch.max(x_new, x_curr - sq.eps), x_curr + sq.eps).clamp(0., 1.)
        margin, loss = sq.margin_and_loss(x_new, ys[ia])
        improved = loss < loss_min[ia]
        loss_min[ia] = torch.where(improved, loss, loss_min[ia])
        improved |= margin <= 0.
        margin_min[ia] = torch.where(improved, margin, margin_min[ia])
        x_best[ia] = torch.where(improved[:, None, None, None], x_new, x_best_curr)
    fooled = (sq.predict(x_best).max(1)[1] != ys).nonzero().squeeze(1)
    adv[idx[fooled]] = x_best[fooled]
    return adv


def per_batch(attack_one, model, chunk):
    """attack_one(model, batch) -> runs on each fixed batch of the chunk in turn (the library's
    Square on shrinking queries, or in L2, has no chunked form), the model alone on that batch
    (model.alone: no groups, a scorer of its own, merged back); the runs joined."""
    outs, a, scorer = [], 0, model.scorer
    for n in chunk.sizes:
        sub = None if scorer is None else scorer.part(a, a + n)
        outs.append(attack_one(model.alone(sub), chunk.part(a, a + n)))
        if sub is not None:
            scorer.absorb(a, sub)
        a += n
    return [torch.cat(run) for run in zip(*outs)]


# Its warnings ------------------------------------------------------------------------------

NUMBER = r"\d+(?:\.\d+)?"


class WarningCounter:
    """A logger for AutoAttack's checks: counts alike warnings instead of printing one per batch.
    Warnings alike but for their numbers are one entry: its count, and each number summed."""

    def __init__(self):
        self.counts = {}  # {the text with its numbers as "{}": [occurrences, [each number's sum]]}

    def warning(self, msg):
        text = str(msg).split("!")[0]  # (what follows is the same advice every time)
        numbers = [float(n) if "." in n else int(n) for n in re.findall(NUMBER, text)]
        key = re.sub(NUMBER, "{}", text.replace("{", "{{").replace("}", "}}"))
        entry = self.counts.setdefault(key, [0, [0] * len(numbers)])
        entry[0] += 1
        entry[1] = [s + n for s, n in zip(entry[1], numbers)]

    def summary(self):
        """One line: each kind of warning with its numbers summed and how often it came."""
        return "; ".join(phrase(key, n, sums) for key, (n, sums) in self.counts.items())


# AutoAttack's warnings our attacks can raise, said with their numbers summed over n warnings.
PHRASES = {
    # checks.check_zero_gradients, once at the start of every APGD run on a batch (or a chunk)
    "there are {} points with zero gradient": lambda sums, n: (
        f"zero gradient at {sums[0]} point{'s' * (sums[0] != 1)} in all, over {n} APGD run{'s' * (n != 1)} "
        "that found any (checked at each run's start: an image counts once per run)"),
}


def phrase(key, n, sums):
    """A WarningCounter entry in words: PHRASES' wording where it has one, else the text, numbers summed."""
    if key in PHRASES:
        return PHRASES[key](sums, n)
    text = key.format(*(f"{v:g}" if isinstance(v, float) else v for v in sums))
    return text if n == 1 else f"{text} ({'numbers summed over ' if sums else ''}{n} warnings)"
