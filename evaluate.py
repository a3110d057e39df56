"""Evaluate a base model and its HPM head side by side: the Mixed Surrogate Attack and Square.

The paper's protocol (section 3.7, supplementary 6.3), with HPM's batch dependence handled as
docs/evaluation.md defines it:

    python evaluate.py --head head.pt            # a head on a RobustBench model
    python evaluate.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar10 --head head.pt
    python evaluate.py --head head.pt --model mnist_cnn.pt --data mnist_test.npz --checks
    python evaluate.py --model mnist_cnn.pt --dataset mnist --data mnist_test.npz   # base only
    python evaluate.py --head head.pt --model mynet.py:MyNet --data my_test.npz   # your own model and data
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
4. The loop (evaluate): for each row its clean pass, then each attack; for each chunk of whole
   fixed batches, attack, score, record. The worst case per image (results.py), the
   gradient-masking checks (run_checks, the same loop on the checks' attacks), the report, main.

The subset (25% of the test set, as in the paper) is cut into fixed consecutive batches of the
head's fine-tuning batch size; an image is robust only if correct clean and under every attack.
The results JSON is rewritten after every chunk; the same command resumes. When the run ends,
OUT.md (the final tables) and OUT.png (every row's accuracy per attack) are written beside it.
The machinery the loop uses (resume, torchrun, GPU memory) is hpmkit/engine.py's; --compile is
one line in run (models.compile_head).

One batch through an MSA attack (apgd-ce/mix), hop by hop:
main -> run -> evaluate (the loop, this file) -> attack_chunk (this file) -> attacks.run_attack
(hpmkit/attacks.py) -> [AutoAttack's APGDAttack.attack_single_run] -> Surrogate.forward (this file)
-> HPMHead.forward (hpm.py), every query's real logits to the QueryScorer (hpmkit/batch_attacks.py).
"""
import contextlib
import os
import sys
from dataclasses import replace

import torch
import torch.nn as nn

from hpmkit.api import object_config
from hpmkit.attacks import check_adv, fixed_prototype_logits, run_attack, run_k_of_b
from hpmkit.autoattack import WarningCounter
from hpmkit.batch_attacks import QueryScorer, attacker_slots
from hpmkit.catalogue import ALL_ATTACKS, CATALOGUE, CONTEXTS, HPM_ATTACKS, Cost, Setting, check_classes
from hpmkit.checkpoint import Models, count_classes, load_models, object_models
from hpmkit.checks import Checks, check_eps, check_runs, judge
from hpmkit.chunks import ChunkResult, FixedBatches
from hpmkit.cli import ArgumentParser, CLIError, eps_value, run_cli
from hpmkit.config import (CHECKS_DEFAULTS, DEFAULT_CHUNK, EPS_DEFAULTS, MAX_ORDERS, PAPER_BATCH_SIZE, VAL_PER_CLASS,
                           header_lines, identity, load_subset, open_results, resolve_config)
from hpmkit.data import DATASETS
from hpmkit.engine import AdvStore, Plan, Runner, start_ranks
from hpmkit.files import OutLock
from hpmkit.models import as_given, check_images, compile_head
from hpmkit.report import (check_beside, describe, print_header, print_report, square_note, version_line,
                           write_beside)

# The attacks each version runs on an HPM row ("kind/surrogate"; the base model runs each kind
# once, on itself), and how it scores. Strong adds APGD-T (targeted DLR, RobustBench's standard
# set), flip, and in the batch context the batch as the adversary's: joint, then target on the
# images left standing; every query of a whole fixed batch is scored, and Square queries whole
# fixed batches.
VERSIONS = {
    "paper": dict(attacks=HPM_ATTACKS, steps=40, score_queries=False, fixed_batch_square=False),
    "strong": dict(attacks=HPM_ATTACKS[:-1] + ("apgd-t/fc", "apgd-t/mix", "flip/mix", "square",
                                               "joint/soft", "target/mix"), steps=100, score_queries=True,
                   fixed_batch_square=True),
}


# 1. The models under test and their surrogates --------------------------------------------

class Surrogate(nn.Module):
    """One target of the Mixed Surrogate Attack on an HPM model: x (B, C, H, W) -> logits (B, K).

    "fc": Surrogate 1, the FC oracle; "soft": Surrogate 2, the soft-hybrid model; "ste": the
    real model, with STE (BPDA) gradients; "mix": the mean of the three log-softmaxes, all from
    ONE backbone pass; "fixed" (optional): the clean batch's hybrid prototypes held fixed
    (z_clean: the clean features). batch_size: in the batch context, the rows are fixed batches
    of this size (a chunk), each with its own C_batch. scorer: a QueryScorer, which sees the real
    model's logits of every query (computed on the same features: no second backbone pass).
    """

    def __init__(self, model, surrogate="mix", context="batch", batch_size=None, scorer=None, z_clean=None):
        super().__init__()
        self.model, self.surrogate, self.context = model, surrogate, context
        self.batch_size = batch_size if context == "batch" else None
        self.scorer, self.z_clean = scorer, z_clean

    def regroup(self, batch_size, scorer):
        """The same surrogate on rows that are fixed batches of batch_size, with its own scorer."""
        return Surrogate(self.model, self.surrogate, self.context, batch_size, scorer, self.z_clean)

    def alone(self, scorer):
        """The same surrogate on one fixed batch of the chunk, with its own scorer."""
        return self.regroup(None, scorer)

    def forward(self, x):
        z = self.model.features(x)  # (B, D): one backbone pass
        head, kw = self.model.head, dict(context=self.context, group_size=self.batch_size)
        if self.surrogate == "mix":  # the three heads in one pass of the head's kernels
            logits = head(z, mode=("fc", "soft", "ste"), **kw)  # (3, B, K)
            real, out = logits[2], logits.log_softmax(dim=2).mean(dim=0)  # (B, K)
        elif self.surrogate == "fixed":
            real, out = None, fixed_prototype_logits(head, z, self.z_clean, self.context, self.batch_size)
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


class ModelUnderTest:
    """A row of the table: the real model, which scores, and the surrogates the attacks follow.

    name: "base", "dpnp", "hpm/batch", "hpm/image" or "hpm/attackers-K"; model: x -> logits, or the
    HPMClassifier of an HPM row; context: HPM rows' "batch" or "image" (None: a per-image model, its
    own surrogate); backbone: whose forward passes measure an attack's cost; attackers: K of B, the
    attacker's last K slots of every fixed batch, within attacker_eps (None: the attacker holds all)."""

    def __init__(self, name, model, context=None, backbone=None, attackers=None, attacker_eps=None):
        self.name, self.model, self.context, self.backbone = name, model, context, backbone
        self.attackers, self.attacker_eps = attackers, attacker_eps

    @property
    def per_image(self):
        """False when a prediction depends on the other images of the batch."""
        return self.context != "batch"

    def attacks(self, names):
        """This row's attacks (catalogue records) from the HPM list `names`: a per-image model with
        its own head runs each kind once on itself (none against HPM's structure); the batch
        adversary needs a batch that decides (the batch context)."""
        attacks = [CATALOGUE[a] for a in names]
        if self.attackers:
            return [a for a in attacks if a.runs_on == "attackers"]
        attacks = [a for a in attacks if a.runs_on != "attackers"]
        if self.context is None:
            return list(dict.fromkeys(CATALOGUE[a.kind] for a in attacks if a.runs_on == "all"))
        return [a for a in attacks if a.runs_on != "batch" or not self.per_image]

    def surrogate(self, name, batch_size=None, scorer=None, x=None):
        """The module attacked for surrogate `name` ("fc", "soft", "ste", "mix", "fixed"), on a chunk
        of fixed batches of batch_size; x: the clean images (the "fixed" surrogate needs them). An
        attack without a surrogate (None: Square, a per-image model's own) attacks the real model."""
        if name is None or self.context is None:
            return self.real(batch_size, scorer)
        z_clean = None
        if name == "fixed":
            with torch.no_grad():
                z_clean = self.model.features(x)
        return Surrogate(self.model, name, self.context, batch_size, scorer, z_clean)

    def real(self, batch_size=None, scorer=None):
        """The real model, which scores every adversarial batch (no scorer), on a chunk of fixed
        batches of batch_size; with a scorer, attacked itself, every query scored."""
        if self.context is None:
            return Scored(self.model, scorer)
        return Surrogate(self.model, "ste", self.context, batch_size, scorer)

    def whole_batch(self, attack):
        """AutoAttack's standard path (perturb) only where it is exact, an end-to-end attack on a
        per-image model; all else on the whole batch."""
        return not self.per_image or attack.surrogate not in (None, "ste")


def build_rows(base_model, hpm_model=None, contexts=("batch", "image"), dpnp_model=None, attackers=(),
               attacker_eps=None):
    """The rows: "base" always; "dpnp" for a DPNP model (per-image, attacked like the base
    model); "hpm/<context>" for each context when an HPM model is given, and "hpm/attackers-K"
    for each K of `attackers` (the batch context, K slots of each batch the attacker's)."""
    rows = [ModelUnderTest("base", base_model, backbone=base_model)]
    if dpnp_model is not None:
        rows.append(ModelUnderTest("dpnp", dpnp_model, backbone=dpnp_model.base_model))
    for ctx in contexts if hpm_model is not None else ():
        rows.append(ModelUnderTest(f"hpm/{ctx}", hpm_model, ctx, backbone=hpm_model.base_model))
    for K in attackers if hpm_model is not None else ():
        rows.append(ModelUnderTest(f"hpm/attackers-{K}", hpm_model, "batch", hpm_model.base_model, K, attacker_eps))
    return rows


@torch.no_grad()
def score(model, x, y):
    """Correctness (B,) bool of the whole batch x classified together; non-finite logits count wrong."""
    logits = model(x)
    return (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1), logits


# 3. What an attack does to a chunk of fixed batches ----------------------------------------

def attack_chunk(row, attack, chunk, setting, warnings=None, standing=None):
    """The attack (a catalogue record) on a chunk of fixed batches (chunks.Chunk), as 3. above says;
    an image is fooled if any scored batch fooled it. standing: the images no attack has fooled yet
    (n,) bool (for "target" and "benign:victim"). K of B (row.attackers): the attack moves the
    attacker's slots alone, within the attacker's budget; a query counts only if its benign images
    are exactly the clean ones."""
    B, held, frozen = chunk.grouped_by, None, None
    if row.attackers:
        held = attacker_slots(chunk.sizes, row.attackers).to(chunk.x.device)
        setting, frozen = replace(setting, eps=row.attacker_eps), ~held
    scored = setting.score_queries or attack.reads_scores  # the batch adversary and K of B read their scores
    scorer = QueryScorer(chunk.x, chunk.y, setting.norm, setting.eps, B, frozen) if scored else None
    model = row.surrogate(attack.surrogate, B, scorer, chunk.x)
    helpers = None
    if attack.kind == "flip":  # the FC oracle it flips, and the real model's runner-up
        helpers = dict(fc=row.surrogate("fc", B, scorer), real=row.real(B))
    if held is None:
        runs = run_attack(attack, model, chunk, setting, whole_batch=row.whole_batch(attack), warnings=warnings,
                          standing=standing, helpers=helpers)
    else:
        runs = run_k_of_b(attack, model, chunk, setting, held, standing, warnings)
    correct = torch.ones_like(chunk.y, dtype=torch.bool)
    for x_adv in runs:  # the last run's batch is the one kept
        x_adv = check_adv(x_adv, chunk.x, setting.norm, setting.eps, frozen)
        c_final = score(row.real(B), x_adv, chunk.y)[0]
        correct &= c_final
    if scorer is None:
        return ChunkResult(correct, x_adv)
    return ChunkResult(correct & scorer.robust, x_adv, c_final)


def clean_chunk(row, chunk):
    """The clean pass on a chunk of fixed batches (chunks.Chunk), each fixed batch classified whole."""
    try:
        c, logits = score(row.real(chunk.grouped_by), chunk.x, chunk.y)
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:  # typically images of the wrong shape for this model
        raise EvaluationError(f"{row.name}: the model cannot classify the images "
                              f"{tuple(chunk.x.shape[1:])} ({str(e).splitlines()[0]})")
    if not torch.isfinite(logits).all():
        raise EvaluationError(f"{row.name}: the model returned NaN or inf logits on clean images "
                              f"(images {chunk.span.start}-{chunk.span.stop - 1} of the subset); check the model "
                              "file, the head and the input range")
    return ChunkResult(c)


# 4. The loop over rows and attacks ---------------------------------------------------------

class EvaluationError(Exception):
    """The models cannot be evaluated on these images (main says it in one line)."""


def evaluate(rows, attacks, data, setting, runner=None, adv=None, classes=None):
    """Clean and robust accuracy of every row under `attacks` (names from the HPM list) on the
    fixed batches `data` (chunks.FixedBatches), attacked as `setting` (catalogue.Setting) says, into
    runner.results (engine.Runner; resumed where they left off); adv: --save-adv's engine.AdvStore;
    classes: APGD-T's targets in the cost estimate (None: at most 9). Returns the results."""
    runner = runner or Runner()
    results = runner.results
    todo = [(row, attack) for row in rows for attack in [None] + row.attacks(attacks)
            if not results.row(row.name).finished(attack.name if attack else "clean")]

    def cost(i):  # backbone passes per image now (target's copies: one per image still standing)
        row, attack = todo[i]
        if attack is None:
            return Cost(1)
        standing = results.row(row.name).worst_case
        return attack.cost(setting, data.batch_size, classes, row.whole_batch(attack),
                           1.0 if standing is None else standing)

    plan = Plan([(row.name, attack.name if attack else "clean") for row, attack in todo], cost, len(data), runner)
    w = max(len(row.name) for row in rows)  # (the rows' names aligned in the progress lines)
    for line in plan.estimate():
        runner.log(line)
    for row in rows:
        rr = results.row(row.name)
        if row.attackers:  # who holds which image: the per-image records split into own and benign
            rr.set_attacker_slots(attacker_slots([b - a for a, b in data.batches], row.attackers).int().tolist())
        if not rr.finished("clean"):
            job = runner.job(rr, data, row.name, "clean", row.backbone)
            for chunk in job:  # chunks of whole fixed batches, from where the results left off
                with job.fit():  # out of GPU memory: this chunk again, in halves
                    job.record(clean_chunk(row, chunk))
            job.finish()
            plan.done(f"{row.name:<{w}}  {'clean':<14} {rr.clean:7.2%}", rr.seconds("clean"))

        for attack in row.attacks(attacks):
            name = attack.name
            if rr.finished(name):
                if adv is not None and not adv.has(row.name, name):
                    runner.log(f"  note: {row.name} {name} finished in an earlier run without --save-adv; "
                               "its adversarial images were not kept")
                continue
            if row.name == "hpm/batch" and attack.kind == "square":
                runner.log("  note: " + square_note(setting))
            counter = WarningCounter()
            standing = torch.tensor(rr.correct("worst_case"), dtype=torch.bool, device=runner.device)
            saver = None if adv is None else adv.saver(row.name, name)  # --save-adv
            job = runner.job(rr, data, row.name, name, row.backbone, saver)
            for chunk in job:
                with job.fit():
                    job.record(attack_chunk(row, attack, chunk, setting, counter, standing[chunk.span]))
            job.finish()
            if row.attackers:  # K of B: the attacker's own images and the benign ones
                found = (f"{row.name:<{w}}  {name:<18} own {rr.by_role(name, 'own'):7.2%}  benign "
                         f"{rr.by_role(name, 'benign'):7.2%}   worst case own {rr.own:7.2%}  benign {rr.benign:7.2%}")
            else:
                found = f"{row.name:<{w}}  {name:<14} {rr.accuracy(name):7.2%}   worst case {rr.worst_case:7.2%}"
            plan.done(found, rr.seconds(name))
            if counter.counts:  # one line per attack, not one warning per batch
                rr.set_warnings(name, counter.summary())
                runner.log(f"{'':<{w + 10}}{name:<14} AutoAttack warned: {counter.summary()}")
    return results


def run_checks(rows, data, setting, runner, checks):
    """--checks (hpmkit/checks.py: what they attack and how they judge): each row's check attacks
    on the first checks.n images of the same fixed batches, run as evaluate's loop runs an attack,
    then the row judged; the results in runner.results."""
    part = data.first(min(checks.n, len(data)))
    sweep = check_eps(setting, data)
    for row in rows:
        if row.attackers:  # its checks are those of hpm/batch: the same model
            continue
        rr = runner.results.row(row.name)
        runs = rr.check_runs(len(part))
        for check in check_runs(row.name, setting, sweep):
            if runs.finished(check.key):
                continue
            job = runner.job(runs, part, row.name, check.key)
            for chunk in job:
                with job.fit():
                    job.record(attack_chunk(row, check.attack, chunk, check.setting, WarningCounter()))
            job.finish()
        judge(row, rr, data, setting, sweep, checks)
        runner.save()


# The script --------------------------------------------------------------------------------

def main(args):
    """Evaluate as the flags say; returns the results (a results.Results, also written to --out)."""
    cfg, ckpt = resolve_config(args, VERSIONS)
    check_beside(cfg.out)  # OUT.md and OUT.png: absent or evaluate.py's own
    ranks = start_ranks(cfg.out, cfg.device, cfg.overwrite, {**identity(cfg), "chunk": cfg.chunk})
    if ranks is not None:  # torchrun: each process on its own GPU, one log (rank 0's)
        cfg = replace(cfg, device=ranks.device)
        if ranks.rank != 0:
            sys.stdout = open(os.devnull, "w")
    held = contextlib.ExitStack()
    if ranks is None or ranks.rank == 0:  # one run writes --out at a time
        held.enter_context(OutLock(cfg.out))
    try:
        if ckpt is not None and ckpt.get("finished") is False:
            print(f"warning: {cfg.head} is an unfinished head (fine-tuning was interrupted after "
                  f"{len(ckpt.get('history', []))} epoch(s)); its numbers are not those of a trained head")
        models = load_models(cfg, ckpt, cfg.device)  # frozen
        x, y, idx, n_total, n = load_subset(cfg, models.num_classes)
        cfg = replace(cfg, n_examples=n)  # (when left out, the paper's 25% of the test set)
        return run(cfg, models, (x, y, idx, n_total), ranks, header_lines(args, cfg, ckpt))
    finally:
        held.close()
        if ranks is not None:
            if ranks.rank != 0:
                sys.stdout.close()
                sys.stdout = sys.__stdout__
            ranks.dist.destroy_process_group()


def run(cfg, models, subset, ranks=None, header=()):
    """The protocol as cfg says on loaded models (checkpoint.Models) and the fixed subset (x, y, its
    indices in the test set, the test set's size), written to cfg.out after every chunk (None: kept in
    memory); ranks: torchrun's processes; header: where eps and the batch size came from."""
    base, hpm_model, dpnp_model, num_classes = models.base, models.hpm, models.dpnp, models.num_classes
    x, y, idx, n_total = subset
    device = cfg.device
    if cfg.compile and hpm_model is not None:
        compile_head(hpm_model.head)
        print("the HPM head runs through torch.compile (--compile): the first call of each mode, "
              "context and batch shape compiles")
    results, cfg = open_results(cfg, len(y))  # (a resumed file's config names its earlier attacks too)
    rows = build_rows(base, hpm_model, cfg.contexts, dpnp_model, cfg.attackers, cfg.attacker_eps)
    for row in rows:  # a model that cannot take these images fails here, before any file is written
        check_images(row.real(), x, device, name=f"{row.name} ({cfg.model})")
    if num_classes is None:  # the base model alone: no final nn.Linear needed, its logits say
        num_classes = count_classes(base, x, y, device, cfg.data or cfg.dataset)
    check_classes(cfg.attacks, num_classes)
    setting, banner = cfg.setting, version_line(cfg, VERSIONS[cfg.version], rows)
    describe(results, cfg, setting, rows, idx, n_total, banner)

    print_header(banner, cfg, rows, len(idx), n_total, device)
    for line in header:
        print(line)
    data = FixedBatches(x, y, cfg.batch_size, device)
    runner = Runner(results, cfg.out, device, cfg.chunk, ranks, progress=not cfg.no_progress)
    runner.save()
    adv = AdvStore(cfg.save_adv, y, idx.tolist(), data.batches) if cfg.save_adv else None
    try:
        evaluate(rows, cfg.attacks, data, setting, runner, adv, num_classes)
        if cfg.checks:
            run_checks(rows, data, setting, runner, Checks(cfg.checks_n, cfg.checks_tol, cfg.context_orders))
    except EvaluationError as e:
        raise CLIError(str(e))
    results.finished()
    runner.save()
    if ranks is not None:
        ranks.finish()
    if cfg.out and (ranks is None or ranks.rank == 0):
        write_beside(results, rows, cfg)
    print_report(results, rows, cfg, setting)
    return results


def evaluate_model(model, x, y, head=None, **flags):
    """hpmkit.api.evaluate (its docstring says the arguments): the protocol on Python objects. The
    models are moved to the device for the run and left as they were given, also on error."""
    with as_given(model, head):
        models = object_models(model, head)
        cfg, subset = object_config(flags, parser(), VERSIONS, models, x, y)
        if cfg.out:
            check_beside(cfg.out)
        models = Models(*(m.to(cfg.device) if isinstance(m, nn.Module) else m for m in models))
        with OutLock(cfg.out) if cfg.out else contextlib.nullcontext():  # one run writes a file at a time
            return run(cfg, models, subset).data


def parse_args(argv=None):
    return parser().parse_args(argv)


def parser():
    """evaluate.py's flags (the Python API reads each value as its flag would be read)."""
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", help="head checkpoint written by finetune.py (dataset, threat model and "
                   "batch size are read from it); data: read without running code, and a model file or code it "
                   "names is not loaded unless given as --model; without it only the base model is evaluated")
    p.add_argument("--model", help="the base model: a RobustBench name, a pickled nn.Module file, or "
                   "FILE.py:NAME or package.module:NAME (NAME a class or a function of no arguments that builds "
                   "it; with --weights). A pickle is unpickled and a .py file imported, which runs code: only "
                   "name files you trust (default: the checkpoint's model if it is a RobustBench name; a file or "
                   "code it names must be given here)")
    p.add_argument("--weights", metavar="STATE_DICT.pt", help="with --model FILE.py:NAME: the model's state_dict "
                   "(torch.save(model.state_dict(), path)), read as data (default: the checkpoint's recorded "
                   "weights for a code --model; the base model's fingerprint proves they are the ones it was "
                   "trained on)")
    p.add_argument("--dataset", choices=sorted(DATASETS), help="default: the checkpoint's; without a head and "
                   "with --data alone, your own data (its eps then own data's default)")
    p.add_argument("--threat-model", choices=["Linf", "L2"], help="the attacks' norm, and the "
                   "RobustBench list a model name is looked up in (default: the checkpoint's, else Linf)")
    p.add_argument("--eps", type=eps_value, help="attack budget, a number or a fraction like 8/255 "
                   "(default: the head's fine-tuning eps under this norm, else the dataset's: "
                   f"{EPS_DEFAULTS}; the header says which and where it comes from)")
    p.add_argument("--data", metavar="FILE.npz", help="local test set .npz (x: uint8 N x C x H x W, float in "
                   "[0, 1], or grey N x H x W; y: int N) instead of the dataset's own loader; needed for a head "
                   "fine-tuned on own data")
    p.add_argument("--data-dir", default="./data",
                   help="where torchvision datasets / ImageNet live (default %(default)s)")
    p.add_argument("--model-dir", default="./models", help="RobustBench model cache (default %(default)s)")
    p.add_argument("--per-class", type=int, help=f"images per class (default: {VAL_PER_CLASS} for ImageNet "
                   "validation, as in the paper; all otherwise)")
    p.add_argument("--n-examples", type=int, help="size of the fixed evaluation subset (default: "
                   "25%% of the test set, as in the paper; ImageNet: all of the 5-per-class subset)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed that fixes the subset (default %(default)s)")
    p.add_argument("--batch-size", type=int, help="fixed batch size B of the batch context "
                   f"(default: the checkpoint's fine-tuning batch size, else {PAPER_BATCH_SIZE}, the paper's; 1 = "
                   "per-image model; the header says which)")
    p.add_argument("--contexts", help=f"HPM contexts to evaluate (default {','.join(CONTEXTS)}; image for an "
                   "NCM head, which has no batch prototypes)")
    steps = {name: version["steps"] for name, version in VERSIONS.items()}
    p.add_argument("--version", choices=sorted(VERSIONS), default="strong",
                   help=f"strong: the paper's attacks plus APGD-T, {steps['strong']} steps, every query scored; "
                        f"paper: the paper's protocol exactly (MSA with APGD-CE/DLR, {steps['paper']} steps, "
                        "Square) (default %(default)s)")
    p.add_argument("--attacks", help="comma list from " + ", ".join(ALL_ATTACKS) + " (a bare "
                   "apgd-ce, apgd-dlr or apgd-t = all four surrogates); the base model runs each "
                   "kind once (default: the version's)")
    p.add_argument("--steps", type=int, help="APGD iterations (default: the version's, paper "
                   f"{steps['paper']}, strong {steps['strong']})")
    p.add_argument("--queries", type=int, default=Setting.queries, help="Square queries (default %(default)s)")
    p.add_argument("--restarts", type=int, default=Setting.restarts, help="random restarts of APGD-CE, -DLR "
                   "and -CW, each from its own random start (default %(default)s, as the paper and AutoAttack)")
    p.add_argument("--seed", type=int, default=Setting.seed, help="attack seed, the same for every batch "
                   "(default %(default)s)")
    p.add_argument("--chunk", type=int, help="images attacked at once: whole fixed batches, each "
                   "with its own batch prototypes and the random numbers it gets alone (default "
                   f"{DEFAULT_CHUNK['cuda']} on a GPU, {DEFAULT_CHUNK['cpu']} on the CPU; halved by itself "
                   "if the GPU runs out of memory)")
    p.add_argument("--compile", action="store_true", help="run the HPM head through torch.compile "
                   "(opt-in: fewer, larger kernels where the head's many small ones show, at small "
                   "batches on a GPU; each mode, context and batch shape compiles once, seconds each)")
    p.add_argument("--checks", action="store_true", help="run the gradient-masking checks")
    p.add_argument("--checks-n", type=int, help="--checks: images (first of the subset) for the checks "
                   f"(default {CHECKS_DEFAULTS['checks_n']})")
    p.add_argument("--attackers", metavar="K[,K...]", help="for each K, a row hpm/attackers-K: the attacker "
                   "holds the last K slots of every fixed batch (DIA's convention) among benign, clean images; "
                   "it reports own (the attacker's images misclassified) and benign (the other images "
                   "misclassified through the batch prototypes); 1 <= K < batch size")
    p.add_argument("--attacker-eps", type=eps_value, help="--attackers: the attacker's budget around its natural "
                   "images (default: --eps; 1 under L-inf: any image)")
    p.add_argument("--context-orders", type=int, help="--checks: the subset's batches formed again in this many "
                   f"random orders, 1 to {MAX_ORDERS}; the fraction of clean predictions that change (default "
                   f"{CHECKS_DEFAULTS['context_orders']})")
    p.add_argument("--checks-tol", type=float, help="--checks: accuracy difference tolerated by the checks, at "
                   f"least one image (default {CHECKS_DEFAULTS['checks_tol']})")
    p.add_argument("--out", help="results JSON, rewritten after every chunk; rerun to resume "
                   "(default: HEAD.eval-VERSION.json, or eval.eval-VERSION.json without --head: one file per version)")
    p.add_argument("--overwrite", action="store_true", help="start over even if --out holds results "
                   "of another configuration")
    p.add_argument("--save-adv", metavar="DIR", help="keep every attack's adversarial images "
                   "(float tensors, one file per row and attack)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (a redirected log gets none anyway, only periodic lines)")
    return p


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args, interrupted="interrupted: run the same command again to resume"))
