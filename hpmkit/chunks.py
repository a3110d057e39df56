"""Many fixed batches at once (--chunk), and the random numbers each batch gets alone.

A chunk is G consecutive fixed batches of B images, attacked in one run: the GPU sees G*B
images per step instead of B. The batch context groups its rows (HPMHead's group_size), so
each fixed batch keeps its own batch prototypes. AutoAttack draws its random numbers on the
CPU generator, seeded with the same seed for every batch; here every batch of a chunk gets the
very numbers it gets when attacked alone, so a per-image model gets the same results as the
sequential form (tested), and a batch-dependent one the same attack up to float rounding.
"""
import math

import torch

from hpmkit.loading import to_float


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
    x: for x one batch, exactly the starts the library draws itself after seed_all(seed)."""
    seed_all(seed)
    G = len(x) // batch_size
    return [apgd_start(apgd, x, apgd_draw(apgd, (batch_size, *x.shape[1:])).repeat(G, *[1] * (x.dim() - 1)))
            for _ in range(n_runs)]


def perturb_chunk(apgd, x, y, sizes, n_targets=0):
    """AutoAttack's APGD perturb (APGDAttack, or APGDAttack_targeted with n_targets) as if called
    on each fixed batch of the chunk in turn: the correctly classified images of all batches in
    one attack_single_run per restart (and target), each batch's starts from its own stream."""
    apgd.init_hyperparam(x)
    group = batch_index(sizes)
    streams = BatchStreams(apgd.seed, len(sizes))
    with torch.no_grad():
        acc = apgd.model(x).max(1)[1] == y
    adv = x.clone()
    for target_class in range(2, n_targets + 2) if n_targets else [None]:
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
    sides = [min(max(int(round(math.sqrt(sq.p_selection(i) * c * h * w / c))), 1), min(h, w))
             for i in range(sq.n_queries)]
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


def per_batch(attack_one, target, x, y, sizes):
    """attack_one(target, x, y) -> runs on each fixed batch of the chunk in turn, the target alone
    on that batch (target.alone: no groups, a scorer of its own, merged back); the runs joined."""
    runs, a, scorer = None, 0, target.scorer
    for n in sizes:
        sub = None if scorer is None else scorer.part(a, a + n)
        out = attack_one(target.alone(sub), x[a:a + n], y[a:a + n])
        if sub is not None:
            scorer.absorb(a, sub)
        runs = out if runs is None else [torch.cat(pair) for pair in zip(runs, out)]
        a += n
    return runs


def make_batches(n, batch_size):
    """Fixed consecutive batches [(start, end), ...] of the (sorted) subset."""
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def make_chunks(batches, done, chunk):
    """The batches from index `done` on, as chunks [(first, end), ...] of consecutive whole fixed
    batches, at most `chunk` images each (at least one batch); a batch smaller than the first (the
    last of the subset) is a chunk of its own. chunk None: one batch per chunk."""
    size = batches[0][1] - batches[0][0]
    per = 1 if chunk is None else max(1, chunk // size)
    chunks, i = [], done
    while i < len(batches):
        j = i + 1
        while j < len(batches) and j - i < per and batches[j][1] - batches[j][0] == size:
            j += 1
        if batches[i][1] - batches[i][0] != size:
            j = i + 1
        chunks.append((i, j))
        i = j
    return chunks


def balanced_chunks(batches, chunk, world):
    """Under torchrun: the batches as chunks [(first, end), ...] of consecutive whole fixed batches,
    none above `chunk` images, the full batches in a multiple of `world` chunks of near-equal size
    (the short last batch alone), so that no process idles while another works: 2,500 images in
    chunks of 1024 are 3 chunks by make_chunks, and one of 4 GPUs would wait."""
    size = batches[0][1] - batches[0][0]
    full = sum(b - a == size for a, b in batches)
    per = 1 if chunk is None else max(1, chunk // size)  # batches per chunk, at most
    n = min(full, world * math.ceil(full / (per * world)))  # chunks of full batches
    q, r = divmod(full, n)
    ends = [0]
    for k in range(n):  # r chunks of q + 1 batches, then n - r of q
        ends.append(ends[-1] + q + (k < r))
    return list(zip(ends[:-1], ends[1:])) + [(i, i + 1) for i in range(full, len(batches))]


def batch_loader(x, y, batches, device):
    """(first, end) -> (images float (n, C, H, W) in [0, 1], labels (n,)) of batches first..end-1."""
    def batch(first, end):
        a, b = batches[first][0], batches[end - 1][1]
        xb = to_float(x[a:b], device) if x.dtype == torch.uint8 else x[a:b].to(device).float()
        return xb, y[a:b].to(device)
    return batch


def chunk_sizes(batches, first, end):
    """The sizes of the fixed batches first..end-1."""
    return [b - a for a, b in batches[first:end]]


def chunk_group(batches, first, end):
    """The group size of a chunk (its batches' size), None for one batch."""
    return batches[first][1] - batches[first][0] if end - first > 1 else None
