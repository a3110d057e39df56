"""Several processes on one evaluation (torchrun --nproc-per-node N evaluate.py ...): each
attacks its share of every job's chunks, keeps a ledger, and all end with the same results."""
import datetime
import json
import os
import shutil

import torch

from hpmkit.chunks import balanced_chunks
from hpmkit.files import write_json
from hpmkit.results import Progress


def world_size():
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_ranks(out, device, overwrite, identity):
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on GPUs, gloo on the CPU),
    each process on its own GPU (Ranks.device); returns a Ranks, else None. identity: the
    settings a ledger must match to be resumed."""
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


class Ranks:
    """Several processes on one evaluation (torchrun): each attacks its share of the chunks of
    whole fixed batches (cut so that every process gets as many: balanced_chunks), writes what
    it did to its own ledger (OUT.parts/rank<r>.json, rewritten after every chunk), and after
    each job every process reads all ledgers, so all hold the same results; rank 0 writes the
    results file. A rerun reads the ledgers and does only the chunks no rank finished,
    whichever rank did the others."""

    def __init__(self, out, identity, device):
        import torch.distributed as dist

        self.device = device
        self.dist, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()
        self.dir, self.identity = out + ".parts", identity
        self.mine = self.read(self.path(self.rank)).get("jobs", {})
        # What earlier runs finished, as every rank sees it before any of them writes: the
        # chunks still to do are shared out from this one picture.
        self.before = self.jobs()
        self.barrier()

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

    def ledgers(self):
        paths = sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []
        return [self.read(os.path.join(self.dir, p)) for p in paths if p.endswith(".json")]

    def jobs(self):
        """{job key: {first batch of a chunk: its entry}} from every rank's ledger."""
        out = {}
        for ledger in self.ledgers():
            for key, entries in ledger.get("jobs", {}).items():
                out.setdefault(key, {}).update(entries)
        return out

    def write_ledger(self, key, first, entry):
        self.mine.setdefault(key, {})[str(first)] = entry
        write_json({"identity": self.identity, "rank": self.rank, "pid": os.getpid(), "jobs": self.mine},
                   self.path(self.rank))

    def barrier(self):
        self.dist.barrier()

    def share(self, runs, job, batches, engine):
        """This process's share of a job (jobs.run_job runs it): the chunks no earlier run finished,
        dealt out in turn; each recorded in this rank's ledger, all merged at the end."""
        return RankShare(self, runs, job, batches, engine)

    def finish(self):
        """After the last job: the results file holds everything; the ledgers go."""
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


class RankShare:
    """One rank's share of a job: its chunks (balanced_chunks, every world-th of those no rank
    finished before), each written to its ledger; at the end every rank's, into the results."""

    def __init__(self, ranks, runs, job, batches, engine):
        self.ranks, self.runs, self.name, self.key, self.batches = ranks, runs, job.name, job.key, batches
        self.chunks = balanced_chunks(batches, engine.chunk, ranks.world)
        before = ranks.before.get(job.key, {})
        self.todo = [c for c in self.chunks if str(c[0]) not in before][ranks.rank::ranks.world]
        self.done = len(batches) - sum(end - first for first, end in self.todo)
        self.desc = f"{job.desc} (rank {ranks.rank}: {len(self.todo)} chunks)"
        self.shows_progress = ranks.rank == 0

    def add(self, first, end, result, seconds, images):
        final = result.final_correct
        self.ranks.write_ledger(self.key, first, {
            "end": end, "per_image": result.correct.int().tolist(),
            "final": None if final is None else final.int().tolist(), "seconds": seconds, "images": images})
        return ""

    def finish(self):
        self.ranks.barrier()  # every rank's chunks of this job are in the ledgers
        done = self.ranks.jobs().get(self.key, {})
        entries = [done[str(first)] for first, _ in self.chunks]
        correct = [c for e in entries for c in e["per_image"]]
        final = None if entries[0]["final"] is None else [c for e in entries for c in e["final"]]
        self.runs.record(self.name, Progress(len(self.batches), correct, final, sum(e["seconds"] for e in entries),
                                             sum(e["images"] for e in entries)))
        return correct
