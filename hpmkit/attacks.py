"""The attacks AutoAttack lacks, and the one way the library's attacks are called.

AutoAttack's APGD and Square assume a per-image model. HPM's batch context is not one: an
image's prediction depends on the other images of its fixed batch. What this module adds, each
kept because a test in test_hpm.py (section "hpmkit/attacks.py") shows images only it breaks:

- QueryScorer: every query an attack makes with a whole fixed batch inside the threat model is
  an adversarial batch in its own right, scored on the real model
  (test_every_query_is_scored_so_an_early_fooling_batch_counts).
- square_fixed_batch: Square whose every query is the whole fixed batch
  (test_fixed_batch_square_breaks_batches_that_autoattacks_square_misses).
- flip_attack: against the batch prototypes, FC assignments pushed toward the runner-up
  (test_flip_breaks_batches_that_the_rest_of_the_strong_suite_leaves_correct).
- APGDLoss with cw_loss: APGD on the Carlini-Wagner margin (optional, "apgd-cw/*"; no test model
  showed it breaking what the rest misses: test_margin_loss_is_the_carlini_wagner_margin).
- fixed_prototype_logits: the surrogate with the clean batch's hybrid prototypes held fixed
  (optional, "*/fixed"; test_fixed_prototype_surrogate_is_the_real_model_at_the_clean_batch).
- joint_attack and target_attack: the batch as the adversary's, images fooled or sacrificed
  moving the batch prototypes against the images still standing
  (test_the_batch_adversary_breaks_images_every_other_strong_attack_leaves_robust).

A target (the module attacked) is x -> logits, with `scorer` (a QueryScorer or None),
`alone(scorer)`: the same target for one fixed batch of a chunk (chunks.per_batch uses it), and
`regroup(batch_size, scorer)`: the same target on rows that are fixed batches of batch_size.
Every attack takes a chunk (chunks.Chunk: whole fixed batches, attacked at once) and the run's
setting (catalogue.Setting).
"""
import math
from dataclasses import replace

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # PyPI's AutoAttack
from pyautoattack.square import SquareAttack

from hpm import l2_logits, ste_assignment
from hpmkit.chunks import per_batch, perturb_chunk, seed_all, square_chunk, square_side, tiled_starts
from hpmkit.pgd import ascent_step, inside


def margins(logits, y):
    """logit of the true class minus the largest other (B,); below 0: misclassified."""
    other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    margin = logits.gather(1, y[:, None]).squeeze(1) - other
    return torch.where(torch.isfinite(logits).all(dim=1), margin, torch.full_like(margin, -math.inf))


def final_batch(x, x_best, robust, loss_best, x_best_adv):
    """From attack_single_run's outputs: each image's last iterate that fooled the target (robust
    False), else its highest-loss iterate."""
    return torch.where(robust.view(-1, *[1] * (x.dim() - 1)), x_best, x_best_adv)


def check_adv(x_adv, x, norm, eps, frozen=None):
    """The attack stayed in the threat model: finite rows in [0, 1] within eps, and the images
    `frozen` (n,) bool (benign ones, K of B) exactly the clean ones (else a bug)."""
    x_adv = x_adv.detach()
    bad = ~torch.isfinite(x_adv).flatten(1).all(dim=1)
    x_adv = torch.where(bad.view(-1, *[1] * (x.dim() - 1)), x, x_adv)  # a NaN image is no image
    if frozen is not None and not torch.equal(x_adv[frozen], x[frozen]):
        raise RuntimeError("attack moved a benign image: only the attacker's slots may move")
    if not inside(x_adv, x, eps, norm).all():
        delta = (x_adv - x).flatten(1)
        size = delta.abs().max(dim=1).values if norm == "Linf" else delta.norm(dim=1)
        raise RuntimeError(f"attack left the threat model: max {norm} perturbation "
                           f"{size.max().item():.6g} > eps {eps:.6g} or pixels outside [0, 1]")
    return x_adv


class QueryScorer:
    """Scores every query of an attack on one fixed batch x0 (B, ...) with labels y on the real
    model: an image is fooled if any query that is the whole batch inside the threat model
    (eps-ball around x0 and [0, 1]) fooled it. Tensor ops only: no host sync per query.
    batch_size: x0 is a chunk of fixed batches of this size, each judged inside on its own.
    frozen: (B,) bool, images a query must leave exactly as in x0 to count (the benign images of
    K of B; None: none)."""

    def __init__(self, x0, y, norm, eps, batch_size=None, frozen=None):
        self.x0, self.y, self.norm, self.eps, self.frozen = x0, y, norm, eps, frozen
        self.batch_size = batch_size or len(y)
        self.robust = torch.ones_like(y, dtype=torch.bool)
        self.queries = self.scored = 0

    def __call__(self, x, logits):
        self.queries += 1
        if x.shape != self.x0.shape:  # part of a batch: not an adversarial batch of this protocol
            return
        self.scored += 1
        within = inside(x.detach(), self.x0, self.eps, self.norm)
        if self.frozen is not None:  # a benign image touched: not a batch of this threat model
            within &= ~self.frozen | (x.detach() == self.x0).flatten(1).all(1)
        within = within.view(-1, self.batch_size).all(1).repeat_interleave(self.batch_size)  # per batch
        correct = (logits.argmax(dim=1) == self.y) & torch.isfinite(logits).all(dim=1)
        self.robust &= correct | ~within  # a query with any image outside the ball counts for nothing

    def part(self, a, b):
        """A scorer of rows a..b-1 alone (one fixed batch of the chunk)."""
        return QueryScorer(self.x0[a:b], self.y[a:b], self.norm, self.eps,
                           frozen=None if self.frozen is None else self.frozen[a:b])

    def absorb(self, a, part):
        """What part(a, ...) scored, merged back."""
        self.robust[a:a + len(part.y)] &= part.robust
        self.queries, self.scored = self.queries + part.queries, self.scored + part.scored


def library_attack(kind, target, setting, device, warnings=None, n_targets=1):
    """AutoAttack's object for "square", "apgd-ce", "apgd-dlr", "apgd-cw" (APGD on the CW
    margin) or "apgd-t" (n_targets target classes), with the settings we use everywhere."""
    s = setting
    if kind == "square":
        return SquareAttack(target, norm=s.norm, n_queries=s.queries, eps=s.eps, p_init=0.8, n_restarts=1,
                            seed=s.seed, verbose=False, device=device)
    common = dict(n_iter=s.steps, norm=s.norm, eps=s.eps, seed=s.seed, eot_iter=1, rho=0.75, verbose=False,
                  device=device, logger=warnings)
    if kind == "apgd-t":
        return APGDAttack_targeted(target, n_restarts=1, n_target_classes=n_targets, **common)
    if kind == "apgd-cw":
        return APGDLoss(target, cw_loss, n_restarts=s.restarts, **common)
    return APGDAttack(target, n_restarts=s.restarts, loss=kind.split("-")[1], **common)


def cw_loss(logits, y):
    """The margin loss of Carlini and Wagner, max_{j != y} z_j - z_y, per image (B,): the DLR loss
    without its scale normaliser (the l2 logits of HPM have another scale than FC logits)."""
    return -margins(logits, y)


class APGDLoss(APGDAttack):
    """AutoAttack's APGD on a loss of ours, loss(logits, y) -> (B,) to maximise. The library picks
    its loss by name inside attack_single_run; ours takes the place of its "dlr" slot."""

    def __init__(self, model, loss, **kw):
        super().__init__(model, loss="dlr", **kw)
        self.own_loss = loss

    def dlr_loss(self, logits, y):
        return self.own_loss(logits, y)


def run_attack(attack, target, chunk, setting, *, whole_batch=True, warnings=None, standing=None,
               helpers=None):
    """One attack (a catalogue.Attack) on a chunk of fixed batches; returns its final adversarial
    batches (a list: one per run; APGD-T makes one run per target class). Nothing is scored
    here, but `target.scorer` (if any) sees every query; `target` is the module attacked.

    whole_batch=True: the library's attack_single_run on the whole batch (for batch-dependent
    models and for transfer attacks); each image gets its last iterate that fooled `target`,
    else its highest-loss iterate. whole_batch=False: the library's perturb (AutoAttack's
    standard path). Either way the RNG is seeded with the setting's seed, and every batch of a
    chunk gets the random numbers it gets alone (chunks.py); AutoAttack's Square on shrinking
    queries (whole_batch) or in L2 goes batch by batch (per_batch). With the setting's
    fixed-batch Square, Square on a whole batch (L-inf) queries the whole fixed batch every time
    (square_fixed_batch). warnings: a cli.WarningCounter that collects AutoAttack's warnings.
    helpers: for "flip", the FC oracle (scored like target) and the real model (not scored),
    {"fc": ..., "real": ...}. "joint" and "target" need target.scorer; standing: for "target",
    the images still standing (n,) bool.
    """
    kind, x, y, s = attack.kind, chunk.x, chunk.y, setting
    several = len(chunk.sizes) > 1  # a chunk of several fixed batches
    fixed_square = kind == "square" and whole_batch and s.square_on_whole_batches
    if several and kind == "square" and not fixed_square and (whole_batch or s.norm != "Linf"):
        # AutoAttack's Square on shrinking queries (batch context) or in L2: batch by batch
        return per_batch(lambda t, batch: run_attack(attack, t, batch, s, whole_batch=whole_batch,
                                                     warnings=warnings), target, chunk)
    if fixed_square:
        return [square_fixed_batch(target, chunk, s)]
    if kind == "square":
        sq = library_attack(kind, target, s, x.device)
        if several:
            return [square_chunk(sq, x, y, chunk.sizes)]
        if not whole_batch:
            return [sq.perturb(x, y)]
        sq.init_hyperparam(x)
        seed_all(s.seed)
        return [sq.attack_single_run(x, y)[1]]
    if kind == "joint":
        return joint_attack(target, chunk, s)
    if kind == "target":
        return target_attack(target, chunk, s, standing)
    if kind == "flip":
        return flip_attack(target, helpers, chunk, s, warnings)
    n_targets = 0
    if kind == "apgd-t":
        with torch.no_grad():
            clean_logits = target(x)
        n_targets = min(9, clean_logits.shape[1] - 1)
    elif kind not in ("apgd-ce", "apgd-dlr", "apgd-cw"):
        raise ValueError(f"unknown attack {attack.name!r}")
    apgd = library_attack(kind, target, s, x.device, warnings, n_targets)
    if not whole_batch:
        return [perturb_chunk(apgd, x, y, chunk.sizes, n_targets) if several else apgd.perturb(x, y)]
    apgd.init_hyperparam(x)  # perturb would do this; attack_single_run needs it
    # as perturb: one seed, then each restart (or target) draws its own random start
    starts = tiled_starts(apgd, x, chunk.batch_size, n_targets or s.restarts, s.seed)
    if kind != "apgd-t":
        return [final_batch(x, *apgd.attack_single_run(x, y, x_init=start)) for start in starts]
    order = clean_logits.sort(dim=1)[1]  # (B, K) classes by clean logit, ascending
    runs = []
    for t, start in zip(range(2, n_targets + 2), starts):
        apgd.y_target = order[:, -t]
        runs.append(final_batch(x, *apgd.attack_single_run(x, y, x_init=start)))
    return runs


def flip_attack(target, helpers, chunk, setting, warnings=None):
    """Adaptive attack "flip" against HPM's batch prototypes (Eq. 15-16), two APGD runs on the
    whole batch: (1) targeted on the FC oracle helpers["fc"], each image toward its runner-up
    class on the real model helpers["real"], so that FC assignments flip and move the batch
    prototypes C_batch that classify the others; (2) APGD-CE on `target` (the mixture) started
    from that batch. Both final batches are kept."""
    x, y = chunk.x, chunk.y
    with torch.no_grad():
        logits = helpers["real"](x)  # (B, K)
    runner_up = logits.scatter(1, y[:, None], -math.inf).argmax(dim=1)  # (B,)
    one = replace(setting, restarts=1)
    flip = library_attack("apgd-t", helpers["fc"], one, x.device, warnings, n_targets=1)
    flip.init_hyperparam(x)
    flip.y_target = runner_up
    start = tiled_starts(flip, x, chunk.batch_size, 1, setting.seed)[0]
    x_flip = final_batch(x, *flip.attack_single_run(x, y, x_init=start))
    apgd = library_attack("apgd-ce", target, one, x.device, warnings)
    apgd.init_hyperparam(x)
    return [x_flip, final_batch(x, *apgd.attack_single_run(x, y, x_init=x_flip))]


@torch.no_grad()
def square_fixed_batch(target, chunk, setting, p_init=0.8):
    """Square (Andriushchenko et al. 2020), L-inf, for a batch-dependent model: every query is
    the whole fixed batch. AutoAttack's Square queries only the images it has not fooled yet,
    which for HPM's batch context is another model. Here each still-correct image proposes a
    new square of +-eps (per channel) around its clean pixels, all proposals go into one query
    of the whole batch, and each image keeps its proposal if its own margin fell under that
    query. Returns the final batch (the scorer sees every query). A chunk of several fixed
    batches: each draws what it draws alone (one batch's draws, tiled)."""
    x, y, eps = chunk.x, chunk.y, setting.eps
    sq = SquareAttack(target, norm="Linf", n_queries=setting.queries, eps=eps, p_init=p_init,
                      seed=setting.seed, device=x.device)  # for its schedule of the square size (p_selection)
    seed_all(setting.seed)
    N, C, H, W = x.shape
    B = chunk.batch_size

    def draw(high, shape):  # one batch's draw, the same for every batch of the chunk
        return torch.randint(0, high, (B, *shape), device=x.device).repeat(N // B, *[1] * len(shape))
    stripes = draw(2, (C, 1, W)) * 2 - 1  # the library's start
    x_best = (x + eps * stripes).clamp(0, 1)
    margin = margins(target(x_best), y)  # (N,)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    for i in range(setting.queries):
        active = margin > 0
        if not active.any():
            break
        s = square_side(sq.p_selection(i), C, H, W)
        top, left = draw(H - s + 1, (1,)), draw(W - s + 1, (1,))
        window = (((rows >= top) & (rows < top + s))[:, None, :, None]
                  & ((cols >= left) & (cols < left + s))[:, None, None, :]
                  & active[:, None, None, None])  # (N, 1, H, W)
        sign = draw(2, (C, 1, 1)) * 2 - 1
        x_new = torch.where(window, (x + eps * sign).clamp(0, 1), x_best)
        m_new = margins(target(x_new), y)
        better = active & (m_new < margin)
        x_best = torch.where(better[:, None, None, None], x_new, x_best)
        margin = torch.where(better, m_new, margin)
    return x_best


def fixed_prototype_logits(head, z, z_clean, context, batch_size=None):
    """Adaptive surrogate "fixed": the real model with the hybrid prototypes of the clean batch
    held fixed, so the gradient flows only through each image's own features z (B, D), never
    through the batch prototypes nor the STE assignment. Equal to the real model at z = z_clean.
    batch_size: the rows are fixed batches of this size, each with its own prototypes; in the
    image context each row is a fixed batch of one (its own hybrid prototypes, (B, K, D))."""
    if z_clean is None or z_clean.shape != z.shape:
        raise ValueError("surrogate 'fixed' needs the clean batch's features (z_clean)")
    with torch.no_grad():
        P = ste_assignment(head.fc(z_clean))  # (B, K), the clean hard assignment
        C_hybrid = head.hybrid_prototypes(z_clean, P, batch_size if context == "batch" else 1)  # (G, K, D)
    return l2_logits(z.view(len(C_hybrid), -1, z.shape[1]), C_hybrid).view(len(z), -1)


# The batch as the adversary's -----------------------------------------------------------------
#
# In HPM's batch context the batch prototypes C_batch are means of the batch's features by
# predicted class, so the other images of a fixed batch decide part of an image's label. Every
# attack above lets each image serve its own loss. The two below spend the batch on the images
# still standing: "joint" on all of them at once, "target" on one image at a time, every other
# image of its batch a helper. Gradients flow through the surrogate's C_batch (soft or STE
# assignments); every iterate is a whole fixed batch inside the ball and is scored.

def step_size(t, steps, eps):
    """A cosine schedule from eps / 2 down to eps / 50 (as PGD's usual eps / 4, decaying)."""
    return eps * (0.02 + 0.48 * (1 + math.cos(math.pi * t / max(steps - 1, 1))) / 2)


def joint_attack(target, chunk, setting):
    """Adaptive attack "joint": the whole fixed batch (or a chunk of them) ascends one loss, the
    sum of the CW margin losses of the images no scored batch has fooled yet, so that an image
    once fooled keeps moving for the others (as a helper, through C_batch) instead of for
    itself. Needs target.scorer (it reads which images still stand). Deterministic: it starts
    from the clean batch. Returns the last batch (every iterate was scored)."""
    x, y, s = chunk.x, chunk.y, setting
    scorer, x_adv = target.scorer, x.clone()
    for t in range(s.steps):
        x_adv.requires_grad_(True)
        loss_i = cw_loss(target(x_adv), y)  # the scorer has now seen this iterate
        standing = scorer.robust & torch.isfinite(loss_i)
        if not standing.any():
            break
        grad, = torch.autograd.grad(torch.where(standing, loss_i, 0).sum(), x_adv)
        x_adv = ascent_step(x_adv.detach(), grad, x, s.eps, s.norm, step_size(t, s.steps, s.eps),
                            torch.ones_like(standing))
    with torch.no_grad():
        target(x_adv)  # the last iterate, scored
    return [x_adv.detach()]


def target_attack(target, chunk, setting, standing):
    """Adaptive attack "target": for each image still standing (standing (n,) bool: correct
    clean and under every attack so far), an attack on a copy of its whole fixed batch whose
    loss is that one image's CW margin: every other image of the batch is a helper. A copy stops
    as soon as a scored batch fools its target. Copies run grouped (each its own C_batch), as
    many at once as the chunk has batches. Any scored copy that fools any image counts for that
    image, and only then (target.scorer gets each copy's verdicts). Returns the clean batch: a
    fixed batch has one adversarial batch per target, none of them the final one."""
    x, y, s = chunk.x, chunk.y, setting
    B, scorer = chunk.batch_size, target.scorer
    targets = standing.nonzero().flatten().tolist()
    per_call = max(1, len(x) // B)  # copies per forward: the chunk's own size
    for k in range(0, len(targets), per_call):
        aims = torch.tensor(targets[k:k + per_call], device=x.device)  # (c,) the targets' positions
        first = aims // B * B  # (c,) the first image of each target's batch
        copy_of = (first[:, None] + torch.arange(B, device=x.device)).flatten()  # (c * B,)
        x0, y0 = x[copy_of], y[copy_of]
        aim = torch.arange(len(aims), device=x.device) * B + aims - first  # the targets in the copies
        copies = QueryScorer(x0, y0, scorer.norm, scorer.eps, batch_size=B)
        surrogate = target.regroup(B, copies)
        x_adv = x0.clone()
        for t in range(s.steps):
            x_adv.requires_grad_(True)
            loss = cw_loss(surrogate(x_adv)[aim], y0[aim])  # (c,), each copy scored
            live = copies.robust[aim] & torch.isfinite(loss)
            if not live.any():
                break
            grad, = torch.autograd.grad(torch.where(live, loss, 0).sum(), x_adv)
            x_adv = ascent_step(x_adv.detach(), grad, x0, s.eps, s.norm, step_size(t, s.steps, s.eps),
                                live.repeat_interleave(B))
        with torch.no_grad():
            surrogate(x_adv)
        fooled = torch.zeros(len(x), dtype=torch.long, device=x.device).index_add_(
            0, copy_of, (~copies.robust).long())  # (n,) in how many copies each image was fooled
        scorer.robust &= fooled == 0
        scorer.queries, scorer.scored = scorer.queries + copies.queries, scorer.scored + copies.scored
    return [x.clone()]
