"""Evaluate a base model and its HPM head side by side: the Mixed Surrogate Attack and Square.

The paper's protocol (section 3.7, supplementary 6.3), with HPM's batch dependence handled as
docs/evaluation.md defines it:

    python evaluate.py --head head.pt
    python evaluate.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar10 --head head.pt
    python evaluate.py --head head.pt --model mnist_cnn.pt --data mnist_test.npz --checks
    python evaluate.py --model mnist_cnn.pt --dataset mnist --data mnist_test.npz   # base only
    torchrun --nproc-per-node 4 evaluate.py --head head.pt   # 4 GPUs share the batches

Read top to bottom:
1. The models under test (the rows of the table): "base" (the base model, its own FC layer),
   "hpm/batch" (HPM, each image classified with its fixed batch, as in the paper) and
   "hpm/image" (each image as if alone: a per-image model). The surrogates of an HPM row are
   those of the Mixed Surrogate Attack: "fc" (Surrogate 1, the FC oracle), "soft" (Surrogate 2,
   the soft-hybrid model), "ste" (the real model with STE/BPDA gradients) and "mix" (the mean
   of their log-softmaxes, from one backbone pass).
2. The attacks each version runs (VERSIONS): `--version paper` is the paper's protocol exactly;
   `--version strong` (the default) adds APGD-T, flip, 100 steps, every query scored, and in the
   batch context a Square that queries whole batches and the batch as the adversary's.
3. What an attack does to a chunk of fixed batches (attack_chunk): the attack follows its
   surrogate's gradients; every query of a whole fixed batch is scored on the real model
   (strong); every final adversarial batch is re-scored whole.
4. The loop over rows and attacks (evaluate), the worst case per image (update_worst_case),
   the gradient-masking checks (--checks), the report, main.

The subset (25% of the test set, as in the paper) is cut into fixed consecutive batches of the
head's fine-tuning batch size; an image is robust only if correct clean and under every attack.
The results JSON is rewritten after every chunk; the same command resumes. The machinery
(chunks, resume, torchrun, GPU memory, --compile) is in hpmkit/, one line here each.
"""
import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from hpmkit.attacks import QueryScorer, check_adv, fixed_prototype_logits, run_attack
from hpmkit.checks import run_checks
from hpmkit.chunks import batch_loader, chunk_group, chunk_sizes, make_batches
from hpmkit.config import (ADAPTIVE, ALL_ATTACKS, BATCH_ADVERSARY, DEFAULT_CHUNK, HPM_ATTACKS, IDENTITY, ORDER,
                           check_classes, load_subset, open_results, resolve_config)
from hpmkit.gpu import MemoryFit, compile_head
from hpmkit.jobs import AdvSaver, ChunkResult, adv_path, row_store, run_job
from hpmkit.loading import (DATASETS, CLIError, OutLock, WarningCounter, check_images, eps_value,
                            load_models, run_cli, write_json)
from hpmkit.ranks import start_ranks
from hpmkit.report import describe, print_header, print_report, square_note, version_line

# The attacks each version runs on an HPM row ("kind/surrogate"; the base model runs each kind
# once, on itself). Strong adds APGD-T (targeted DLR, RobustBench's standard set), flip, and in
# the batch context the batch as the adversary's: joint, then target on the images left standing.
VERSIONS = {
    "paper": dict(attacks=HPM_ATTACKS, steps=40, score_queries=False),
    "strong": dict(attacks=HPM_ATTACKS[:-1] + ("apgd-t/fc", "apgd-t/mix", "flip/mix", "square",
                                               "joint/soft", "target/mix"), steps=100, score_queries=True),
}


# 1. The models under test and their surrogates --------------------------------------------

class Surrogate(nn.Module):
    """One target of the Mixed Surrogate Attack on an HPM model: x (B, C, H, W) -> logits (B, K).

    "fc": Surrogate 1, the FC oracle; "soft": Surrogate 2, the soft-hybrid model; "ste": the
    real model, with STE (BPDA) gradients; "mix": the mean of the three log-softmaxes, all from
    ONE backbone pass; "fixed" (optional): the clean batch's hybrid prototypes held fixed
    (z_clean: the clean features). group_size: in the batch context, the rows are fixed batches
    of this size (a chunk), each with its own C_batch. scorer: a QueryScorer, which sees the real
    model's logits of every query (computed on the same features: no second backbone pass).
    """

    def __init__(self, model, surrogate="mix", context="batch", group_size=None, scorer=None, z_clean=None):
        super().__init__()
        self.model, self.surrogate, self.context = model, surrogate, context
        self.group_size = group_size if context == "batch" else None
        self.scorer, self.z_clean = scorer, z_clean

    def regroup(self, group_size, scorer):
        """The same surrogate on rows that are fixed batches of group_size, with its own scorer."""
        return Surrogate(self.model, self.surrogate, self.context, group_size, scorer, self.z_clean)

    def alone(self, scorer):
        """The same surrogate on one fixed batch of the chunk, with its own scorer."""
        return self.regroup(None, scorer)

    def forward(self, x):
        z = self.model.features(x)  # (B, D): one backbone pass
        head, kw = self.model.head, dict(context=self.context, group_size=self.group_size)
        if self.surrogate == "mix":  # the three heads in one pass of the head's kernels
            logits = head(z, mode=("fc", "soft", "ste"), **kw)  # (3, B, K)
            real, out = logits[2], logits.log_softmax(dim=2).mean(dim=0)  # (B, K)
        elif self.surrogate == "fixed":
            real, out = None, fixed_prototype_logits(head, z, self.z_clean, self.context, self.group_size)
        else:
            out = head(z, mode=self.surrogate, **kw)
            real = out if self.surrogate == "ste" else None
        if self.scorer is not None:
            with torch.no_grad():
                self.scorer(x, real if real is not None else head(z.detach(), mode="ste", **kw))
        return out


class Scored(nn.Module):
    """A per-image model attacked end to end (it is its own real model), each query scored."""

    def __init__(self, model, scorer=None):
        super().__init__()
        self.model, self.scorer = model, scorer

    def alone(self, scorer):
        return Scored(self.model, scorer)

    def forward(self, x):
        logits = self.model(x)
        if self.scorer is not None:
            self.scorer(x, logits.detach())
        return logits


@dataclass
class ModelUnderTest:
    """A row of the table: the real model, which scores, and the surrogates the attacks follow."""
    name: str  # "base", "dpnp", "hpm/batch" or "hpm/image"
    model: nn.Module  # x -> logits, or the HPMClassifier of an HPM row
    context: str = None  # HPM rows: "batch" or "image"; None: a per-image model, its own surrogate
    backbone: nn.Module = None  # the module whose forward passes measure an attack's cost

    @property
    def per_image(self):
        """False when a prediction depends on the other images of the batch."""
        return self.context != "batch"

    def attack_names(self, attacks):
        """This row's attacks from the HPM list: a per-image model with its own head runs each
        kind once on itself (no suffix, none against HPM's structure); the batch adversary needs
        a batch that decides (the batch context)."""
        if self.context is None:
            return list(dict.fromkeys(a.split("/")[0] for a in attacks if a.split("/")[-1] not in ADAPTIVE
                                      and a != "flip/mix" and a not in BATCH_ADVERSARY))
        return [a for a in attacks if not self.per_image or a not in BATCH_ADVERSARY]

    def surrogate(self, name, group_size=None, scorer=None, x=None):
        """The module attacked for surrogate `name` (None: the model itself), on a chunk of fixed
        batches of group_size; x: the clean images (the "fixed" surrogate needs them)."""
        if self.context is None:
            return Scored(self.model, scorer)
        z_clean = None
        if name == "fixed":
            with torch.no_grad():
                z_clean = self.model.features(x)
        return Surrogate(self.model, name or "ste", self.context, group_size, scorer, z_clean)

    def real(self, group_size=None):
        """The real model, which scores every adversarial batch (not attacked: no scorer)."""
        return self.surrogate("ste" if self.context else None, group_size)

    def plan(self, attack):
        """(surrogate name, whole_batch): AutoAttack's standard path (perturb) only where it is
        exact, an end-to-end attack on a per-image model; all else on the whole batch."""
        surrogate = attack.split("/")[1] if "/" in attack else None
        if attack == "square":  # black-box, on the real model
            surrogate = "ste" if self.context else None
        return surrogate, not self.per_image or surrogate not in (None, "ste")


def build_rows(base_model, hpm_model=None, contexts=("batch", "image"), dpnp_model=None):
    """The rows: "base" always; "dpnp" for a DPNP model (per-image, attacked like the base
    model); "hpm/<context>" for each context when an HPM model is given."""
    rows = [ModelUnderTest("base", base_model, backbone=base_model)]
    if dpnp_model is not None:
        rows.append(ModelUnderTest("dpnp", dpnp_model, backbone=dpnp_model.base_model))
    for ctx in contexts if hpm_model is not None else ():
        rows.append(ModelUnderTest(f"hpm/{ctx}", hpm_model, ctx, backbone=hpm_model.base_model))
    return rows


@torch.no_grad()
def score(model, x, y):
    """Correctness (B,) bool of the whole batch x classified together; non-finite logits count wrong."""
    logits = model(x)
    return (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1), logits


# 3. What an attack does to a chunk of fixed batches ----------------------------------------

def attack_chunk(row, attack, xb, yb, sizes, *, norm, eps, steps, queries, seed, warnings=None,
                 score_queries=False, restarts=1, standing=None):
    """The attack on fixed batches of these sizes, xb (n, C, H, W) in [0, 1] with labels yb:
    it follows its surrogate's gradients (or, Square, the real model's outputs); with
    score_queries, every query that is a whole fixed batch inside the ball is scored on the real
    model; every final adversarial batch is re-scored whole. An image is fooled if any scored
    batch fooled it. standing: the images no attack has fooled yet (n,) bool (for "target")."""
    group = sizes[0] if len(sizes) > 1 else None  # a chunk: the rows are fixed batches of this size
    scored = score_queries or attack in BATCH_ADVERSARY  # the batch adversary reads its scores
    scorer = QueryScorer(xb, yb, norm, eps, group_size=group) if scored else None
    surrogate, whole_batch = row.plan(attack)
    target = row.surrogate(surrogate, group, scorer, xb)
    helpers = {}
    if attack.startswith("flip/"):  # the FC oracle it flips, and the real model's runner-up
        helpers = dict(fc=row.surrogate("fc", group, scorer), real=row.real(group))
    runs = run_attack(attack, target, xb, yb, norm=norm, eps=eps, steps=steps, queries=queries,
                      seed=seed, whole_batch=whole_batch, warnings=warnings, restarts=restarts,
                      fixed_batch_square=score_queries, sizes=sizes, standing=standing, **helpers)
    correct = torch.ones_like(yb, dtype=torch.bool)
    for x_adv in runs:  # the last run's batch is the one kept
        x_adv = check_adv(x_adv, xb, norm, eps)
        c_final = score(row.real(group), x_adv, yb)[0]
        correct &= c_final
    if scorer is None:
        return ChunkResult(correct, x_adv)
    return ChunkResult(correct & scorer.robust, x_adv, c_final)


# 4. The loop over rows and attacks ---------------------------------------------------------

class EvaluationError(Exception):
    """The models cannot be evaluated on these images (main says it in one line)."""


def evaluate(rows, x, y, *, attacks=HPM_ATTACKS, norm="Linf", eps, steps=40, queries=5000,
             batch_size=64, seed=0, results=None, on_update=None, save_adv=None, indices=None,
             device="cpu", progress=True, log=print, score_queries=False, restarts=1, chunk=None,
             ranks=None, fit=None):
    """Clean and robust accuracy of every row on images x (N, C, H, W; uint8 or float in [0, 1])
    with labels y (N,), cut into consecutive batches of `batch_size`, attacked `chunk` images
    (whole batches) at a time (None: one batch at a time); ranks: a Ranks (torchrun) or None;
    fit: a gpu.MemoryFit (shared with the checks).

    results: the dict to fill (and to resume from: finished batches are skipped); on_update()
    is called after every chunk. Returns results with results["base"], results["hpm"][ctx],
    each {"clean", "attacks": {name: accuracy}, "worst_case", "correct": {name: [0/1, ...]}, ...}.
    """
    results = {} if results is None else results
    fit = fit or MemoryFit(log)
    batches = make_batches(len(y), batch_size)
    indices = list(range(len(y))) if indices is None else indices
    batch = batch_loader(x, y, batches, device)
    setting = dict(norm=norm, eps=eps, steps=steps, queries=queries, seed=seed,
                   score_queries=score_queries, restarts=restarts)
    job = dict(chunk=chunk, show_progress=progress, on_update=on_update, ranks=ranks)

    for row in rows:
        store = row_store(results, row.name)

        def clean_chunk(first, end):
            xb, yb = batch(first, end)
            try:
                c, logits = score(row.real(chunk_group(batches, first, end)), xb, yb)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # typically images of the wrong shape for this model
                raise EvaluationError(f"{row.name}: the model cannot classify the images "
                                      f"{tuple(xb.shape[1:])} ({str(e).splitlines()[0]})")
            if not torch.isfinite(logits).all():
                raise EvaluationError(f"{row.name}: the model returned NaN or inf logits on clean "
                                      f"images (batches {first}-{end - 1}); check the model file, "
                                      "the head and the input range")
            return ChunkResult(c)

        if store["batches_done"].get("clean", 0) < len(batches):
            run_job(store, "clean", batches, fit(clean_chunk, row.name, batches), desc=f"{row.name} clean",
                    key=f"{row.name}|clean", **job)
        store["clean"] = sum(store["correct"]["clean"]) / len(y)
        update_worst_case(store)

        for name in row.attack_names(attacks):
            if name in store["attacks"]:
                if save_adv and not os.path.exists(adv_path(save_adv, row.name, name)):
                    log(f"  note: {row.name} {name} finished in an earlier run without --save-adv; "
                        "its adversarial images were not kept")
                continue
            if row.name == "hpm/batch" and name == "square":
                log("  note: " + square_note(score_queries, norm))
            counter = WarningCounter()
            saver = None
            if save_adv:
                saver = AdvSaver(save_adv, row.name, name, y, indices, batches)
                if not saver.has_parts(store["batches_done"].get(name, 0)):  # resumed without parts
                    store["batches_done"][name], store["correct"][name] = 0, []
                    store["timings_s"][name] = 0.0
            standing = torch.tensor(store["correct"]["worst_case"], dtype=torch.bool, device=device)
            correct = run_job(store, name, batches, fit(
                lambda first, end: attack_chunk(row, name, *batch(first, end), chunk_sizes(batches, first, end),
                                                warnings=counter, **setting,
                                                standing=standing[batches[first][0]:batches[end - 1][1]]),
                row.name, batches),
                desc=f"{row.name} {name}", save=saver, backbone=row.backbone, key=f"{row.name}|{name}", **job)
            images = store.get("backbone_images", {}).get(name)
            if images is not None:  # counted over every batch (a file from before the count has none)
                store.setdefault("backbone_passes_per_image", {})[name] = round(images / len(y), 2)
            store["attacks"][name] = sum(correct) / len(correct)
            update_worst_case(store)
            if saver is not None:
                saver.finish()
            if on_update is not None:
                on_update()
            log(f"  {row.name:<10} {name:<14} {store['attacks'][name]:7.2%}   worst case "
                f"{store['worst_case']:7.2%}   ({store['timings_s'][name]:.1f} s)")
            if counter.counts:  # one line per attack, not one warning per batch
                store.setdefault("library_warnings", {})[name] = counter.summary()
                log(f"  {'':<10} {name:<14} AutoAttack warned: {counter.summary()}")
    return results


def update_worst_case(store):
    """Worst case over clean and every finished attack of a row's results, per image and overall.
    Also puts the row's attacks in the canonical order, whatever order the runs took."""
    for key in ("attacks", "correct", "batches_done", "timings_s"):
        store[key] = dict(sorted(store[key].items(), key=lambda kv: ORDER.index(kv[0])))
    if store["clean"] is None:
        return
    finished = ["clean"] + list(store["attacks"])
    worst = [int(all(v)) for v in zip(*(store["correct"][k] for k in finished))]
    store["correct"]["worst_case"] = worst
    store["worst_case"] = sum(worst) / len(worst)


# The script --------------------------------------------------------------------------------

def main(args):
    """Evaluate as the flags say; returns the results dict (also written to --out)."""
    cfg, ckpt = resolve_config(args, VERSIONS)
    device = cfg["device"]
    ranks = start_ranks(cfg["out"], device, cfg["overwrite"], {k: cfg[k] for k in IDENTITY + ("chunk",)})
    if ranks is not None:  # torchrun: each process on its own GPU, one log (rank 0's)
        device = ranks.device
        if ranks.rank != 0:
            sys.stdout = open(os.devnull, "w")
    held = contextlib.ExitStack()
    if ranks is None or ranks.rank == 0:  # one run writes --out at a time
        held.enter_context(OutLock(cfg["out"]))
    try:
        if ckpt is not None and ckpt.get("finished") is False:
            print(f"warning: {cfg['head']} is an unfinished head (fine-tuning was interrupted after "
                  f"{len(ckpt.get('history', []))} epoch(s)); its numbers are not those of a trained head")
        base, hpm_model, dpnp_model, num_classes = load_models(cfg, ckpt, device)  # frozen
        check_classes(cfg["attacks"], num_classes)
        if cfg["compile"] and hpm_model is not None:
            compile_head(hpm_model.head)
            print("the HPM head runs through torch.compile (--compile): the first call of each mode, "
                  "context and batch shape compiles")
        x, y, idx, n_total, cfg["n_examples"] = load_subset(cfg, num_classes)
        rows = build_rows(base, hpm_model, cfg["contexts"], dpnp_model)
        for row in rows:  # a model that cannot take these images fails here, before any file is written
            check_images(row.real(), x, device, name=f"{row.name} ({cfg['model']})")
        attacks, banner = cfg["attacks"], version_line(cfg, VERSIONS[cfg["version"]])
        results = open_results(cfg, len(y))  # (a resumed file's config names its earlier attacks too)
        describe(results, cfg, rows, idx, n_total, banner)

        def on_update():
            results["timing"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
            if ranks is None or ranks.rank == 0:  # under torchrun, rank 0 writes the one file
                write_json(results, cfg["out"])

        if ranks is not None:
            results["timing"]["processes"] = ranks.world
        print_header(banner, cfg, rows, len(idx), n_total, device)
        on_update()
        common = dict(norm=cfg["threat_model"], eps=cfg["eps"], steps=cfg["steps"], queries=cfg["queries"],
                      batch_size=cfg["batch_size"], seed=cfg["seed"], on_update=on_update, device=device,
                      progress=not cfg["no_progress"], score_queries=cfg["score_queries"],
                      restarts=cfg["restarts"], chunk=cfg["chunk"], ranks=ranks,
                      fit=MemoryFit(lambda line: print(line, flush=True)))
        try:
            evaluate(rows, x, y, attacks=attacks, results=results, save_adv=cfg["save_adv"],
                     indices=idx.tolist(), **common)
            if cfg["checks"]:
                run_checks(rows, x, y, results, attack_chunk, checks_n=cfg["checks_n"],
                           tol=cfg["checks_tol"], **common)
        except EvaluationError as e:
            raise CLIError(str(e))
        results["complete"] = True
        on_update()
        if ranks is not None:
            ranks.finish()
        print_report(results, rows, cfg)
        return results
    finally:
        held.close()
        if ranks is not None:
            if ranks.rank != 0:
                sys.stdout.close()
                sys.stdout = sys.__stdout__
            ranks.dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", help="head checkpoint written by finetune.py (model, dataset, threat "
                   "model and batch size are read from it); without it only the base model is evaluated")
    p.add_argument("--model", help="RobustBench model name or a pickled nn.Module file "
                   "(default: the checkpoint's)")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="default: the checkpoint's")
    p.add_argument("--threat-model", choices=["Linf", "L2"], help="the attacks' norm, and the "
                   "RobustBench list a model name is looked up in (default: the checkpoint's, else Linf)")
    p.add_argument("--eps", type=eps_value, help="attack budget, a number or a fraction like 8/255 "
                   "(default: Linf 8/255 CIFAR, 4/255 ImageNet, 0.3 MNIST; L2 0.5 CIFAR, 3.0 "
                   "ImageNet, 2.0 MNIST)")
    p.add_argument("--data", help="local test set .npz (x: uint8 N x C x H x W, y: int N) "
                   "instead of the dataset's own loader")
    p.add_argument("--data-dir", default="./data",
                   help="where torchvision datasets / ImageNet live (default ./data)")
    p.add_argument("--model-dir", default="./models", help="RobustBench model cache (default ./models)")
    p.add_argument("--per-class", type=int, help="images per class (default: 5 for ImageNet "
                   "validation, as in the paper; all otherwise)")
    p.add_argument("--n-examples", type=int, help="size of the fixed evaluation subset (default: "
                   "25%% of the test set, as in the paper; ImageNet: all of the 5-per-class subset)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that fixes the subset (default 0)")
    p.add_argument("--batch-size", type=int, help="fixed batch size B of the batch context "
                   "(default: the checkpoint's fine-tuning batch size, else 64; 1 = per-image model)")
    p.add_argument("--contexts", help="HPM contexts to evaluate (default batch,image; image for an "
                   "NCM head, which has no batch prototypes)")
    p.add_argument("--version", choices=sorted(VERSIONS), default="strong",
                   help="strong (default): the paper's attacks plus APGD-T, 100 steps, every query "
                        "scored; paper: the paper's protocol exactly (MSA with APGD-CE/DLR, 40 steps, "
                        "Square)")
    p.add_argument("--attacks", help="comma list from " + ", ".join(ALL_ATTACKS) + " (a bare "
                   "apgd-ce, apgd-dlr or apgd-t = all four surrogates); the base model runs each "
                   "kind once (default: the version's)")
    p.add_argument("--steps", type=int,
                   help="APGD iterations (default: the version's, paper 40, strong 100)")
    p.add_argument("--queries", type=int, default=5000, help="Square queries (default 5000)")
    p.add_argument("--restarts", type=int, default=1, help="random restarts of APGD-CE, -DLR and "
                   "-CW, each from its own random start (default 1, as the paper and AutoAttack)")
    p.add_argument("--seed", type=int, default=0, help="attack seed, the same for every batch (default 0)")
    p.add_argument("--chunk", type=int, help="images attacked at once: whole fixed batches, each "
                   "with its own batch prototypes and the random numbers it gets alone (default "
                   f"{DEFAULT_CHUNK['cuda']} on a GPU, {DEFAULT_CHUNK['cpu']} on the CPU; halved by itself "
                   "if the GPU runs out of memory)")
    p.add_argument("--compile", action="store_true", help="run the HPM head through torch.compile "
                   "(opt-in: fewer, larger kernels where the head's many small ones show, at small "
                   "batches on a GPU; each mode, context and batch shape compiles once, seconds each)")
    p.add_argument("--checks", action="store_true", help="run the gradient-masking checks")
    p.add_argument("--checks-n", type=int, default=512,
                   help="images (first of the subset) for --checks (default 512)")
    p.add_argument("--checks-tol", type=float, default=0.02,
                   help="accuracy difference tolerated by the checks, at least one image (default 0.02)")
    p.add_argument("--out", help="results JSON, rewritten after every chunk; rerun to resume "
                   "(default: HEAD.eval.json, or eval.json without --head)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds results "
                   "of another configuration")
    p.add_argument("--save-adv", metavar="DIR", help="keep every attack's adversarial images "
                   "(float tensors, one file per row and attack)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (a redirected log gets none anyway, only periodic lines)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args, interrupted="interrupted: run the same command again to resume"))
