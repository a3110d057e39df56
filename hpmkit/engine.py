"""What evaluate.py's loop stands on: the chunks a job still has to attack, and what is done around each.

A job is an attack (or the clean pass, or a check's attack) over every fixed batch of a row. The
loop in evaluate.py reads

    job = runner.job(rr, data, row.name, attack.name, row.backbone, saver)
    for chunk in job:             # from where the results left off; under torchrun, this rank's share
        with job.fit():           # timed, backbone passes counted; out of GPU memory: again in halves
            job.record(attack_chunk(row, attack, chunk, setting, ...))   # written at once
    job.finish()
"""
import contextlib
import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from hpmkit.catalogue import Cost
from hpmkit.chunks import balanced_chunks, make_chunks
from hpmkit.cli import duration, progress_bar, say
from hpmkit.files import atomic_save, write_json
from hpmkit.results import Progress, Results


# The images through the backbone: a job's cost, and the run's rate ---------------------------

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


@dataclass
class BackboneTally:
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


# torchrun ------------------------------------------------------------------------------------

def world_size():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_ranks(out, device, overwrite, identity):
    """Under torchrun (WORLD_SIZE > 1): join the process group, each process on its own GPU
    (Ranks.device); returns a Ranks, else None. identity: what a ledger must match to be resumed."""
    if world_size() <= 1:
        return None
    import torch.distributed as dist

    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # a rank waits at the end of every attack for the others' chunks: no short timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    if overwrite and dist.get_rank() == 0:
        shutil.rmtree(out + ".parts", ignore_errors=True)
    dist.barrier()
    # the chunks depend on the number of processes: ledgers of another count do not fit
    return Ranks(out, {**identity, "processes": dist.get_world_size()}, device)


def chained(entries, first, end):
    """Where the ledger entries {first batch: {"end": ...}} starting at `first` stop (at most end):
    a chunk that ran out of GPU memory was recorded in parts, each its own entry."""
    while first < end and str(first) in entries:
        first = entries[str(first)]["end"]
    return first


class Ranks:
    """torchrun: each process attacks its share of a job's chunks into its own ledger
    (OUT.parts/rank<r>.json, after every chunk) and reads all ledgers after each job, so all hold the
    same results; a rerun does only the chunks no rank finished."""

    def __init__(self, out, identity, device):
        import torch.distributed as dist

        self.device = device
        self.dist, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()
        self.dir, self.identity = out + ".parts", identity
        self.mine = self.read(self.path(self.rank)).get("jobs", {})
        # What earlier runs finished, as every rank sees it before any of them writes: the
        # chunks still to do are shared out from this one picture.
        self.before = self.jobs()
        self.dist.barrier()

    def path(self, rank):
        return os.path.join(self.dir, f"rank{rank}.json")

    def read(self, path):
        """A ledger of this configuration, else {} (another configuration's counts for nothing)."""
        try:
            with open(path) as f:
                ledger = json.load(f)
        except (OSError, ValueError, RecursionError):
            return {}
        return ledger if isinstance(ledger, dict) and ledger.get("identity") == self.identity else {}

    def jobs(self):
        """{job key: {first batch of a chunk: its entry}} from every rank's ledger."""
        paths = sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []
        out = {}
        for ledger in [self.read(os.path.join(self.dir, p)) for p in paths if p.endswith(".json")]:
            for key, entries in ledger.get("jobs", {}).items():
                out.setdefault(key, {}).update(entries)
        return out

    def todo(self, key, batches, chunk):
        """This rank's chunks of a job: what no earlier run finished, dealt out in turn."""
        before, left = self.before.get(key, {}), []
        for first, end in balanced_chunks(batches, chunk, self.world):
            first = chained(before, first, end)
            if first < end:
                left.append((first, end))
        return left[self.rank::self.world]

    def write_ledger(self, key, first, entry):
        self.mine.setdefault(key, {})[str(first)] = entry
        write_json({"identity": self.identity, "rank": self.rank, "pid": os.getpid(), "jobs": self.mine},
                   self.path(self.rank))

    def merge(self, key, n_batches):
        """After a job: every rank's chunks of it (all wait for all), in order, as a results.Progress."""
        self.dist.barrier()
        done, entries, i = self.jobs().get(key, {}), [], 0
        while i < n_batches:
            entries.append(done[str(i)])
            i = entries[-1]["end"]
        correct = [c for e in entries for c in e["per_image"]]
        final = None if entries[0]["final"] is None else [c for e in entries for c in e["final"]]
        return Progress(n_batches, correct, final, sum(e["seconds"] for e in entries),
                        sum(e["images"] for e in entries))

    def finish(self):
        """After the last job: the results file holds everything; the ledgers go."""
        self.dist.barrier()
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


# The runner and one job's chunks ---------------------------------------------------------------

@dataclass
class Runner:
    """How evaluate.py's jobs run: into `results`, written to `out` after every chunk (None: kept in
    memory), in chunks of at most `chunk` images (None: one batch at a time); tally: this process's
    backbone passes; fits: per row, the most fixed batches per chunk known to fit in GPU memory."""
    results: Results = field(default_factory=Results)
    out: str = None
    device: torch.device = torch.device("cpu")
    chunk: int = None
    ranks: Ranks = None
    progress: bool = True
    log: Callable = say
    tally: BackboneTally = field(default_factory=BackboneTally)
    fits: dict = field(default_factory=dict)

    def job(self, runs, data, row, name, backbone=None, saver=None):
        """The job `name` of the row named `row` over the fixed batches `data`, resumed from `runs`
        (the row's, or its checks'); backbone: whose forward passes measure its cost."""
        return ChunkJob(self, runs, data, row, name, backbone, saver)

    def save(self):
        """The results as they stand, stamped and written (by rank 0 under torchrun)."""
        if not self.out:
            return
        self.results.updated(processes=None if self.ranks is None else self.ranks.world)
        if self.ranks is None or self.ranks.rank == 0:
            self.results.write(self.out)


class ChunkJob:
    """One job in this process, as the module's docstring runs it."""

    def __init__(self, runner, runs, data, row, name, backbone, saver):
        self.runner, self.runs, self.data, self.row, self.name = runner, runs, data, row, name
        self.backbone, self.saver, self.key = backbone, saver, f"{row}|{name}"
        if saver is not None and not saver.has_parts(runs.batches_done(name)):  # resumed, its images gone
            runs.reset(name)
        if runner.ranks is None:
            self.p = runs.progress(name, data.batches)
            runs.record(name, self.p)
            self.todo = make_chunks(data.batches, self.p.done, runner.chunk)
            self.desc = f"{row} {name}"
        else:
            self.todo = runner.ranks.todo(self.key, data.batches, runner.chunk)
            self.desc = f"{row} {name} (rank {runner.ranks.rank}: {len(self.todo)} chunks)"
        self.current, self.ran_out = None, False

    def __iter__(self):
        batches, todo = self.data.batches, self.todo
        shown = self.runner.progress and (self.runner.ranks is None or self.runner.ranks.rank == 0)
        self.bar = progress_bar(len(batches), self.desc, shown)
        self.bar.update(len(batches) - sum(end - first for first, end in todo))
        try:
            while todo:
                if self.ran_out:  # (here, out of the except: its traceback no longer holds the tensors)
                    torch.cuda.empty_cache()
                    self.ran_out = False
                first, end = todo.pop(0)
                fits = self.runner.fits.get(self.row)
                if fits and end - first > fits:  # this row's size that fits, from an earlier chunk
                    todo[:0] = [(a, min(a + fits, end)) for a in range(first, end, fits)]
                    continue
                self.current, self.t0 = (first, end), time.perf_counter()
                yield self.data.chunk(first, end)
        finally:
            self.bar.close()

    @contextlib.contextmanager
    def fit(self):
        """Around the attack of the chunk just served: its backbone passes counted; out of GPU memory,
        the chunk comes again in halves, a size kept for the row's later chunks (each batch of a chunk
        gets the random numbers it gets alone, so parts give what the whole chunk gives)."""
        first, end = self.current
        try:
            with BackboneCounter(self.backbone) as self.seen:
                yield
        except torch.cuda.OutOfMemoryError:
            if end - first == 1:
                raise
            fits = self.runner.fits[self.row] = (end - first) // 2
            batches = self.data.batches
            images = batches[first + fits][0] - batches[first][0]
            self.runner.log(f"note: {self.row} ran out of GPU memory on {batches[end - 1][1] - batches[first][0]} "
                            f"images at once; chunks of at most {images} from here on (--chunk {images} starts there)")
            self.todo.insert(0, (first, end))
            self.ran_out = True

    def record(self, result):
        """The chunk's result (chunks.ChunkResult) into the results at once (torchrun: this rank's ledger)."""
        (first, end), batches = self.current, self.data.batches
        if self.saver is not None and result.x_adv is not None:
            for i in range(first, end):
                self.saver(i, result.x_adv[batches[i][0] - batches[first][0]:batches[i][1] - batches[first][0]])
        seconds, images = time.perf_counter() - self.t0, self.seen.images
        self.runner.tally.add(images, seconds)
        if self.runner.ranks is not None:
            final = result.final_correct
            self.runner.ranks.write_ledger(self.key, first, {
                "end": end, "per_image": result.correct.int().tolist(),
                "final": None if final is None else final.int().tolist(), "seconds": seconds, "images": images})
        else:
            p = self.p
            p.correct += result.correct.int().tolist()
            if result.final_correct is not None:
                p.final = (p.final or []) + result.final_correct.int().tolist()
            p.done, p.seconds = end, p.seconds + seconds
            p.images = None if p.images is None else p.images + images
            self.runs.record(self.name, p)
            self.runner.save()
            self.bar.set_postfix_str(f"acc {sum(p.correct) / len(p.correct):.1%}")
        self.bar.update(end - first)

    def finish(self):
        """After the last chunk: (torchrun) every rank's chunks into the results; the results written."""
        if self.runner.ranks is not None:
            self.runs.record(self.name, self.runner.ranks.merge(self.key, len(self.data.batches)))
        self.runs.finish(self.name)
        if self.saver is not None:
            self.saver.finish()
        self.runner.save()


# The run's plan: its cost, and a progress line after each job ----------------------------------

class Plan:
    """The jobs a run will do, in order (`names`: (row, job) pairs), on n images each, and what each
    costs now (cost(i) -> catalogue.Cost, backbone passes per image: the images fooled may lower it)."""

    def __init__(self, names, cost, n, runner):
        self.names, self.cost, self.n, self.runner = list(names), cost, n, runner
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

    def seconds_left(self):
        """Seconds the jobs after the k-th take at the rate so far (None: none yet), 1/world per process."""
        rate, world = self.runner.tally.seconds_per_pass, self.runner.ranks.world if self.runner.ranks else 1
        return None if rate is None else self.left(self.k).passes * self.n * rate / world

    def done(self, text, seconds):
        """The progress line after the next job (text: what it found); after the first, the run's
        estimated time at the rate it measured."""
        self.k += 1
        left = self.seconds_left()  # (rough: a pass with gradients, or in a small batch, takes longer)
        eta = "time left not known yet" if left is None else f"about {duration(left)} left"
        width, run = len(str(len(self.names))), time.perf_counter() - self.t0
        self.runner.log(f"[{self.k:>{width}}/{len(self.names)}] {text}   ({seconds:.1f} s; run {duration(run)}, {eta})")
        if self.k == 1 and left is not None and self.k < len(self.names):
            row, job = self.names[0]
            minutes, rate = (run + left) / 60, self.runner.tally.seconds_per_pass
            source = "the clean pass" if job == "clean" else f"{row} {job}"
            about = f"about {minutes:.{0 if minutes >= 10 else 1}f}" if minutes >= 0.1 else "under 0.1"
            self.runner.log(f"estimated time: {about} min (from {source}: "
                            f"{1e3 * rate:.3g} ms per image pass; rough: a pass with gradients takes longer, and "
                            "attacks may stop early)")


# --save-adv -----------------------------------------------------------------------------------

def adv_path(save_dir, row_name, attack):
    """Where --save-adv keeps one attack's adversarial images of one row."""
    return os.path.join(save_dir, f"{row_name.replace('/', '-')}__{attack.replace('/', '_')}.pt")


class AdvStore:
    """--save-adv: a folder that keeps every attack's adversarial images, one file per row and
    attack, with the labels, the subset's indices and the fixed batches."""

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
