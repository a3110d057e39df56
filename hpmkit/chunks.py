"""Many fixed batches at once (--chunk), and the random numbers each batch gets alone.

A chunk is G consecutive fixed batches of B images, attacked in one run: the GPU sees G*B
images per step instead of B. The batch context groups its rows (HPMHead's batch_size), so
each fixed batch keeps its own batch prototypes. AutoAttack draws its random numbers on the
CPU generator, seeded with the same seed for every batch; here every batch of a chunk gets the
very numbers it gets when attacked alone, so a per-image model gets the same results as the
sequential form (tested), and a batch-dependent one the same attack up to float rounding.
"""
import math
from dataclasses import dataclass

import torch

from hpmkit.data import to_float


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


def square_side(p, c, h, w):
    """The side of Square's square for the fraction p of the image's pixels, as AutoAttack's
    SquareAttack (L-inf) computes it: at least 1, at most the image's smaller side."""
    return min(max(int(round(math.sqrt(p * c * h * w / c))), 1), min(h, w))


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
    sides = [square_side(sq.p_selection(i), c, h, w) for i in range(sq.n_queries)]
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


def per_batch(attack_one, target, chunk):
    """attack_one(target, batch) -> runs on each fixed batch of the chunk in turn, the target alone
    on that batch (target.alone: no groups, a scorer of its own, merged back); the runs joined."""
    runs, a, scorer = None, 0, target.scorer
    for n in chunk.sizes:
        sub = None if scorer is None else scorer.part(a, a + n)
        out = attack_one(target.alone(sub), chunk.part(a, a + n))
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


@dataclass
class Chunk:
    """Consecutive whole fixed batches attacked at once: images x (n, C, H, W) in [0, 1] on the
    device, labels y (n,), the batches' sizes (a short last batch of the subset stands alone),
    and where the chunk starts in the subset."""
    x: torch.Tensor
    y: torch.Tensor
    sizes: list
    start: int = 0

    @property
    def batch_size(self):
        """The fixed batch size: the rows are consecutive fixed batches of this many images."""
        return self.sizes[0]

    @property
    def grouped_by(self):
        """What a batch-context model groups the rows by: the fixed batch size in a chunk of several
        batches; None for one batch, whose queries are classified as they come (AutoAttack's Square
        queries the images it has not fooled yet, part of the batch)."""
        return self.batch_size if len(self.sizes) > 1 else None

    @property
    def span(self):
        """Its images' positions in the subset."""
        return slice(self.start, self.start + len(self.y))

    def part(self, a, b):
        """Rows a..b-1 (whole fixed batches of the chunk) as a chunk of their own."""
        sizes, at = [], 0
        for n in self.sizes:
            if a <= at < b:
                sizes.append(n)
            at += n
        return Chunk(self.x[a:b], self.y[a:b], sizes, self.start + a)


@dataclass
class ChunkResult:
    """What one attack did to a chunk of fixed batches (n images)."""
    correct: torch.Tensor  # (n,) bool: correct under every scored batch of the attack
    x_adv: torch.Tensor = None  # (n, C, H, W): the adversarial batches kept (None: clean pass)
    final_correct: torch.Tensor = None  # (n,) bool: the kept batch alone, where queries were scored

    @staticmethod
    def join(parts):
        """Consecutive parts of a chunk as one."""
        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)
        return ChunkResult(cat("correct"), cat("x_adv"), cat("final_correct"))


class FixedBatches:
    """The evaluation subset cut into fixed consecutive batches of batch_size: images x (N, C, H,
    W; uint8 or float in [0, 1]) and labels y (N,), served as chunks on the device."""

    def __init__(self, x, y, batch_size, device="cpu"):
        self.x, self.y, self.batch_size, self.device = x, y, batch_size, device
        self.batches = make_batches(len(y), batch_size)  # [(start, end), ...]

    def __len__(self):
        return len(self.y)

    def chunk(self, first, end):
        """Batches first..end-1 as a Chunk (float images on the device)."""
        a, b = self.batches[first][0], self.batches[end - 1][1]
        return Chunk(to_float(self.x[a:b], self.device), self.y[a:b].to(self.device),
                     [e - s for s, e in self.batches[first:end]], a)

    def first(self, n):
        """The first n images, cut into the same fixed batches (the checks')."""
        return FixedBatches(self.x[:n], self.y[:n], self.batch_size, self.device)
