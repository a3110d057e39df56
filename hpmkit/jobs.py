"""Jobs and resume: an attack (or the clean pass) over all fixed batches of a row, a chunk of
whole batches at a time, recorded in the results after every chunk so that a rerun of the
same command continues where the last one stopped. One loop for one process and for many
(torchrun: ranks.Ranks chooses each process's chunks). Also what a job measures (images through
the backbone) and keeps (--save-adv)."""
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hpmkit.chunks import make_chunks
from hpmkit.cli import progress_bar
from hpmkit.files import atomic_save
from hpmkit.gpu import MemoryFit


@dataclass
class Engine:
    """How jobs run, below the protocol: the device, chunks of whole fixed batches (`chunk`
    images at most; None: one batch at a time), the processes of torchrun (a ranks.Ranks or
    None), chunks that fit in GPU memory (a gpu.MemoryFit, shared by every job of a run), the
    progress bars, and what is called after every chunk (the results written)."""
    device: torch.device = torch.device("cpu")
    chunk: int = None
    ranks: object = None
    fit: MemoryFit = None
    progress: bool = True
    on_update: Callable = None
    log: Callable = print

    def __post_init__(self):
        self.fit = self.fit or MemoryFit(self.log)

    def updated(self):
        if self.on_update is not None:
            self.on_update()


@dataclass
class Job:
    """An attack (or the clean pass, or a check's attack) over every fixed batch of a row."""
    row: str  # the row's name ("hpm/batch")
    name: str  # the job's name in the row's results
    run: Callable  # (first, end) -> chunks.ChunkResult on fixed batches first..end-1
    backbone: torch.nn.Module = None  # whose forward passes measure the job's cost
    save: Callable = None  # save(i, x_adv): keeps batch i's adversarial images (--save-adv)
    label: str = None  # how progress and torchrun's ledgers name it (default: name)

    @property
    def key(self):
        return f"{self.row}|{self.label or self.name}"

    @property
    def desc(self):
        return f"{self.row} {self.label or self.name}"


class BackboneCounter:
    """Context manager: images that go through `module`'s forward, and how many calls."""

    def __init__(self, module):
        self.module, self.images, self.batches = module, 0, 0

    def hook(self, module, inputs, output):
        self.images += inputs[0].shape[0]
        self.batches += 1

    def __enter__(self):
        self.handle = None if self.module is None else self.module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


class Alone:
    """One process's share of a job: every chunk from where the results left off, each recorded
    at once."""

    def __init__(self, runs, job, batches, engine):
        self.runs, self.name, self.engine = runs, job.name, engine
        self.p = runs.progress(job.name, batches)
        runs.record(job.name, self.p)
        self.todo, self.done = make_chunks(batches, self.p.done, engine.chunk), self.p.done
        self.desc, self.shows_progress = job.desc, True

    def add(self, first, end, result, seconds, images):
        p = self.p
        p.correct += result.correct.int().tolist()
        if result.final_correct is not None:
            p.final = (p.final or []) + result.final_correct.int().tolist()
        p.done, p.seconds = end, p.seconds + seconds
        p.images = None if p.images is None else p.images + images
        self.runs.record(self.name, p)
        self.engine.updated()
        return f"acc {sum(p.correct) / len(p.correct):.1%}"

    def finish(self):
        return self.p.correct


def run_job(runs, job, batches, engine):
    """Run job.run over the fixed batches (chunks of whole batches, at most engine.chunk images),
    resuming where `runs` (a results.Runs) left off; returns the per-image 0/1 list."""
    share = engine.ranks.share(runs, job, batches, engine) if engine.ranks is not None else Alone(
        runs, job, batches, engine)
    run = engine.fit(job.run, job.row, batches)
    bar = progress_bar(len(batches), share.desc, engine.progress and share.shows_progress)
    bar.update(share.done)
    for first, end in share.todo:
        t0 = time.perf_counter()
        with BackboneCounter(job.backbone) as seen:
            result = run(first, end)
        if job.save is not None and result.x_adv is not None:
            for i in range(first, end):
                job.save(i, result.x_adv[batches[i][0] - batches[first][0]:batches[i][1] - batches[first][0]])
        postfix = share.add(first, end, result, time.perf_counter() - t0, seen.images)
        if postfix:
            bar.set_postfix_str(postfix)
        bar.update(end - first)
    bar.close()
    return share.finish()


def adv_path(save_dir, row_name, attack):
    """Where --save-adv keeps one attack's adversarial images of one row."""
    return os.path.join(save_dir, f"{row_name.replace('/', '-')}__{attack.replace('/', '_')}.pt")


class AdvStore:
    """--save-adv: a folder that keeps every attack's adversarial images, one file per row and
    attack (with the labels, the subset's indices and the fixed batches)."""

    def __init__(self, save_dir, y, indices, batches):
        self.dir, self.y, self.indices, self.batches = save_dir, y, indices, batches

    def has(self, row_name, attack):
        return os.path.exists(adv_path(self.dir, row_name, attack))

    def saver(self, row_name, attack):
        return AdvSaver(self.dir, row_name, attack, self.y, self.indices, self.batches)


class AdvSaver:
    """--save-adv: per-batch parts while an attack runs, one file per attack when it finishes."""

    def __init__(self, save_dir, row_name, attack, y, indices, batches):
        self.path = adv_path(save_dir, row_name, attack)
        self.parts = os.path.join(save_dir, "parts", os.path.basename(self.path)[:-3])
        self.meta = {"row": row_name, "attack": attack, "y": y.cpu(), "indices": indices,
                     "batches": batches}
        os.makedirs(self.parts, exist_ok=True)

    def part(self, i):
        return os.path.join(self.parts, f"{i:05d}.pt")

    def has_parts(self, done):
        return all(os.path.exists(self.part(i)) for i in range(done))

    def __call__(self, i, x_adv):
        atomic_save(x_adv.detach().float().cpu(), self.part(i))

    def finish(self):
        xs = [torch.load(self.part(i), weights_only=True) for i in range(len(self.meta["batches"]))]
        atomic_save({**self.meta, "x_adv": torch.cat(xs)}, self.path)  # (N, C, H, W) float
        for i in range(len(xs)):
            os.remove(self.part(i))
        os.rmdir(self.parts)
        if not os.listdir(os.path.dirname(self.parts)):
            os.rmdir(os.path.dirname(self.parts))
