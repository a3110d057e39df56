"""K of B: an attacker who holds K slots of every fixed batch, the other images benign and clean.

HPM's label for an image depends on the other images of its batch (C_batch, Eq. 16). A service
that classifies batches made of many users' images lets an attacker supply some of them. The
attacker holds the last K slots of every fixed batch (DIA's convention, Wu et al., ICML 2023;
a batch of n <= K images, the short last one, leaves its first image benign), may move its own
images within its budget (--attacker-eps around their natural images; 1 under L-inf: any
image), and never touches the others. Two risks, both measured on the real model with every
query a whole fixed batch scored (an image counts fooled if any scored batch fooled it):

- own: the attacker's images misclassified ("own/*": APGD through the MSA surrogates, on the
  attacker's slots alone);
- collateral: the benign images misclassified by the attacker's images ("benign/*"):
  "spread", the summed margins of the benign images still standing, clamped at 0, ascended by
  the attacker's slots; "victim", per benign image still standing a copy of its batch whose
  attacker slots ascend that one image's margin (as target/mix does for the whole batch);
  both through a surrogate's C_batch (soft, STE or mix); and "square", Square on the summed
  clamped margins with proposals in the attacker's slots only: no gradients at all.

A per-image model (the base model) has no collateral by construction. Each attack takes a chunk
of fixed batches, the setting (its eps the attacker's), the slots (n,) bool and returns the
attacker's images (one tensor per run).
"""
import torch
import torch.nn as nn

from hpmkit.attacks import QueryScorer, cw_loss, final_batch, library_attack, margins, step_size
from hpmkit.chunks import seed_all, square_side, tiled_starts
from hpmkit.pgd import ascent_step


def attacker_slots(sizes, K):
    """(n,) bool over consecutive fixed batches of these sizes: the last K slots of each batch
    (at most all but its first image)."""
    slots = []
    for n in sizes:
        k = min(K, n - 1)
        slots += [False] * (n - k) + [True] * k
    return torch.tensor(slots, dtype=torch.bool)


def put(x, slots, x_att):
    """The batch x with the attacker's images x_att (m, ...) in its slots (n,) bool; differentiable
    in x_att, the benign images exactly x's."""
    return x.index_put((slots.nonzero().squeeze(1),), x_att)


class Slots(nn.Module):
    """The module an attack on the attacker's images sees: x_att (m, C, H, W) -> the surrogate's
    logits of the images `out` (n,) bool (default: the attacker's own), x_att put into the slots
    of the clean chunk x0. The surrogate (and its scorer) sees whole fixed batches."""

    def __init__(self, surrogate, x0, slots, out=None):
        super().__init__()
        self.surrogate, self.x0, self.slots = surrogate, x0, slots
        self.out = slots if out is None else out

    def forward(self, x_att):
        return self.surrogate(put(self.x0, self.slots, x_att))[self.out]


def own_attack(kind, target, chunk, setting, slots, warnings=None):
    """"own/apgd-ce/*", "own/apgd-dlr/*": AutoAttack's APGD (attack_single_run, whole batches) on
    the attacker's images alone, through `target` (an MSA surrogate on whole fixed batches), from
    the random starts each batch draws alone."""
    x_att, y_att = chunk.x[slots], chunk.y[slots]
    apgd = library_attack(kind, Slots(target, chunk.x, slots), setting, chunk.x.device, warnings)
    apgd.init_hyperparam(x_att)
    per_batch = len(x_att) // len(chunk.sizes)  # every batch of a chunk holds as many slots
    starts = tiled_starts(apgd, x_att, per_batch, setting.restarts, setting.seed)
    return [final_batch(x_att, *apgd.attack_single_run(x_att, y_att, x_init=start)) for start in starts]


def clamped_loss(logits, y):
    """The CW margin loss clamped at 0 (B,): an image already misclassified adds nothing."""
    return cw_loss(logits, y).clamp(max=0)


def spread_attack(target, chunk, setting, slots):
    """"benign/spread/*": the attacker's images ascend the summed clamped margin losses of the
    benign images no scored batch has fooled yet (signed steps on a cosine schedule from the
    natural images, the batch adversary's). Needs target.scorer. Returns the last attacker
    images (every iterate was scored)."""
    x, y, s, scorer = chunk.x, chunk.y, setting, target.scorer
    x_att, x_att0 = x[slots].clone(), x[slots]
    for t in range(s.steps):
        x_att.requires_grad_(True)
        loss_i = clamped_loss(target(put(x, slots, x_att)), y)  # the scorer has now seen this batch
        live = scorer.robust & ~slots & torch.isfinite(loss_i)
        if not live.any():
            break
        grad, = torch.autograd.grad(torch.where(live, loss_i, 0).sum(), x_att)
        x_att = ascent_step(x_att.detach(), grad, x_att0, s.eps, s.norm, step_size(t, s.steps, s.eps))
    with torch.no_grad():
        target(put(x, slots, x_att))  # the last iterate, scored
    return [x_att.detach()]


def victim_attack(target, chunk, setting, slots, standing):
    """"benign/victim/*": for each benign image still standing (standing (n,) bool), a copy of its
    fixed batch whose attacker slots ascend that one image's CW margin, until a scored copy fools
    it; copies grouped as many at once as the chunk has batches, each its own C_batch. Any scored
    copy that fools any image counts for that image (target.scorer gets each copy's verdicts).
    Returns the natural attacker images: each victim had its own adversarial batch."""
    x, y, s = chunk.x, chunk.y, setting
    B, scorer = chunk.batch_size, target.scorer
    victims = (standing & ~slots).nonzero().flatten().tolist()
    per_call = max(1, len(x) // B)
    for k in range(0, len(victims), per_call):
        aims = torch.tensor(victims[k:k + per_call], device=x.device)  # (c,)
        first = aims // B * B
        copy_of = (first[:, None] + torch.arange(B, device=x.device)).flatten()  # (c * B,)
        x0, y0, free = x[copy_of], y[copy_of], slots[copy_of]
        aim = torch.arange(len(aims), device=x.device) * B + aims - first
        copies = QueryScorer(x0, y0, scorer.norm, scorer.eps, batch_size=B, frozen=~free)
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
                                live.repeat_interleave(B) & free)  # only the attacker's slots move
        with torch.no_grad():
            surrogate(x_adv)
        fooled = torch.zeros(len(x), dtype=torch.long, device=x.device).index_add_(
            0, copy_of, (~copies.robust).long())
        scorer.robust &= fooled == 0
        scorer.queries, scorer.scored = scorer.queries + copies.queries, scorer.scored + copies.scored
    return [x[slots].clone()]


@torch.no_grad()
def square_victims(target, chunk, setting, slots, p_init=0.8):
    """"benign/square": Square (L-inf) on the summed clamped margins of each batch's benign images,
    its proposals (a square of +-eps per channel around the natural pixels) in the attacker's
    slots only, every query the whole fixed batch on the real model (`target`); a batch keeps its
    proposals when its sum fell. No gradients: it needs none through C_batch. Each batch of a
    chunk draws what it draws alone."""
    from pyautoattack.square import SquareAttack

    x, y, s = chunk.x, chunk.y, setting
    sq = SquareAttack(target, norm="Linf", n_queries=s.queries, eps=s.eps, p_init=p_init, seed=s.seed,
                      device=x.device)  # for its schedule of the square size
    seed_all(s.seed)
    N, C, H, W = x.shape
    B, G = chunk.batch_size, len(chunk.sizes)
    m = int(slots[:B].sum())  # attacker images per batch

    def draw(high, shape):  # one batch's draw for its m attacker images, the same in every batch
        return torch.randint(0, high, (m, *shape), device=x.device).repeat(G, *[1] * len(shape))

    def objective(x_att):  # per batch: the benign images' summed clamped margins (G,)
        logits = target(put(x, slots, x_att))
        loss = torch.where(~slots, margins(logits, y).clamp(min=0), 0)
        return torch.nan_to_num(loss, nan=0.0, neginf=0.0).view(G, -1).sum(1)

    x_att0 = x[slots]
    x_best = (x_att0 + s.eps * (draw(2, (C, 1, W)) * 2 - 1)).clamp(0, 1)
    best = objective(x_best)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    for i in range(s.queries):
        if not (best > 0).any():
            break
        side = square_side(sq.p_selection(i), C, H, W)
        top, left = draw(H - side + 1, (1,)), draw(W - side + 1, (1,))
        window = (((rows >= top) & (rows < top + side))[:, None, :, None]
                  & ((cols >= left) & (cols < left + side))[:, None, None, :])  # (G m, 1, H, W)
        x_new = torch.where(window, (x_att0 + s.eps * (draw(2, (C, 1, 1)) * 2 - 1)).clamp(0, 1), x_best)
        new = objective(x_new)
        better = (new < best) & (best > 0)  # (G,)
        x_best = torch.where(better.repeat_interleave(m)[:, None, None, None], x_new, x_best)
        best = torch.where(better, new, best)
    return [x_best]


def run_slot_attack(attack, target, chunk, setting, slots, standing=None, warnings=None):
    """One attack of the catalogue's attacker rows on a chunk: the attacker's images of every run."""
    kind = attack.kind
    if kind in ("own-apgd-ce", "own-apgd-dlr"):
        return own_attack(kind[len("own-"):], target, chunk, setting, slots, warnings)
    if kind == "spread":
        return spread_attack(target, chunk, setting, slots)
    if kind == "victim":
        return victim_attack(target, chunk, setting, slots, standing)
    if kind == "square-victims":
        return square_victims(target, chunk, setting, slots)
    raise ValueError(f"unknown attacker-slot attack {attack.name!r}")
