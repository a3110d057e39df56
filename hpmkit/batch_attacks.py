"""The attacks that use the batch: the batch adversary and K of B, three loops told by a mask
which images the attacker holds, and the scorer of every whole fixed batch they query.

HPM's label for an image depends on the other images of its fixed batch: the batch prototypes
C_batch are means of the batch's features by predicted class (Eq. 16). An attacker who holds
images of a batch can spend them on the others. Who holds what is a mask `held` (n,) bool:

- the batch adversary (rows hpm/batch, the paper's adversarial batch) holds every image:
  "joint" and "target" spend the images fooled or sacrificed on those still standing;
- K of B (rows hpm/attackers-K) holds the last K slots of every fixed batch (DIA's convention,
  Wu et al., ICML 2023; a batch of n <= K images, the short last one, keeps its first image
  benign), moves them within its own budget (--attacker-eps), and never touches the others. Two
  risks: "own:*", its own images misclassified (AutoAttack's APGD through the MSA surrogates, on
  its slots alone), and "benign:*", collateral, the benign images misclassified through C_batch.

The three loops, each told what `held` moves and whose loss rises: ascend_standing ("joint",
"benign:spread"), attack_copies ("target", "benign:victim") and square_search (the batch
adversary's Square, "benign:square"). Every query is a whole fixed batch inside the ball, scored
on the real model by `model.scorer` (a QueryScorer).
"""
import math

import torch
import torch.nn as nn

from hpmkit.autoattack import final_batch, library_attack, seed_all, square_sides, tiled_starts
from hpmkit.pgd import ascent_step, cw_loss, inside, margins


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


# Who holds which image -----------------------------------------------------------------------

def attacker_slots(sizes, K):
    """K of B: (n,) bool over consecutive fixed batches of these sizes, the last K slots of each
    batch (at most all but its first image: a batch of one image holds none)."""
    return torch.tensor([i >= n - min(K, n - 1) for n in sizes for i in range(n)], dtype=torch.bool)


def put(x, held, x_att):
    """The batch x with the attacker's images x_att (m, ...) in its held slots (n,) bool;
    differentiable in x_att, the other images exactly x's."""
    return x.index_put((held.nonzero().squeeze(1),), x_att)


class Slots(nn.Module):
    """The module an attack on the attacker's images alone sees: x_att (m, C, H, W) -> the model's
    logits of those images, x_att put into the held slots of the clean chunk x0. The model (and
    its scorer) sees whole fixed batches."""

    def __init__(self, model, x0, held):
        super().__init__()
        self.model, self.x0, self.held = model, x0, held

    def forward(self, x_att):
        return self.model(put(self.x0, self.held, x_att))[self.held]


def own_attack(kind, model, chunk, setting, held, warnings=None):
    """"own:apgd-ce/*", "own:apgd-dlr/*": AutoAttack's APGD (attack_single_run, whole batches) on
    the attacker's images alone, through `model` (an MSA surrogate on whole fixed batches), from
    the random starts each batch draws alone. Returns the whole chunk of every run."""
    x_att, y_att = chunk.x[held], chunk.y[held]
    apgd = library_attack(kind, Slots(model, chunk.x, held), setting, chunk.x.device, warnings)
    apgd.init_hyperparam(x_att)
    per_batch = len(x_att) // len(chunk.sizes)  # every batch of a chunk holds as many slots
    starts = tiled_starts(apgd, x_att, per_batch, setting.restarts, setting.seed)
    return [put(chunk.x, held, final_batch(x_att, *apgd.attack_single_run(x_att, y_att, x_init=start)).detach())
            for start in starts]


# The losses the held images ascend -----------------------------------------------------------

def benign_margins(held, y, n_batches):
    """Square's objective for K of B: logits -> per fixed batch (n_batches,) the summed margins of
    the images the attacker does not hold, each clamped at 0 (a fooled one adds nothing)."""
    def objective(logits):
        loss = torch.where(~held, margins(logits, y).clamp(min=0), 0)
        return torch.nan_to_num(loss, nan=0.0, neginf=0.0).view(n_batches, -1).sum(1)
    return objective


def step_size(t, steps, eps):
    """A cosine schedule from eps / 2 down to eps / 50 (as PGD's usual eps / 4, decaying)."""
    return eps * (0.02 + 0.48 * (1 + math.cos(math.pi * t / max(steps - 1, 1))) / 2)


# The three loops -----------------------------------------------------------------------------

def ascend_standing(model, chunk, setting, held, aims, loss):
    """One ascent run ("joint", "benign:spread"): the held images (n,) bool take signed steps on
    a cosine schedule (step_size) up the summed loss(logits, y) (n,) of the images `aims` (n,)
    bool that no scored batch has fooled yet, from the clean chunk: an image once fooled keeps
    moving for the others (through C_batch) instead of for itself. Needs model.scorer (it reads
    which images still stand). Returns the last batch (every iterate was scored)."""
    x, y, s, scorer = chunk.x, chunk.y, setting, model.scorer
    x_att, x_att0 = x[held].clone(), x[held]
    for t in range(s.steps):
        x_att.requires_grad_(True)
        loss_i = loss(model(put(x, held, x_att)), y)  # the scorer has now seen this batch
        live = scorer.robust & aims & torch.isfinite(loss_i)
        if not live.any():
            break
        grad, = torch.autograd.grad(torch.where(live, loss_i, 0).sum(), x_att)
        x_att = ascent_step(x_att.detach(), grad, x_att0, s.eps, s.norm, step_size(t, s.steps, s.eps))
    x_adv = put(x, held, x_att.detach())
    with torch.no_grad():
        model(x_adv)  # the last iterate, scored
    return x_adv


def attack_copies(model, chunk, setting, held, aims):
    """One image at a time ("target", "benign:victim"): for each image of `aims` (n,) bool (still
    standing), a copy of its whole fixed batch whose held images ascend that one image's CW
    margin; a copy stops as soon as a scored batch fools its image. Copies run grouped (each its
    own C_batch), as many at once as the chunk has batches. Any scored copy that fools any image
    counts for that image, and only then (model.scorer gets each copy's verdicts). Returns the
    clean chunk: a fixed batch has one adversarial batch per aim, none of them the final one."""
    x, y, s = chunk.x, chunk.y, setting
    B, scorer = chunk.batch_size, model.scorer
    victims = aims.nonzero().flatten().tolist()
    per_call = max(1, len(x) // B)  # copies per forward: the chunk's own size
    for k in range(0, len(victims), per_call):
        at = torch.tensor(victims[k:k + per_call], device=x.device)  # (c,) the victims' positions
        first = at // B * B  # (c,) the first image of each victim's batch
        copy_of = (first[:, None] + torch.arange(B, device=x.device)).flatten()  # (c * B,)
        x0, y0, free = x[copy_of], y[copy_of], held[copy_of]
        aim = torch.arange(len(at), device=x.device) * B + at - first  # the victims in the copies
        copies = QueryScorer(x0, y0, scorer.norm, scorer.eps, batch_size=B, frozen=~free)
        on_copies = model.regroup(B, copies)
        x_adv = x0.clone()
        for t in range(s.steps):
            x_adv.requires_grad_(True)
            loss = cw_loss(on_copies(x_adv)[aim], y0[aim])  # (c,), each copy scored
            live = copies.robust[aim] & torch.isfinite(loss)
            if not live.any():
                break
            grad, = torch.autograd.grad(torch.where(live, loss, 0).sum(), x_adv)
            x_adv = ascent_step(x_adv.detach(), grad, x0, s.eps, s.norm, step_size(t, s.steps, s.eps),
                                live.repeat_interleave(B) & free)  # only the held images move
        with torch.no_grad():
            on_copies(x_adv)
        fooled = torch.zeros(len(x), dtype=torch.long, device=x.device).index_add_(
            0, copy_of, (~copies.robust).long())  # (n,) in how many copies each image was fooled
        scorer.robust &= fooled == 0
        scorer.queries, scorer.scored = scorer.queries + copies.queries, scorer.scored + copies.scored
    return x.clone()


@torch.no_grad()
def square_search(model, chunk, setting, held, objective, per_image, p_init=0.8):
    """Square (Andriushchenko et al. 2020), L-inf, every query the whole fixed batch (AutoAttack's
    Square queries only the images it has not fooled yet, which for HPM's batch context is another
    model). Each held image (n,) bool proposes a new square of +-eps (per channel) around its clean
    pixels, all proposals go into one query, and objective(logits) (one value per unit, pushed
    below 0) decides what is kept: per_image, each image is its unit (the batch adversary's: its
    own margin) and stops proposing once fooled; else each fixed batch is (K of B: its benign
    images' summed margins) and keeps all its proposals where its value fell. Each batch of a
    chunk draws what it draws alone (one batch's draws, tiled). Returns the final batch."""
    x, s = chunk.x, setting
    N, C, H, W = x.shape
    B, G = chunk.batch_size, len(chunk.sizes)
    m = int(held[:B].sum())  # held images per batch
    unit = held.nonzero().squeeze(1) if per_image else torch.arange(G, device=x.device).repeat_interleave(m)
    sides = square_sides(s.queries, C, H, W, p_init)  # the library's schedule of the square's size
    seed_all(s.seed)

    def draw(high, shape):  # one batch's draw for its m held images, the same in every batch
        return torch.randint(0, high, (m, *shape), device=x.device).repeat(G, *[1] * len(shape))

    x_att0 = x[held]
    x_best = (x_att0 + s.eps * (draw(2, (C, 1, W)) * 2 - 1)).clamp(0, 1)  # the library's start: stripes
    best = objective(model(put(x, held, x_best)))
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    for side in sides:
        active = best > 0
        if not active.any():
            break
        top, left = draw(H - side + 1, (1,)), draw(W - side + 1, (1,))
        window = (((rows >= top) & (rows < top + side))[:, None, :, None]
                  & ((cols >= left) & (cols < left + side))[:, None, None, :])  # (G m, 1, H, W)
        if per_image:  # a fooled image proposes nothing more
            window = window & active[unit][:, None, None, None]
        x_new = torch.where(window, (x_att0 + s.eps * (draw(2, (C, 1, 1)) * 2 - 1)).clamp(0, 1), x_best)
        new = objective(model(put(x, held, x_new)))
        better = active & (new < best)
        x_best = torch.where(better[unit][:, None, None, None], x_new, x_best)
        best = torch.where(better, new, best)
    return put(x, held, x_best)
