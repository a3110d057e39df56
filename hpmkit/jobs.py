"""Jobs and resume: an attack (or the clean pass) over all fixed batches of a row, a chunk of
whole batches at a time, its results kept in the results dict after every chunk so that a rerun
of the same command continues where the last one stopped. Also what a job measures (images
through the backbone) and keeps (--save-adv)."""
import os
import time
from dataclasses import dataclass

import torch

from hpmkit.chunks import make_chunks
from hpmkit.loading import atomic_save, progress_bar


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


class BackboneCounter:
    """Context manager: images (rows) that go through `module`'s forward, and how many calls."""

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


def new_store():
    """The results of one row of the table."""
    return {"clean": None, "attacks": {}, "worst_case": None, "correct": {}, "batches_done": {},
            "timings_s": {}}


def row_store(results, name):
    """results["base"], results["dpnp"] or results["hpm"][context] for a row name like "hpm/batch"."""
    if "/" not in name:
        return results.setdefault(name, new_store())
    model, ctx = name.split("/")
    return results.setdefault(model, {}).setdefault(ctx, new_store())


def record(store, name, correct, final, done, seconds, images):
    """A job's results so far into a row's store: per-image correct (0/1 lists), the kept final
    batches' own scores (or None), batches done, seconds and backbone images (None: unknown)."""
    store["correct"][name] = correct
    if final is not None:
        store.setdefault("final_batch_correct", {})[name] = final
    store["batches_done"][name] = done
    store["timings_s"][name] = seconds
    store.setdefault("backbone_images", {})[name] = images


def run_job(store, name, batches, attack_chunk, *, desc, chunk=None, show_progress=True,
            on_update=None, save=None, backbone=None, ranks=None, key=None):
    """Run attack_chunk(first, end) -> ChunkResult over the batches, a chunk of whole fixed
    batches at a time, resuming where store left off; returns the per-image 0/1 list.
    save(i, x_adv): keeps batch i's adversarial images. backbone: the module whose images are
    counted into store["backbone_images"]. ranks: a ranks.Ranks when several processes share
    the work (torchrun); key names the job in their ledgers."""
    if ranks is not None:
        return ranks.run_job(store, name, batches, attack_chunk, desc=desc, chunk=chunk,
                             show_progress=show_progress, backbone=backbone, key=key or name)
    done = store["batches_done"].get(name, 0)
    n_done = batches[done - 1][1] if done else 0
    correct = list(store["correct"].get(name, []))[:n_done]
    final = store.get("final_batch_correct", {}).get(name)
    final = None if final is None else list(final)[:n_done]
    seconds = store["timings_s"].get(name, 0.0)
    # resumed from a file written before the count existed: unknown
    images = 0 if done == 0 else store.get("backbone_images", {}).get(name)
    record(store, name, correct, final, done, seconds, images)
    bar = progress_bar(len(batches), desc, show_progress)
    bar.update(done)
    for first, end in make_chunks(batches, done, chunk):
        t0 = time.perf_counter()
        with BackboneCounter(backbone) as seen:
            result = attack_chunk(first, end)
        if save is not None and result.x_adv is not None:
            for i in range(first, end):
                save(i, result.x_adv[batches[i][0] - batches[first][0]:batches[i][1] - batches[first][0]])
        correct += result.correct.int().tolist()
        if result.final_correct is not None:
            final = (final or []) + result.final_correct.int().tolist()
        seconds += time.perf_counter() - t0
        images = None if images is None else images + seen.images
        record(store, name, correct, final, end, seconds, images)
        bar.set_postfix_str(f"acc {sum(correct) / len(correct):.1%}")
        bar.update(end - first)
        if on_update is not None:
            on_update()
    bar.close()
    return correct


def adv_path(save_dir, row_name, attack):
    """Where --save-adv keeps one attack's adversarial images of one row."""
    return os.path.join(save_dir, f"{row_name.replace('/', '-')}__{attack.replace('/', '_')}.pt")


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
