"""Jobs and resume: an attack (or the clean pass) over all fixed batches of a row, a chunk of
whole batches at a time, recorded in the results after every chunk so that a rerun of the
same command continues where the last one stopped. One loop for one process and for many
(torchrun: ranks.Ranks chooses each process's chunks). Also what a job measures (images through
the backbone) and keeps (--save-adv), and the whole run's plan: its jobs, their estimated cost,
and a progress line after each."""
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hpmkit.chunks import make_chunks
from hpmkit.catalogue import Cost
from hpmkit.cli import duration, progress_bar, say
from hpmkit.files import atomic_save
from hpmkit.gpu import MemoryFit


@dataclass
class Tally:
    """Images through the backbone and the seconds the chunks that counted them took, this run."""
    images: int = 0
    seconds: float = 0.0

    def add(self, images, seconds):
        if images:  # (a job without a backbone to count says nothing about the rate)
            self.images, self.seconds = self.images + images, self.seconds + seconds

    @property
    def seconds_per_pass(self):
        """Seconds per image through the backbone so far (None: none counted yet)."""
        return self.seconds / self.images if self.images else None


@dataclass
class Engine:
    """How jobs run, below the protocol: the device, chunks of whole fixed batches (`chunk`
    images at most; None: one batch at a time), the processes of torchrun (a ranks.Ranks or
    None), chunks that fit in GPU memory (a gpu.MemoryFit, shared by every job of a run), the
    progress bars, what is called after every chunk (the results written), where lines go
    (stdout, flushed), and the backbone passes this process counted (a Tally)."""
    device: torch.device = torch.device("cpu")
    chunk: int = None
    ranks: object = None
    fit: MemoryFit = None
    progress: bool = True
    on_update: Callable = None
    log: Callable = say
    tally: Tally = field(default_factory=Tally)

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
        seconds = time.perf_counter() - t0
        engine.tally.add(seen.images, seconds)
        postfix = share.add(first, end, result, seconds, seen.images)
        if postfix:
            bar.set_postfix_str(postfix)
        bar.update(end - first)
    bar.close()
    return share.finish()


class Plan:
    """The jobs a run will do, in order (`names`: (row, job) pairs), on n images each, and what each
    costs now (cost(i) -> catalogue.Cost, backbone passes per image: an estimate that the images
    fooled so far may lower). After each job, line() gives the progress line: [k/N], the job's
    seconds, the run's so far and the time left: the passes left (upper bounds where an attack may
    stop early) times the seconds per backbone pass measured so far (engine.tally; under torchrun
    each process does 1/world of them)."""

    def __init__(self, names, cost, n, engine):
        self.names, self.cost, self.n, self.engine = list(names), cost, n, engine
        self.k, self.t0 = 0, time.perf_counter()

    def left(self, first):
        """The cost of jobs first.. (a Cost)."""
        return sum((self.cost(i) for i in range(first, len(self.names))), Cost(0))

    def estimate(self):
        """What the run will cost, per row and in all, as lines."""
        if not self.names:
            return ["nothing left to run: an earlier run finished every job"]
        rows = {}
        for i, (row, job) in enumerate(self.names):
            rows.setdefault(row, []).append((job, self.cost(i)))
        lines = [f"estimated cost in backbone passes per image, {self.n} images (\"at most\": Square, the batch "
                 "adversary and victim may stop early; AutoAttack's perturb attacks only the images still correct):"]
        for row, jobs in rows.items():
            attacks = sum(job != "clean" for job, _ in jobs)
            what = (f"{attacks} attack{'s' * (attacks != 1)}" if attacks else "") + (
                (" + clean" if attacks else "clean only") if len(jobs) > attacks else "")
            lines.append(f"  {row:<16} {what:<20} {sum((c for _, c in jobs), Cost(0))}")
        return lines + [f"  {'in all':<16} {'':<20} {self.left(0)}"]

    def line(self, text, seconds):
        """The progress line after the next job: text (what it found) with the clock."""
        self.k += 1
        rate, world = self.engine.tally.seconds_per_pass, self.engine.ranks.world if self.engine.ranks else 1
        if rate is None:
            eta = "time left not known yet"
        else:  # (rough: a pass with gradients, or in a small batch, takes longer than one without)
            eta = f"about {duration(self.left(self.k).passes * self.n * rate / world)} left"
        width = len(str(len(self.names)))
        return (f"[{self.k:>{width}}/{len(self.names)}] {text}   ({seconds:.1f} s; run "
                f"{duration(time.perf_counter() - self.t0)}, {eta})")


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
