"""Many fixed batches at once (--chunk): the subset's fixed batches, cut into chunks.

A chunk is G consecutive fixed batches of B images, attacked in one run: the GPU sees G*B
images per step instead of B. The batch context groups its rows (HPMHead's group_size), so
each fixed batch keeps its own batch prototypes; every batch of a chunk gets the random numbers
it gets when attacked alone (hpmkit/autoattack.py replays AutoAttack's streams per batch).
"""
import math
from dataclasses import dataclass

import torch

from hpmkit.data import to_float


def make_batches(n, batch_size):
    """Fixed consecutive batches [(start, end), ...] of the (sorted) subset."""
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def make_chunks(batches, done, chunk):
    """The batches from index `done` on, as chunks [(first, end), ...] of consecutive whole fixed
    batches, at most `chunk` images each (at least one batch); a batch smaller than the first (the
    last of the subset) is a chunk of its own. chunk None: one batch per chunk."""
    size = batches[0][1] - batches[0][0]
    full = sum(b - a == size for a, b in batches)
    per = 1 if chunk is None else max(1, chunk // size)
    return ([(i, min(i + per, full)) for i in range(done, full, per)]
            + [(i, i + 1) for i in range(max(done, full), len(batches))])


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
        """Rows a..b-1, one fixed batch of the chunk, as a chunk of its own."""
        return Chunk(self.x[a:b], self.y[a:b], [b - a], self.start + a)


@dataclass
class ChunkResult:
    """What one attack did to a chunk of fixed batches (n images)."""
    correct: torch.Tensor  # (n,) bool: correct under every scored batch of the attack
    x_adv: torch.Tensor = None  # (n, C, H, W): the adversarial batches kept (None: clean pass)
    final_correct: torch.Tensor = None  # (n,) bool: the kept batch alone, where queries were scored


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
