"""Evaluate a base model and its HPM head side by side: the Mixed Surrogate Attack and Square.

The paper's evaluation protocol (section 3.7, supplementary 6.3), with the batch dependence
of HPM handled as SPEC.md section 3 defines it:

    python evaluate.py --head head.pt
    python evaluate.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar10 --head head.pt
    python evaluate.py --head head.pt --model mnist_cnn.pt --data mnist_test.npz --checks
    python evaluate.py --model mnist_cnn.pt --dataset mnist --data mnist_test.npz   # base only
    torchrun --nproc-per-node 4 evaluate.py --head head.pt   # 4 GPUs share the batches (Ranks)

What it does:
- A fixed subset of the test set (`--n-examples`, default 25% of it as in the paper;
  ImageNet: the whole 5-per-class validation subset; `--subset-seed`), sorted and cut into
  fixed consecutive batches of `--batch-size` (default: the head's fine-tuning batch, 64).
- Rows of the table: "base" (the base model with its own FC layer), "hpm/batch" (HPM, each
  image classified together with its batch, as in the paper) and "hpm/image" (HPM, each
  image as if alone in its batch: a per-image model, free of batch composition).
- Attacks (AutoAttack's own implementations): APGD-CE and APGD-DLR against each surrogate
  of the Mixed Surrogate Attack -- "fc" (Surrogate 1, the FC oracle), "soft" (Surrogate 2,
  the soft-hybrid model), "ste" (the real model with its STE/BPDA gradients) and "mix" (the
  mean of their log-softmaxes, all from one backbone pass) -- then Square on the real model.
  The base model is its own surrogate: "apgd-ce", "apgd-dlr", "square".
- `--version paper` is exactly that, with 40 APGD steps (the paper's protocol). `--version
  strong` (the default) adds APGD-T on "fc" and "mix" (and on the base model), the adaptive
  "flip/mix" attack against the batch prototypes, 100 APGD steps, and scores every query an
  attack makes with a whole fixed batch inside the threat model (see NOTES). Options outside
  both: "apgd-cw/*" (Carlini-Wagner margin), "*/fixed" (hybrid prototypes of the clean batch
  held fixed), `--restarts`.
- Every final adversarial batch is re-scored whole on the real model; an image counts as
  robust (worst case) only if it is correct clean and under every attack.
- `--checks`: the gradient-masking checks (eps sweep, doubled steps, Square versus the
  gradient attacks, transfer versus end-to-end), each printed as pass or flag.
- The results JSON (`--out`) is rewritten atomically after every chunk; running the same
  command again resumes where it stopped and skips what is finished.

Choices that are ours, not the paper's (the paper does not say how batches were formed):
- Batch context: APGD runs the library's `attack_single_run` on the whole batch, so the
  surrogate sees the full batch jointly at every step; each image's adversarial point is its
  last iterate that fooled the surrogate, else its highest-loss iterate; the attack is seeded
  per batch (the same seed for every batch, as AutoAttack does), so runs are reproducible and
  resumable. `run_standard_evaluation` is never used: it re-forms batches between attacks.
- Per-image models (base, hpm/image) attacked end to end use APGD's `perturb`, AutoAttack's
  standard path (it attacks the correctly classified images only), so numbers agree exactly
  with AutoAttack's `APGDAttack`. Transfer attacks (fc/soft/mix) use the whole-batch path in
  every context: an image the surrogate never fooled keeps its highest-loss point, which may
  still fool the real model.
- Default budgets: L-inf 8/255 (CIFAR), 4/255 (ImageNet), 0.3 (MNIST); L2 0.5 (CIFAR),
  3.0 (ImageNet), 2.0 (MNIST), the values usual in RobustBench and the MNIST literature.
- An image whose logits are not finite after an attack counts as misclassified.
- `--chunk`: attacks run on chunks of whole fixed batches at once (the batch context grouped,
  each batch with its own batch prototypes), every batch with the random numbers it gets when
  attacked alone: a per-image row gets exactly the sequential results (tested). Square on
  AutoAttack's shrinking queries in the batch context (version paper) and L2 Square on
  per-image rows still go batch by batch.
"""
import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # PyPI's AutoAttack
from pyautoattack.square import SquareAttack

import dpnp
from hpm import attach, find_classifier, l2_logits, ste_assignment
from loading import (DATASETS, DEFAULT_EPS, CLIError, WarningCounter, atomic_save, check_eps,
                     check_images, check_labels, check_positive, eps_value, load_data,
                     load_head, load_model, progress_bar, read_head, run_cli, to_float, write_json)

LOSSES = ("ce", "dlr")
SURROGATES = ("fc", "soft", "ste", "mix")  # MSA: Surrogate 1, Surrogate 2, the real model (BPDA), their mixture
ADAPTIVE = ("fixed",)  # adaptive surrogates designed from hpm.py (Tramer et al. 2020)
CONTEXTS = ("batch", "image")
HPM_ATTACKS = tuple(f"apgd-{loss}/{s}" for loss in LOSSES for s in SURROGATES) + ("square",)
KINDS = ("apgd-ce", "apgd-dlr", "apgd-t", "apgd-cw")  # APGD-T: AutoAttack's targeted DLR attack
# "flip/mix": adaptive, against the batch prototypes (see run_attack); HPM rows only.
ALL_ATTACKS = tuple(f"{k}/{s}" for k in KINDS for s in SURROGATES + ADAPTIVE) + ("flip/mix", "square")
# --version paper: the paper's protocol exactly. --version strong (the default): more attacks,
# and every query of a whole fixed batch inside the threat model is scored on the real model.
VERSION_NOTES = {
    "paper": "the paper's protocol (APGD-CE and APGD-DLR on the four MSA surrogates, 40 steps, "
             "then Square); only final adversarial batches are scored",
    "strong": "the paper's attacks plus APGD-T (fc and mix surrogates) and the adaptive flip "
              "attack, 100 APGD steps, every query of a whole fixed batch scored on the real model, "
              "and in the batch context a Square that queries whole fixed batches only",
}
VERSIONS = {
    "paper": dict(attacks=HPM_ATTACKS, steps=40, score_queries=False),
    "strong": dict(attacks=HPM_ATTACKS[:-1] + ("apgd-t/fc", "apgd-t/mix", "flip/mix", "square"),
                   steps=100, score_queries=True),
}
# --chunk: images attacked at once. On the CPU one batch of the default size: bench.py measured
# larger batches slower per image there (WRN-16-4 forward+backward: 148 images/s at 64, 88 at 256).
DEFAULT_CHUNK = {"cuda": 1024, "cpu": 64}
# Settings that change the numbers: an existing --out file must match them to be resumed.
IDENTITY = ("model", "model_sha256", "dataset", "threat_model", "data", "data_sha256",
            "head_sha256", "eps", "n_examples", "subset_seed", "per_class", "batch_size", "steps",
            "queries", "seed", "score_queries", "restarts")

NOTES = {
    "batch_apgd": (
        "hpm/batch: APGD runs AutoAttack's attack_single_run on whole batches, so the surrogate "
        "sees the full batch at every step; each image keeps its last surrogate-fooling iterate, "
        "else its highest-loss iterate; the whole adversarial batch is re-scored on the real model."),
    "batch_square": (
        "hpm/batch square: after its first query AutoAttack's Square queries only the images of a "
        "batch it has not yet fooled, a batch composition different from the one scored. The "
        "attack is weaker than it could be; the number stays honest because every final "
        "adversarial batch is re-scored whole."),
    "per_image": (
        "base and hpm/image are per-image models: end-to-end APGD and Square use AutoAttack's "
        "perturb (standard path; it attacks only the initially correct images, shrinking batches, "
        "which changes nothing for a per-image model); transfer attacks (fc/soft/mix) use "
        "attack_single_run on the whole batch."),
    "worst_case": (
        "worst_case: an image counts as robust only if it is correct clean and under every "
        "finished attack of its row; accuracies are fractions of the subset."),
    "nonfinite": "an image whose logits are not finite after an attack counts as misclassified.",
    "score_queries": (
        "every query: each query an attack makes with a whole fixed batch inside the threat model "
        "(every APGD iterate, every query of the fixed-batch Square, the first query of "
        "AutoAttack's Square) is an adversarial batch in its own right and is "
        "scored on the real model in the same context; an image counts as fooled by the attack if "
        "any scored query or its final batch fooled it. Queries of part of a batch, or with an "
        "image outside the eps-ball or [0, 1], are never scored."),
    "batch_square_fixed": (
        "hpm/batch square (version strong, L-inf): every query is the whole fixed batch; each "
        "still-correct image proposes its own square, all in one query, and keeps it if its own "
        "margin fell under that query (square_fixed_batch). A coordinate-wise search over a "
        "batch-dependent model: the batch an image accepted its proposal in differs from the "
        "next one by the other images' accepted proposals."),
    "flip": (
        "flip/mix (adaptive, HPM rows): targeted APGD on the FC oracle pushes every image toward "
        "its real runner-up class, flipping FC assignments to move the batch prototypes; then "
        "APGD-CE on the mixture starts from that batch. Both final batches are re-scored whole."),
    "apgd_t": (
        "apgd-t: AutoAttack's targeted DLR attack, min(9, K - 1) target classes (the highest "
        "clean logits after the top one) with one run each; an image counts as fooled if any "
        "target's run fooled it. Batch context: each run perturbs the whole batch (targets from "
        "the surrogate's clean logits), and every run's final batch is re-scored whole."),
}


# The models attacked and scored ----------------------------------------------------------

class Surrogate(nn.Module):
    """One target of the Mixed Surrogate Attack on an HPM model: x (B, C, H, W) -> logits (B, K).

    "fc": Surrogate 1, the FC oracle; "soft": Surrogate 2, the soft-hybrid model; "ste": the
    real model, with STE (BPDA) gradients; "mix": the mean of the three log-softmaxes, all from
    ONE backbone pass. Scoring uses "ste", the real model.
    """

    def __init__(self, model, surrogate="mix", context="batch"):
        super().__init__()
        if surrogate not in SURROGATES + ADAPTIVE or context not in CONTEXTS:
            raise ValueError(f"surrogate must be one of {SURROGATES + ADAPTIVE} and context one of "
                             f"{CONTEXTS}")
        self.model, self.surrogate, self.context = model, surrogate, context
        self.scorer = None  # a QueryScorer while an attack runs with --version strong
        self.z_clean = None  # "fixed": the clean batch's features, set by attack_job
        self.group_size = None  # context "batch": the rows are fixed batches of this size (--chunk)

    def forward(self, x):
        z = self.model.features(x)  # (B, D): one backbone pass
        head, ctx = self.model.head, self.context
        kw = dict(context=ctx, group_size=self.group_size if ctx == "batch" else None)
        if self.surrogate == "mix":  # the three heads in one pass of the head's kernels
            logits = head(z, mode=("fc", "soft", "ste"), **kw)  # (3, B, K)
            real, out = logits[2], logits.log_softmax(dim=2).mean(dim=0)  # (B, K)
        elif self.surrogate == "fixed":
            real, out = None, fixed_prototype_logits(head, z, self.z_clean, ctx, kw["group_size"])
        else:
            out = head(z, mode=self.surrogate, **kw)
            real = out if self.surrogate == "ste" else None
        if self.scorer is not None:  # the real model on the same features: no second backbone pass
            with torch.no_grad():
                self.scorer(x, real if real is not None else head(z.detach(), mode="ste", **kw))
        return out


def fixed_prototype_logits(head, z, z_clean, context, group_size=None):
    """Adaptive surrogate "fixed": the real model with the hybrid prototypes of the clean batch
    held fixed, so the gradient flows only through each image's own features z (B, D), never
    through the batch prototypes nor the STE assignment. Equal to the real model at z = z_clean.
    group_size: the rows are fixed batches of this size, each with its own prototypes."""
    if z_clean is None or z_clean.shape != z.shape:
        raise ValueError("surrogate 'fixed' needs the clean batch's features (Surrogate.z_clean)")
    with torch.no_grad():
        P = ste_assignment(head.fc(z_clean))  # (B, K), the clean hard assignment
        if context == "batch":
            C_hybrid = head.hybrid_prototypes(z_clean, P, group_size)  # (G, K, D)
        else:  # row i alone: C_i[j] = G_j + a_ij u_i (HPMHead's image context), u_i from z_clean
            u = F.linear(z_clean, head.mixer.weight[:, z.shape[1]:])  # (B, D)
    if context == "batch":
        return l2_logits(z.view(len(C_hybrid), -1, z.shape[1]), C_hybrid).view(len(z), -1)
    return head._image_logits(z, P[None], u)[0]  # z_i the only variable


class Scored(nn.Module):
    """A per-image model attacked end to end, whose every query is also scored (it is the real model)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.scorer = model, None

    def forward(self, x):
        logits = self.model(x)
        if self.scorer is not None:
            self.scorer(x, logits.detach())
        return logits


class QueryScorer:
    """Scores every query of an attack on one fixed batch x0 (B, ...) with labels y on the real
    model: an image is fooled if any query that is the whole batch inside the threat model
    (eps-ball around x0 and [0, 1]) fooled it. Tensor ops only: no host sync per query.
    group_size: x0 is a chunk of fixed batches of this size, each judged inside on its own."""

    def __init__(self, x0, y, norm, eps, group_size=None):
        self.x0, self.y, self.norm, self.eps = x0, y, norm, eps
        self.group_size = group_size or len(y)
        self.robust = torch.ones_like(y, dtype=torch.bool)
        self.queries = self.scored = 0

    def __call__(self, x, logits):
        self.queries += 1
        if x.shape != self.x0.shape:  # part of a batch: not an adversarial batch of this protocol
            return
        self.scored += 1
        x = x.detach()
        delta = (x - self.x0).flatten(1)
        size = delta.abs().amax(dim=1) if self.norm == "Linf" else delta.norm(dim=1)
        inside = ((size <= self.eps * (1 + 1e-5) + 1e-7) & (x.flatten(1).amin(1) >= 0)
                  & (x.flatten(1).amax(1) <= 1) & torch.isfinite(x.flatten(1)).all(1))
        inside = inside.view(-1, self.group_size).all(1).repeat_interleave(self.group_size)  # per batch
        correct = (logits.argmax(dim=1) == self.y) & torch.isfinite(logits).all(dim=1)
        self.robust &= correct | ~inside  # a query with any image outside the ball counts for nothing


@dataclass
class ModelUnderTest:
    """A model under test (one row of the table): the model scored and the surrogates attacked."""
    name: str  # "base", "hpm/batch" or "hpm/image"
    model: nn.Module  # the real model, x -> logits: scores clean and every adversarial batch
    surrogates: dict  # surrogate name -> nn.Module x -> logits (None: the base model itself, Scored)
    per_image: bool  # False when a prediction depends on the other images of the batch
    backbone: nn.Module  # the module whose forward passes measure an attack's cost
    fits: int = 0  # most fixed batches per chunk known to fit in GPU memory (0: no limit seen)

    def attack_names(self, attacks):
        """This row's attacks from the canonical HPM list: the base model drops the suffix (and
        the attacks against HPM's own structure)."""
        if None in self.surrogates:
            return list(dict.fromkeys(a.split("/")[0] for a in attacks
                                      if a.split("/")[-1] not in ADAPTIVE and a != "flip/mix"))
        return list(attacks)

    def target(self, attack):
        """(surrogate name, module attacked) for an attack named like "apgd-ce/mix" or "square"."""
        surrogate = attack.split("/")[1] if "/" in attack else None
        if attack == "square":  # black-box, on the real model
            surrogate = None if None in self.surrogates else "ste"
        return surrogate, self.surrogates[surrogate]

    def plan(self, attack):
        """(module attacked, whole_batch): AutoAttack's standard path (perturb) only where it is
        exact, an end-to-end attack on a per-image model; all else on the whole batch (run_attack)."""
        surrogate, module = self.target(attack)
        return module, not self.per_image or surrogate not in (None, "ste")


def build_rows(base_model, hpm_model=None, contexts=CONTEXTS, dpnp_model=None):
    """The rows: "base" always; "hpm/<context>" for each context when an HPM model is given;
    "dpnp" (a per-image model, attacked like the base model) when a DPNP model is given."""
    rows = [ModelUnderTest("base", base_model, {None: Scored(base_model)}, per_image=True,
                           backbone=base_model)]
    if dpnp_model is not None:
        rows.append(ModelUnderTest("dpnp", dpnp_model, {None: Scored(dpnp_model)}, per_image=True,
                                   backbone=dpnp_model.base_model))
    for ctx in contexts if hpm_model is not None else ():
        surrogates = {s: Surrogate(hpm_model, s, ctx) for s in SURROGATES + ADAPTIVE}
        rows.append(ModelUnderTest(f"hpm/{ctx}", surrogates["ste"], surrogates, per_image=(ctx == "image"),
                                   backbone=hpm_model.base_model))
    return rows


@torch.no_grad()
def score(model, x, y):
    """Correctness (B,) bool of the whole batch x classified together; non-finite logits count wrong."""
    logits = model(x)
    return (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1), logits


# One attack on one batch ------------------------------------------------------------------

def library_attack(kind, target, x, *, norm, eps, steps, queries, seed, restarts, warnings, n_targets=1):
    """AutoAttack's object for "square", "apgd-ce", "apgd-dlr", "apgd-cw" (APGD on the CW
    margin) or "apgd-t" (n_targets target classes), with the settings we use everywhere."""
    if kind == "square":
        return SquareAttack(target, norm=norm, n_queries=queries, eps=eps, p_init=0.8, n_restarts=1,
                            seed=seed, verbose=False, device=x.device)
    common = dict(n_iter=steps, norm=norm, eps=eps, seed=seed, eot_iter=1, rho=0.75, verbose=False,
                  device=x.device, logger=warnings)
    if kind == "apgd-t":
        return APGDAttack_targeted(target, n_restarts=1, n_target_classes=n_targets, **common)
    cls = APGDMargin if kind == "apgd-cw" else APGDAttack
    return cls(target, n_restarts=restarts, loss="dlr" if kind == "apgd-cw" else kind.split("-")[1], **common)


def run_attack(attack, target, x, y, *, norm="Linf", eps, steps=40, queries=5000, seed=0,
               whole_batch=True, warnings=None, scorer=None, restarts=1, fixed_batch_square=False,
               sizes=None):
    """One attack on one batch x (B, C, H, W) in [0, 1]; returns its final adversarial batches
    (a list: one per run; APGD-T makes one run per target class). Nothing is scored here.

    attack: "apgd-ce", "apgd-dlr", "apgd-t" or "square" (a suffix like "/mix" is ignored:
    `target` is the module attacked). whole_batch=True: the library's attack_single_run on the
    whole batch (for batch-dependent models and for transfer attacks); each image gets its last
    iterate that fooled `target`, else its highest-loss iterate. whole_batch=False: the
    library's perturb (AutoAttack's standard path). Either way the RNG is seeded with `seed`.
    warnings: a loading.WarningCounter that collects AutoAttack's warnings (else printed).
    scorer: a QueryScorer that `target` (a Surrogate or Scored) calls on every query.
    restarts: random restarts of APGD-CE, -DLR and -CW (AutoAttack's n_restarts).
    fixed_batch_square: Square on a whole batch (whole_batch, L-inf) queries the whole fixed
    batch every time (square_fixed_batch) instead of AutoAttack's shrinking sub-batches.
    sizes: x is a chunk of fixed batches of these sizes (equal, but for a chunk of one batch),
    attacked at once with the random numbers each batch gets alone (see BatchStreams); AutoAttack's
    Square on shrinking queries (whole_batch) or in L2 goes batch by batch (per_batch).
    """
    kind = attack.split("/")[0]
    B = sizes[0] if sizes is not None and len(sizes) > 1 else None  # a chunk of fixed batches of B
    kw = dict(norm=norm, eps=eps, steps=steps, queries=queries, seed=seed, restarts=restarts, warnings=warnings)
    fixed_square = kind == "square" and whole_batch and fixed_batch_square and norm == "Linf"
    if B is not None and kind == "square" and not fixed_square and (whole_batch or norm != "Linf"):
        # AutoAttack's Square on shrinking queries (batch context) or in L2: batch by batch
        return per_batch(attack, target, x, y, sizes, scorer, dict(
            kw, whole_batch=whole_batch, fixed_batch_square=fixed_batch_square))
    if scorer is not None:
        assert hasattr(target, "scorer"), "only a Surrogate or a Scored model can score its queries"
        target.scorer = scorer
    try:
        if fixed_square:
            return [square_fixed_batch(target, x, y, eps=eps, queries=queries, seed=seed, group_size=B)]
        if kind == "square":
            sq = library_attack(kind, target, x, **kw)
            if B is not None:
                return [square_chunk(sq, x, y, sizes)]
            if not whole_batch:
                return [sq.perturb(x, y)]
            sq.init_hyperparam(x)
            seed_all(seed)
            return [sq.attack_single_run(x, y)[1]]
        if kind == "flip":
            return flip_attack(target, x, y, norm=norm, eps=eps, steps=steps, seed=seed,
                               warnings=warnings, scorer=scorer, batch_size=B or len(x))
        n_targets = 0
        if kind == "apgd-t":
            with torch.no_grad():
                clean_logits = target(x)
            n_targets = min(9, clean_logits.shape[1] - 1)
        elif kind not in ("apgd-ce", "apgd-dlr", "apgd-cw"):
            raise ValueError(f"unknown attack {attack!r}")
        apgd = library_attack(kind, target, x, n_targets=n_targets, **kw)
        if not whole_batch:
            return [perturb_chunk(apgd, x, y, sizes, n_targets) if B else apgd.perturb(x, y)]
        apgd.init_hyperparam(x)  # perturb would do this; attack_single_run needs it
        # as perturb: one seed, then each restart (or target) draws its own random start
        starts = tiled_starts(apgd, x, B or len(x), n_targets or restarts, seed)
        if kind != "apgd-t":
            return [final_batch(x, *apgd.attack_single_run(x, y, x_init=start)) for start in starts]
        order = clean_logits.sort(dim=1)[1]  # (B, K) classes by clean logit, ascending
        runs = []
        for t, start in zip(range(2, n_targets + 2), starts):
            apgd.y_target = order[:, -t]
            runs.append(final_batch(x, *apgd.attack_single_run(x, y, x_init=start)))
        return runs
    finally:
        if scorer is not None:
            target.scorer = None


# Many fixed batches at once (--chunk) -------------------------------------------------------
#
# A chunk is G consecutive fixed batches of B images, attacked in one run: the GPU sees G*B
# images per step instead of B. The batch context groups its rows (HPMHead's group_size), so
# each fixed batch keeps its own batch prototypes. AutoAttack draws its random numbers on the
# CPU generator, seeded with the same seed for every batch; here every batch of a chunk gets the
# very numbers it gets when attacked alone, so a per-image model gets the same results as the
# sequential form (tested), and a batch-dependent one the same attack up to float rounding.

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


def per_batch(attack, target, x, y, sizes, scorer, kw):
    """run_attack on each fixed batch of the chunk in turn; the runs joined batch by batch."""
    runs, a = None, 0
    group = getattr(target, "group_size", None)
    for n in sizes:
        sub = None if scorer is None else QueryScorer(x[a:a + n], y[a:a + n], scorer.norm, scorer.eps)
        if group is not None:  # one batch, or part of one: no groups
            target.group_size = None
        try:
            out = run_attack(attack, target, x[a:a + n], y[a:a + n], scorer=sub, **kw)
        finally:
            if group is not None:
                target.group_size = group
        if sub is not None:
            scorer.robust[a:a + n] &= sub.robust
            scorer.queries, scorer.scored = scorer.queries + sub.queries, scorer.scored + sub.scored
        runs = out if runs is None else [torch.cat(pair) for pair in zip(runs, out)]
        a += n
    return runs


def flip_attack(target, x, y, *, norm, eps, steps, seed, warnings, scorer, batch_size=None):
    """Adaptive attack "flip" against HPM's batch prototypes (Eq. 15-16), two APGD runs on the
    whole batch: (1) targeted on the FC oracle, each image toward its real runner-up class, so
    that FC assignments flip and move the batch prototypes C_batch that classify the others;
    (2) APGD-CE on `target` (the mixture) started from that batch. Both final batches are kept.
    batch_size: x is a chunk of fixed batches of this size (default: one batch)."""
    model, ctx = target.model, target.context
    fc = Surrogate(model, "fc", ctx)
    fc.scorer, fc.group_size = scorer, target.group_size
    with torch.no_grad():
        group = target.group_size if ctx == "batch" else None
        real = model.head(model.features(x), mode="ste", context=ctx, group_size=group)  # (B, K)
    runner_up = real.scatter(1, y[:, None], -math.inf).argmax(dim=1)  # (B,)
    kw = dict(norm=norm, eps=eps, steps=steps, queries=None, seed=seed, restarts=1, warnings=warnings)
    flip = library_attack("apgd-t", fc, x, n_targets=1, **kw)
    flip.init_hyperparam(x)
    flip.y_target = runner_up
    start = tiled_starts(flip, x, batch_size or len(x), 1, seed)[0]
    x_flip = final_batch(x, *flip.attack_single_run(x, y, x_init=start))
    apgd = library_attack("apgd-ce", target, x, **kw)
    apgd.init_hyperparam(x)
    return [x_flip, final_batch(x, *apgd.attack_single_run(x, y, x_init=x_flip))]


def square_note(score_queries, norm):
    """The note on Square in the batch context: the fixed-batch Square (strong, L-inf) or the library's."""
    return NOTES["batch_square_fixed" if score_queries and norm == "Linf" else "batch_square"]


def margins(logits, y):
    """logit of the true class minus the largest other (B,); below 0: misclassified."""
    other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    margin = logits.gather(1, y[:, None]).squeeze(1) - other
    return torch.where(torch.isfinite(logits).all(dim=1), margin, torch.full_like(margin, -math.inf))


@torch.no_grad()
def square_fixed_batch(target, x, y, *, eps, queries, seed, p_init=0.8, group_size=None):
    """Square (Andriushchenko et al. 2020), L-inf, for a batch-dependent model: every query is
    the whole fixed batch. AutoAttack's Square queries only the images it has not fooled yet,
    which for HPM's batch context is another model. Here each still-correct image proposes a
    new square of +-eps (per channel) around its clean pixels, all proposals go into one query
    of the whole batch, and each image keeps its proposal if its own margin fell under that
    query. Returns the final batch (the scorer sees every query). group_size: x is a chunk of
    fixed batches of this size, each drawing what it draws alone (one batch's draws, tiled)."""
    sq = SquareAttack(target, norm="Linf", n_queries=queries, eps=eps, p_init=p_init, seed=seed,
                      device=x.device)  # for its schedule of the square size (p_selection)
    seed_all(seed)
    N, C, H, W = x.shape
    B = group_size or N

    def draw(high, shape):  # one batch's draw, the same for every batch of the chunk
        return torch.randint(0, high, (B, *shape), device=x.device).repeat(N // B, *[1] * len(shape))
    stripes = draw(2, (C, 1, W)) * 2 - 1  # the library's start
    x_best = (x + eps * stripes).clamp(0, 1)
    margin = margins(target(x_best), y)  # (N,)
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    for i in range(queries):
        active = margin > 0
        if not active.any():
            break
        s = min(max(int(round(math.sqrt(sq.p_selection(i) * H * W))), 1), H - 1)  # square side
        top, left = draw(H - s + 1, (1,)), draw(W - s + 1, (1,))
        window = (((rows >= top) & (rows < top + s))[:, None, :, None]
                  & ((cols >= left) & (cols < left + s))[:, None, None, :]
                  & active[:, None, None, None])  # (N, 1, H, W)
        sign = draw(2, (C, 1, 1)) * 2 - 1
        x_new = torch.where(window, (x + eps * sign).clamp(0, 1), x_best)
        m_new = margins(target(x_new), y)
        better = active & (m_new < margin)
        x_best = torch.where(better[:, None, None, None], x_new, x_best)
        margin = torch.where(better, m_new, margin)
    return x_best


class APGDMargin(APGDAttack):
    """APGD on the plain margin loss of Carlini and Wagner, max_{j != y} z_j - z_y: the DLR loss
    without its scale normaliser (the l2 logits of HPM have another scale than FC logits)."""

    def dlr_loss(self, x, y):
        return -margins(x, y)


def final_batch(x, x_best, robust, loss_best, x_best_adv):
    """From attack_single_run's outputs: each image's last iterate that fooled the target (robust
    False), else its highest-loss iterate."""
    return torch.where(robust.view(-1, *[1] * (x.dim() - 1)), x_best, x_best_adv)


def seed_all(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_adv(x_adv, x, norm, eps):
    """The attack stayed in the threat model: finite rows in [0, 1] within eps (else a bug)."""
    x_adv = x_adv.detach()
    bad = ~torch.isfinite(x_adv).flatten(1).all(dim=1)
    x_adv = torch.where(bad.view(-1, *[1] * (x.dim() - 1)), x, x_adv)  # a NaN image is no image
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "Linf" else delta.norm(dim=1)
    if (size > eps * (1 + 1e-4) + 1e-6).any() or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"attack left the threat model: max {norm} perturbation "
                           f"{size.max().item():.6g} > eps {eps:.6g} or pixels outside [0, 1]")
    return x_adv


# Evaluation on tensors --------------------------------------------------------------------

class count_backbone_images:
    """Context manager: images (rows) that go through `module`'s forward and how many calls."""

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


def make_batches(n, batch_size):
    """Fixed consecutive batches [(start, end), ...] of the (sorted) subset."""
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def new_row():
    return {"clean": None, "attacks": {}, "worst_case": None, "correct": {}, "batches_done": {},
            "timings_s": {}}


def row_store(results, name):
    """results["base"], results["dpnp"] or results["hpm"][context] for a row name like "hpm/batch"."""
    if "/" not in name:
        return results.setdefault(name, new_row())
    model, ctx = name.split("/")
    return results.setdefault(model, {}).setdefault(ctx, new_row())


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


def run_job(store, name, batches, attack_chunk, *, desc, chunk=None, show_progress=True,
            on_update=None, save=None, backbone=None, ranks=None, key=None):
    """Run attack_chunk(first, end) -> (correct (n,) bool, x_adv or None[, final correct]) over
    the batches, a chunk of whole fixed batches at a time, resuming where store (a dict with
    "correct", "batches_done", "timings_s") left off; returns the 0/1 list. backbone: the module
    whose images are counted into store["backbone_images"]. ranks: a Ranks when several processes
    share the work (torchrun); key names the job in their ledgers."""
    if ranks is not None:
        return ranks.run_job(store, name, batches, attack_chunk, desc=desc, chunk=chunk,
                             show_progress=show_progress, backbone=backbone, key=key or name)
    done = store["batches_done"].get(name, 0)
    correct = list(store["correct"].get(name, []))[: batches[done - 1][1] if done else 0]
    store["timings_s"].setdefault(name, 0.0)
    images = store.setdefault("backbone_images", {})
    if done == 0:
        images[name] = 0
    elif name not in images:  # resumed from a file written before the count existed
        images[name] = None
    bar = progress_bar(len(batches), desc, show_progress)
    bar.update(done)
    n_done = batches[done - 1][1] if done else 0
    final = list(store.get("final_batch_correct", {}).get(name, []))[:n_done]
    for first, end in make_chunks(batches, done, chunk):
        t0 = time.perf_counter()
        with count_backbone_images(backbone) as seen:
            c, x_adv, *c_final = attack_chunk(first, end)
        if save is not None and x_adv is not None:
            for i in range(first, end):
                save(i, x_adv[batches[i][0] - batches[first][0]:batches[i][1] - batches[first][0]])
        correct += c.int().tolist()
        store["correct"][name] = correct
        if c_final:  # what the kept final batch alone scores, where queries were scored too
            final += c_final[0].int().tolist()
            store.setdefault("final_batch_correct", {})[name] = final
        store["batches_done"][name] = end
        store["timings_s"][name] += time.perf_counter() - t0
        if images[name] is not None:
            images[name] += seen.images
        bar.set_postfix_str(f"acc {sum(correct) / len(correct):.1%}")
        bar.update(end - first)
        if on_update is not None:
            on_update()
    bar.close()
    return correct


class Ranks:
    """Several processes on one evaluation (torchrun): each attacks its share of the chunks of
    whole fixed batches (cut so that every process gets as many: balanced_chunks), writes what
    it did to its own ledger (OUT.parts/rank<r>.json, rewritten after every chunk), and after
    each job every process reads all ledgers, so all hold the same results; rank 0 writes the
    results file. A rerun reads the ledgers and does only the chunks no rank finished,
    whichever rank did the others."""

    def __init__(self, out, identity):
        import torch.distributed as dist

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
        except (OSError, ValueError):
            return {}
        return ledger if ledger.get("identity") == self.identity else {}

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

    def record(self, key, first, entry):
        self.mine.setdefault(key, {})[str(first)] = entry
        write_json({"identity": self.identity, "rank": self.rank, "pid": os.getpid(), "jobs": self.mine},
                   self.path(self.rank))

    def barrier(self):
        self.dist.barrier()

    def run_job(self, store, name, batches, attack_chunk, *, desc, chunk, show_progress, backbone, key):
        chunks = balanced_chunks(batches, chunk, self.world)
        done = self.before.get(key, {})
        todo = [c for c in chunks if str(c[0]) not in done][self.rank::self.world]
        bar = progress_bar(len(todo), f"{desc} (rank {self.rank}: {len(todo)} chunks)",
                           show_progress and self.rank == 0)
        for first, end in todo:
            t0 = time.perf_counter()
            with count_backbone_images(backbone) as seen:
                c, _, *c_final = attack_chunk(first, end)
            self.record(key, first, {"end": end, "correct": c.int().tolist(),
                                     "final": c_final[0].int().tolist() if c_final else None,
                                     "seconds": time.perf_counter() - t0, "images": seen.images})
            bar.update(1)
        bar.close()
        self.barrier()  # every rank's chunks of this job are in the ledgers
        done = self.jobs().get(key, {})
        entries = [done[str(first)] for first, _ in chunks]
        store["correct"][name] = correct = [c for e in entries for c in e["correct"]]
        store["batches_done"][name] = len(batches)
        store["timings_s"][name] = sum(e["seconds"] for e in entries)
        store.setdefault("backbone_images", {})[name] = sum(e["images"] for e in entries)
        if entries[0]["final"] is not None:
            store.setdefault("final_batch_correct", {})[name] = [c for e in entries for c in e["final"]]
        return correct

    def finish(self):
        """After the last job: the results file holds everything; the ledgers go."""
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(self.dir, ignore_errors=True)


ORDER = ("clean",) + KINDS + ALL_ATTACKS + ("worst_case",)


def update_worst_case(row):
    """Worst case over clean and every finished attack of the row, per image and overall.
    Also puts the row's attacks in the canonical order, whatever order the runs took."""
    for key in ("attacks", "correct", "batches_done", "timings_s"):
        row[key] = dict(sorted(row[key].items(), key=lambda kv: ORDER.index(kv[0])))
    if row["clean"] is None:
        return
    finished = ["clean"] + list(row["attacks"])
    worst = [int(all(v)) for v in zip(*(row["correct"][k] for k in finished))]
    row["correct"]["worst_case"] = worst
    row["worst_case"] = sum(worst) / len(worst)


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


def batch_loader(x, y, batches, device):
    """(first, end) -> (images float (n, C, H, W) in [0, 1], labels (n,)) of batches first..end-1."""
    def batch(first, end):
        a, b = batches[first][0], batches[end - 1][1]
        xb = to_float(x[a:b], device) if x.dtype == torch.uint8 else x[a:b].to(device).float()
        return xb, y[a:b].to(device)
    return batch


class grouped:
    """Context manager: the row's batch-context surrogates treat their rows as fixed batches of
    `size` (None: the rows are one batch)."""

    def __init__(self, row, size):
        self.surrogates = [s for s in row.surrogates.values() if isinstance(s, Surrogate)]
        self.size = size

    def __enter__(self):
        for s in self.surrogates:
            s.group_size = self.size

    def __exit__(self, *exc):
        for s in self.surrogates:
            s.group_size = None


def chunk_sizes(batches, first, end):
    """The fixed batch sizes of chunk (first, end), and the group size (None for one batch)."""
    sizes = [b - a for a, b in batches[first:end]]
    return sizes, sizes[0] if len(sizes) > 1 else None


def fit_memory(job, row, batches):
    """job(first, end), run in parts of whole fixed batches when the GPU runs out of memory on a
    chunk of several: halved until it fits, and the size that fits kept (row.fits) for every
    later chunk of the row. The results are the whole chunk's: each batch of a chunk gets the
    random numbers it gets alone, so parts give what the chunk gives."""
    def run(first, end):
        if row.fits and end - first > row.fits:
            return join_parts([run(a, min(a + row.fits, end)) for a in range(first, end, row.fits)])
        try:
            return job(first, end)
        except torch.cuda.OutOfMemoryError:
            if end - first == 1:
                raise
        torch.cuda.empty_cache()  # (outside the except: its traceback no longer holds the tensors)
        row.fits = (end - first) // 2
        images = batches[first + row.fits][0] - batches[first][0]
        print(f"note: {row.name} ran out of GPU memory on {batches[end - 1][1] - batches[first][0]} "
              f"images at once; chunks of at most {images} from here on (--chunk {images} starts there)",
              flush=True)
        return run(first, end)
    return run


def join_parts(parts):
    """The (correct, x_adv or None[, final correct]) of consecutive parts of a chunk, as one."""
    return tuple(None if any(p is None for p in col) else torch.cat(col) for col in zip(*parts))


def attack_job(row, attack, batch, batches, *, norm, eps, steps, queries, seed, warnings=None,
               score_queries=False, restarts=1):
    """(first, end) -> (correct (n,) bool, x_adv[, final correct]): the attack on the chunk of
    fixed batches first..end-1, each final batch re-scored whole on the real model (and, with
    score_queries, every query of a whole batch as well; in that version Square on a
    batch-dependent row queries only whole fixed batches)."""
    target, whole_batch = row.plan(attack)

    def attack_chunk(first, end):
        xb, yb = batch(first, end)
        sizes, group = chunk_sizes(batches, first, end)
        scorer = QueryScorer(xb, yb, norm, eps, group_size=group) if score_queries else None
        with grouped(row, group):
            if getattr(target, "surrogate", None) == "fixed":
                with torch.no_grad():
                    target.z_clean = target.model.features(xb)
            runs = run_attack(attack, target, xb, yb, norm=norm, eps=eps, steps=steps, queries=queries,
                              seed=seed, whole_batch=whole_batch, warnings=warnings, scorer=scorer,
                              restarts=restarts, fixed_batch_square=score_queries, sizes=sizes)
            correct = torch.ones_like(yb, dtype=torch.bool)
            for x_adv in runs:
                x_adv = check_adv(x_adv, xb, norm, eps)
                c_final = score(row.model, x_adv, yb)[0]  # the last run's batch is the one kept
                correct = correct & c_final
        if scorer is None:
            return correct, x_adv
        return correct & scorer.robust, x_adv, c_final
    return fit_memory(attack_chunk, row, batches)


def evaluate(rows, x, y, *, attacks=HPM_ATTACKS, norm="Linf", eps, steps=40, queries=5000,
             batch_size=64, seed=0, results=None, on_update=None, save_adv=None, indices=None,
             device="cpu", progress=True, log=print, score_queries=False, restarts=1, chunk=None,
             ranks=None):
    """Clean and robust accuracy of every row on images x (N, C, H, W; uint8 or float in [0, 1])
    with labels y (N,), cut into consecutive batches of `batch_size`, attacked `chunk` images
    (whole batches) at a time (None: one batch at a time); ranks: a Ranks (torchrun) or None.

    results: the dict to fill (and to resume from: finished batches are skipped); on_update()
    is called after every chunk. Returns results with results["base"], results["hpm"][ctx],
    each {"clean", "attacks": {name: accuracy}, "worst_case", "correct": {name: [0/1, ...]}, ...}.
    """
    results = {} if results is None else results
    batches = make_batches(len(y), batch_size)
    indices = list(range(len(y))) if indices is None else indices

    batch = batch_loader(x, y, batches, device)

    for row in rows:
        store = row_store(results, row.name)

        def clean_chunk(first, end):
            xb, yb = batch(first, end)
            try:
                with grouped(row, chunk_sizes(batches, first, end)[1]):
                    c, logits = score(row.model, xb, yb)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # typically images of the wrong shape for this model
                raise CLIError(f"{row.name}: the model cannot classify the images "
                               f"{tuple(xb.shape[1:])} ({str(e).splitlines()[0]})")
            if not torch.isfinite(logits).all():
                raise CLIError(f"{row.name}: the model returned NaN or inf logits on clean images "
                               f"(batches {first}-{end - 1}); check the model file, the head and "
                               "the input range")
            return c, None

        if store["batches_done"].get("clean", 0) < len(batches):
            run_job(store, "clean", batches, fit_memory(clean_chunk, row, batches), desc=f"{row.name} clean",
                    chunk=chunk, show_progress=progress, on_update=on_update, ranks=ranks,
                    key=f"{row.name}|clean")
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
            attack_chunk = attack_job(row, name, batch, batches, norm=norm, eps=eps, steps=steps,
                                      queries=queries, seed=seed, warnings=counter,
                                      score_queries=score_queries, restarts=restarts)
            saver = None
            if save_adv:
                saver = AdvSaver(save_adv, row.name, name, y, indices, batches)
                if not saver.has_parts(store["batches_done"].get(name, 0)):  # resumed without parts
                    store["batches_done"][name], store["correct"][name] = 0, []
                    store["timings_s"][name] = 0.0
            correct = run_job(store, name, batches, attack_chunk, desc=f"{row.name} {name}",
                              chunk=chunk, show_progress=progress, on_update=on_update, save=saver,
                              backbone=row.backbone, ranks=ranks, key=f"{row.name}|{name}")
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


# Gradient-masking checks ------------------------------------------------------------------

def sweep_eps(norm, eps, dim):
    """eps x 0.25, 0.5, 1, 2, 4 up to a budget where any honest classifier can be fooled, and
    that budget: L-inf 0.5 (every image can become mid-grey), L2 0.5 sqrt(dim) (the same)."""
    large = 0.5 if norm == "Linf" else 0.5 * math.sqrt(dim)
    return sorted({m * eps for m in (0.25, 0.5, 1, 2, 4) if m * eps < large} | {large})


def check_eps_sweep(attack, accs, sweep, n, tol_n):
    """Accuracy must fall as eps grows and reach ~0 at the largest eps of the sweep."""
    rises = [e for e, a, b in zip(sweep[1:], accs, accs[1:]) if b > a + tol_n]
    ok = not rises and accs[-1] <= tol_n
    return {
        "attack": attack, "eps": sweep, "accuracy": accs, "n": n, "status": "pass" if ok else "flag",
        "detail": (f"{attack} at eps " + " ".join(f"{e:.4g}" for e in sweep) + ": "
                   + " ".join(f"{100 * a:.1f}" for a in accs) + "%"
                   + (f"; accuracy rises at eps {rises[0]:.4g}" if rises else "")
                   + ("" if accs[-1] <= tol_n else
                      f"; not ~0 at eps {sweep[-1]:.4g}, where an honest classifier is fooled: "
                      "the gradients do not lead the attack")),
    }


def check_doubled_steps(attack, a1, a2, steps, n, tol_n):
    """Twice the steps must not lower the accuracy by more than the tolerance."""
    ok = a2 >= a1 - tol_n
    return {
        "attack": attack, "steps": [steps, 2 * steps], "accuracy": [a1, a2], "n": n,
        "status": "pass" if ok else "flag",
        "detail": (f"{attack} {steps} steps {a1:.1%}, {2 * steps} steps {a2:.1%}"
                   + ("" if ok else "; the attack has not converged: use more --steps")),
    }


def check_square_vs_gradient(row, tol):
    """A black-box attack must not beat the best gradient attack (whole subset)."""
    grads = {k: v for k, v in row["attacks"].items() if k != "square"}
    if "square" not in row["attacks"] or not grads:
        return {"status": "n/a", "detail": "needs square and a gradient attack"}
    best, sq = min(grads, key=grads.get), row["attacks"]["square"]
    only_square = sum(1 for i, c in enumerate(row["correct"]["square"])
                      if not c and all(row["correct"][k][i] for k in grads))
    ok = sq >= grads[best] - tol
    return {
        "square": sq, "best_gradient": grads[best], "best_gradient_attack": best,
        "images_only_square_breaks": only_square, "status": "pass" if ok else "flag",
        "detail": (f"square {sq:.1%} vs best gradient attack {grads[best]:.1%} ({best}), whole "
                   f"subset; {only_square} images only Square breaks"
                   + ("" if ok else "; a black-box attack beats the gradients: masking")),
    }


def check_transfer_vs_end_to_end(row, tol):
    """A transfer attack from a surrogate beating the end-to-end (/ste) attack: obfuscated gradients."""
    grads = {k: v for k, v in row["attacks"].items() if k != "square"}
    transfer = {k: v for k, v in grads.items() if not k.endswith("/ste")}
    end2end = {k: v for k, v in grads.items() if k.endswith("/ste")}
    if not (transfer and end2end):
        return {"status": "n/a", "detail": "needs an /ste attack and an fc/soft/mix one"}
    bt, be = min(transfer, key=transfer.get), min(end2end, key=end2end.get)
    ok = transfer[bt] >= end2end[be] - tol
    return {
        "best_transfer": transfer[bt], "best_transfer_attack": bt,
        "best_end_to_end": end2end[be], "best_end_to_end_attack": be,
        "status": "pass" if ok else "flag",
        "detail": (("" if ok else "(expected for HPM: obfuscated gradients; this is why "
                    "MSA exists) ") + f"best transfer {transfer[bt]:.1%} ({bt}) vs best "
                   f"end-to-end {end2end[be]:.1%} ({be}), whole subset"),
    }


def gradient_masking_checks(row_name, runs, row, *, eps, sweep, steps, n, tol):
    """The four checks as {name: {"status": "pass" | "flag" | "n/a", "detail": str, numbers...}}.

    runs: accuracies of the check attacks on the first n images, keyed by check_key();
    row: the row's main results (whole subset); sweep: the eps values of the sweep.
    tol: the accuracy difference tolerated; on the n check images, never less than one image.
    """
    attack = check_attack(row_name)
    tol_n = max(tol, 1 / n)
    out = {
        "eps_sweep": check_eps_sweep(attack, [runs[check_key(attack, e, steps)] for e in sweep],
                                     sweep, n, tol_n),
        "doubled_steps": check_doubled_steps(attack, runs[check_key(attack, eps, steps)],
                                             runs[check_key(attack, eps, 2 * steps)], steps, n, tol_n),
        "square_vs_gradient": check_square_vs_gradient(row, tol),
    }
    if row_name != "base":
        out["transfer_vs_end_to_end"] = check_transfer_vs_end_to_end(row, tol)
    return out


def check_attack(row_name):
    """The attack of the eps sweep and the doubled steps: the strongest single gradient attack."""
    return "apgd-ce" if row_name == "base" else "apgd-ce/mix"


def check_key(attack, eps, steps):
    return f"{attack} eps={eps:.6g} steps={steps}"


def run_checks(rows, x, y, results, *, norm, eps, steps, queries, batch_size, seed, checks_n,
               tol, on_update=None, device="cpu", progress=True, score_queries=False, restarts=1,
               chunk=None, ranks=None):
    """--checks: the eps sweep and doubled steps on the first `checks_n` images of the subset
    (cut into the same fixed batches), the other two checks from the main results."""
    n = min(checks_n, len(y))
    batches = make_batches(n, batch_size)
    batch = batch_loader(x[:n], y[:n], batches, device)
    sweep = sorted(set(sweep_eps(norm, eps, x[0].numel())) | {eps})
    for row in rows:
        checks = row_store(results, row.name).setdefault("checks", {})
        runs = checks.get("runs")
        if runs is None or runs["n"] != n:  # first time, or another --checks-n: start again
            runs = checks["runs"] = {"n": n, "accuracy": {}, "correct": {}, "batches_done": {},
                                     "timings_s": {}}
        attack = check_attack(row.name)
        for e, s in [(e, steps) for e in sweep] + [(eps, 2 * steps)]:
            key = check_key(attack, e, s)
            if key in runs["accuracy"]:
                continue
            attack_chunk = attack_job(row, attack, batch, batches, norm=norm, eps=e, steps=s,
                                      queries=queries, seed=seed, warnings=WarningCounter(),
                                      score_queries=score_queries, restarts=restarts)
            correct = run_job(runs, key, batches, attack_chunk, desc=f"{row.name} check {key}",
                              chunk=chunk, show_progress=progress, on_update=on_update, ranks=ranks,
                              key=f"{row.name}|check {key}")
            runs["accuracy"][key] = sum(correct) / n
        checks.update(gradient_masking_checks(row.name, runs["accuracy"], row_store(results, row.name),
                                              eps=eps, sweep=sweep, steps=steps, n=n, tol=tol))
        if on_update is not None:
            on_update()
    return results


# Output -------------------------------------------------------------------------------------

TITLES = {"base": "base", "hpm/batch": "HPM (batch)", "hpm/image": "HPM (image)", "dpnp": "DPNP"}


def format_tables(results, rows):
    """The paper's Tables 1-2 shape (clean, worst case, difference to base), then every attack."""
    stores = {r.name: row_store(results, r.name) for r in rows}
    base = stores.get("base")

    def pct(v):
        return "" if v is None else f"{100 * v:.1f}"

    def diff(v, ref):
        return "" if v is None or ref is None else f"({100 * (v - ref):+.1f})"

    lines = [f"{'model':<13}{'clean':>8}{'':>8}{'robust':>8}{'':>8}  (worst case over all attacks)"]
    for name, s in stores.items():
        ref_c = base["clean"] if name != "base" else None
        ref_r = base["worst_case"] if name != "base" else None
        lines.append(f"{TITLES[name]:<13}{pct(s['clean']):>8}{diff(s['clean'], ref_c):>8}"
                     f"{pct(s['worst_case']):>8}{diff(s['worst_case'], ref_r):>8}")
    names = sorted({a for s in stores.values() for a in s["attacks"]}, key=ORDER.index)
    lines += ["", f"{'accuracy (%)':<16}" + "".join(f"{TITLES[n]:>13}" for n in stores)]
    for a in ["clean"] + names + ["worst_case"]:
        cells = [s["clean"] if a == "clean" else s["worst_case"] if a == "worst_case"
                 else s["attacks"].get(a) for s in stores.values()]
        lines.append(f"{a.replace('_', ' '):<16}" + "".join(f"{pct(c):>13}" for c in cells))
    return "\n".join(lines)


def versions():
    from importlib import metadata

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("torchvision", "pyautoattack", "robustbench"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The script -------------------------------------------------------------------------------

def parse_attacks(text):
    """"apgd-ce/mix,square" -> canonical ordered names; a bare "apgd-ce" means every surrogate."""
    chosen = set()
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if tok in KINDS:
            chosen |= {f"{tok}/{s}" for s in SURROGATES}
        elif tok in ALL_ATTACKS:
            chosen.add(tok)
        else:
            raise CLIError(f"unknown attack {tok!r}; choose from {', '.join(ALL_ATTACKS)} "
                           f"(or {' / '.join(KINDS)} for all four surrogates)")
    if not chosen:
        raise CLIError("--attacks is empty")
    return [a for a in ALL_ATTACKS if a in chosen]


def resolve_config(args):
    """All settings, with the checkpoint's values where the flags leave them out; every flag is
    checked here, before anything is loaded or written."""
    ckpt = read_head(args.head) if args.head else None
    if ckpt is None and (args.model is None or args.dataset is None):
        raise CLIError("give --head FILE (a finetune.py checkpoint), or --model and --dataset "
                       "to evaluate a base model alone")
    cfg = dict(vars(args))
    cfg["model"] = args.model or ckpt["model"]
    cfg["dataset"] = args.dataset or ckpt["dataset"]
    if cfg["dataset"] not in DATASETS:
        raise CLIError(f"unknown dataset {cfg['dataset']!r}; choose from {', '.join(DATASETS)}")
    cfg["threat_model"] = args.threat_model or (ckpt or {}).get("threat_model") or "Linf"
    cfg["eps"] = args.eps if args.eps is not None else DEFAULT_EPS[cfg["threat_model"]][cfg["dataset"]]
    if cfg["eps"] <= 0:
        raise CLIError(f"--eps must be positive, got {cfg['eps']:g}")
    check_eps(cfg["eps"], cfg["threat_model"])
    cfg["batch_size"] = args.batch_size if args.batch_size is not None else int(
        (ckpt or {}).get("batch_size") or 64)
    cfg["per_class"] = args.per_class if args.per_class is not None else (
        5 if cfg["dataset"] == "imagenet" and args.data is None else None)
    version = VERSIONS[cfg["version"]]
    cfg["steps"] = args.steps if args.steps is not None else version["steps"]
    cfg["score_queries"] = version["score_queries"]
    check_positive(batch_size=cfg["batch_size"], steps=cfg["steps"], queries=cfg["queries"],
                   restarts=cfg["restarts"], checks_n=cfg["checks_n"], n_examples=cfg["n_examples"],
                   per_class=cfg["per_class"])
    cfg["attacks"] = parse_attacks(args.attacks or ",".join(version["attacks"]))
    cfg["head_type"] = ckpt["head_type"] if ckpt is not None else None
    ncm = cfg["head_type"] == "ncm"  # no batch prototypes: one context says it all
    cfg["contexts"] = [c.strip() for c in (args.contexts or ("image" if ncm else "batch,image")).split(",")
                       if c.strip()]
    if not set(cfg["contexts"]) <= set(CONTEXTS):
        raise CLIError(f"--contexts must be a list from {', '.join(CONTEXTS)}, got {args.contexts!r}")
    cfg["head_sha256"] = sha256(args.head) if args.head else None
    cfg["model_sha256"] = sha256(cfg["model"]) if os.path.isfile(cfg["model"]) else None
    cfg["data_sha256"] = sha256(args.data) if args.data and os.path.isfile(args.data) else None
    cfg["out"] = args.out or (os.path.splitext(args.head)[0] + ".eval.json" if args.head
                              else "eval.json")
    try:
        cfg["device"] = torch.device(cfg["device"])
    except RuntimeError:
        raise CLIError(f"unknown device {cfg['device']!r}")
    if cfg["device"].type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda, but no CUDA GPU is available; pass --device cpu")
    if cfg["chunk"] is None:
        cfg["chunk"] = DEFAULT_CHUNK.get(cfg["device"].type, DEFAULT_CHUNK["cpu"])
    check_positive(chunk=cfg["chunk"])
    return cfg, ckpt


def load_models(cfg, ckpt):
    """(base model, HPM model or None, number of classes), frozen, on cfg["device"]."""
    base = load_model(cfg["model"], cfg["dataset"], cfg["threat_model"], cfg["model_dir"])
    hpm_model = dpnp_model = None
    try:
        num_classes = find_classifier(base)[1].out_features
        if ckpt is not None and ckpt["head_type"] == "dpnp":
            dpnp_model = load_head(ckpt, dpnp.attach(base, alpha=ckpt["alpha"]))
        elif ckpt is not None:  # "hpm", or "ncm" (an HPM head whose mixer passes C_global alone)
            hpm_model = load_head(ckpt, attach(base, momentum=ckpt["momentum"], eps=ckpt["eps"]))
    except ValueError as e:  # attach: no final nn.Linear
        raise CLIError(str(e))
    base = base.to(cfg["device"]).eval().requires_grad_(False)
    hpm_model, dpnp_model = (m if m is None else m.to(cfg["device"]).eval().requires_grad_(False)
                             for m in (hpm_model, dpnp_model))
    return base, hpm_model, dpnp_model, num_classes


def compile_head(head):
    """--compile: the head's forward through torch.compile, in place (its state_dict unchanged),
    tried once at once: a machine that cannot compile fails here, in one line, not inside the
    first attack. An evaluation calls it in up to ~20 forms (modes, contexts, grouped or not,
    with or without gradients, new batch shapes): room for all, so that none runs eager."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), 64))
    head.compile()
    w = head.fc.weight
    try:
        with torch.no_grad():
            head(torch.zeros(2, w.shape[1], device=w.device, dtype=w.dtype))
    except Exception as e:
        while getattr(e, "inner_exception", None) or e.__cause__:  # the compiler's own error,
            e = getattr(e, "inner_exception", None) or e.__cause__  # not dynamo's wrapper
        first = (str(e).strip().splitlines() or [""])[0]
        raise CLIError(f"--compile: torch.compile fails on this machine ({type(e).__name__}: {first}); "
                       "run without --compile")
    return head


def check_classes(attacks, num_classes):
    """AutoAttack's DLR loss reads the 3rd largest logit, its targeted DLR (APGD-T, and flip's
    first run) the 4th: refuse attacks the model has too few classes for, naming the rest."""
    need = {a: 4 if a.startswith(("apgd-t/", "flip/")) else 3 if a.startswith("apgd-dlr/") else 2
            for a in attacks}
    too_few = [a for a in attacks if need[a] > num_classes]
    if too_few:
        keep = [a for a in attacks if a not in too_few]
        raise CLIError(f"the model has {num_classes} classes: {', '.join(too_few)} need at least "
                       f"{max(need[a] for a in too_few)} (AutoAttack's DLR losses read the 3rd or 4th "
                       "largest logit)" + (f"; pass --attacks {','.join(keep)}" if keep else ""))


def select_subset(n_total, n_examples, seed):
    """Sorted indices of a fixed uniform subset of the test set."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(n_examples, n_total)].sort().values


def load_subset(cfg, num_classes):
    """(x uint8 (n, C, H, W), y (n,), sorted indices (n,), size of the test set): the fixed subset."""
    split = "val" if cfg["dataset"] == "imagenet" else "test"
    x_all, y_all = load_data(cfg["dataset"], split, data=cfg["data"], data_dir=cfg["data_dir"],
                             per_class=cfg["per_class"])
    check_labels(y_all, num_classes, cfg["data"] or f"{cfg['dataset']} {split}")
    if cfg["n_examples"] is None:  # the paper: a fixed 25% of the test set (ImageNet: all 5000)
        cfg["n_examples"] = len(y_all) if cfg["dataset"] == "imagenet" else max(1, round(len(y_all) / 4))
    idx = select_subset(len(y_all), cfg["n_examples"], cfg["subset_seed"])
    return x_all[idx], y_all[idx], idx, len(y_all)


def open_results(cfg):
    """The results dict to fill: {} to start, or what --out holds to resume. Refuses a file of
    another configuration (unless --overwrite). Writes nothing."""
    out = cfg["out"]
    if not os.path.exists(out) or cfg["overwrite"]:
        return {}
    try:
        with open(out) as f:
            results = json.load(f)
        old = results["config"]
    except (ValueError, KeyError, TypeError):
        raise CLIError(f"{out} exists and is not a results file of evaluate.py; "
                       "choose another --out or pass --overwrite")
    diff = [f"{k}: {old.get(k)!r} there, {cfg[k]!r} now" for k in IDENTITY if old.get(k) != cfg[k]]
    if diff:
        raise CLIError(f"{out} holds results of another configuration ({'; '.join(diff[:3])}); "
                       "choose another --out or pass --overwrite")
    print(f"resuming from {out}")
    return results


def describe(results, cfg, rows, idx, n_total):
    """The parts of the results file that say what was run, on what, with which software."""
    results["description"] = ("evaluate.py: clean and robust accuracy (fractions) of the base model "
                              "and HPM on one fixed subset, same batches, same attacks")
    results["config"] = {k: str(v) if k == "device" else v for k, v in sorted(cfg.items())}
    results["versions"] = versions()
    results["subset"] = {"n": len(idx), "of": n_total, "subset_seed": cfg["subset_seed"],
                         "batch_size": cfg["batch_size"],
                         "n_batches": len(make_batches(len(idx), cfg["batch_size"])),
                         "indices": idx.tolist()}
    results["version"] = cfg["version"]
    results["notes"] = ([f"version {cfg['version']}: {VERSION_NOTES[cfg['version']]}"]
                        + [NOTES["worst_case"], NOTES["per_image"], NOTES["nonfinite"]]
                        + ([NOTES["batch_apgd"], square_note(cfg["score_queries"], cfg["threat_model"])]
                           if "hpm/batch" in [r.name for r in rows] else [])
                        + ([NOTES["score_queries"]] if cfg["score_queries"] else [])
                        + ([NOTES["apgd_t"]] if any(a.startswith("apgd-t") for a in cfg["attacks"]) else [])
                        + ([NOTES["flip"]] if "flip/mix" in cfg["attacks"] else []))
    results["complete"] = False
    results.setdefault("timing", {}).setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))


def print_report(results, rows, cfg):
    """The final tables, the checks and where the results are."""
    print()
    print(format_tables(results, rows))
    if cfg["checks"]:
        n = min(cfg["checks_n"], results["subset"]["n"])
        print(f"\ngradient-masking checks (first {n} images of the subset; tolerance "
              f"{cfg['checks_tol']:.1%}):")
        for r in rows:
            for name, c in row_store(results, r.name)["checks"].items():
                if name != "runs":
                    print(f"  {r.name:<10} {name:<23} {c['status']:<5} {c['detail']}")
    if "hpm/batch" in [r.name for r in rows]:
        print("\nnote: " + square_note(cfg["score_queries"], cfg["threat_model"]))
    print(f"\nresults: {cfg['out']}")


def main(args):
    """Evaluate as the flags say; returns the results dict (also written to --out)."""
    cfg, ckpt = resolve_config(args)
    ranks = start_ranks(cfg)  # None unless torchrun started several processes
    if ranks is not None and ranks.rank != 0:
        sys.stdout = open(os.devnull, "w")  # one log: rank 0's
    try:
        return evaluate_as_configured(cfg, ckpt, ranks)
    finally:
        if ranks is not None:
            if ranks.rank != 0:
                sys.stdout.close()
                sys.stdout = sys.__stdout__
            ranks.dist.destroy_process_group()


def start_ranks(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on GPUs, gloo on the CPU),
    each process on its own GPU; returns a Ranks, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import datetime

    import torch.distributed as dist

    if cfg["save_adv"]:
        raise CLIError("--save-adv works in one process only; run without torchrun to keep the images")
    cuda = cfg["device"].type == "cuda"
    if cuda:
        cfg["device"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(cfg["device"])
    # a rank waits at the end of every attack for the others' chunks: no short timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    if cfg["overwrite"] and dist.get_rank() == 0:
        shutil.rmtree(cfg["out"] + ".parts", ignore_errors=True)
    dist.barrier()
    # the chunks depend on the number of processes: ledgers of another count do not fit
    identity = {k: cfg[k] for k in IDENTITY + ("chunk",)}
    return Ranks(cfg["out"], {**identity, "processes": dist.get_world_size()})


def evaluate_as_configured(cfg, ckpt, ranks):
    """main's work once the configuration is settled (and the process group joined)."""
    if ckpt is not None and ckpt.get("finished") is False:
        print(f"warning: {cfg['head']} is an unfinished head (fine-tuning was interrupted after "
              f"{len(ckpt.get('history', []))} epoch(s)); its numbers are not those of a trained head")
    base, hpm_model, dpnp_model, num_classes = load_models(cfg, ckpt)
    check_classes(cfg["attacks"], num_classes)
    if cfg["compile"] and hpm_model is not None:
        compile_head(hpm_model.head)
        print("the HPM head runs through torch.compile (--compile): the first call of each mode, "
              "context and batch shape compiles")
    x, y, idx, n_total = load_subset(cfg, num_classes)
    rows = build_rows(base, hpm_model, cfg["contexts"], dpnp_model)
    for row in rows:  # a model that cannot take these images fails here, before any file is written
        check_images(row.model, x, cfg["device"], name=f"{row.name} ({cfg['model']})")
    results = open_results(cfg)
    describe(results, cfg, rows, idx, n_total)

    def on_update():
        results["timing"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if ranks is None or ranks.rank == 0:  # under torchrun, rank 0 writes the one file
            write_json(results, cfg["out"])

    if ranks is not None:
        results["timing"]["processes"] = ranks.world

    print(f"version {cfg['version']}: {VERSION_NOTES[cfg['version']]}")
    print(f"{cfg['model']} on {cfg['dataset']}: {len(idx)} of {n_total} test images "
          f"(subset seed {cfg['subset_seed']}), batches of {cfg['batch_size']}, {cfg['threat_model']} "
          f"eps {cfg['eps']:.5g}, {cfg['steps']} APGD steps, {cfg['queries']} Square queries, "
          f"device {cfg['device']}")
    if "hpm/batch" in [r.name for r in rows]:
        print("note: " + NOTES["batch_apgd"])
    on_update()
    common = dict(norm=cfg["threat_model"], eps=cfg["eps"], steps=cfg["steps"], queries=cfg["queries"],
                  batch_size=cfg["batch_size"], seed=cfg["seed"], on_update=on_update,
                  device=cfg["device"], progress=not cfg["no_progress"],
                  score_queries=cfg["score_queries"], restarts=cfg["restarts"], chunk=cfg["chunk"],
                  ranks=ranks)
    evaluate(rows, x, y, attacks=cfg["attacks"], results=results, save_adv=cfg["save_adv"],
             indices=idx.tolist(), **common)
    if cfg["checks"]:
        run_checks(rows, x, y, results, checks_n=cfg["checks_n"], tol=cfg["checks_tol"], **common)
    results["complete"] = True
    on_update()
    if ranks is not None:
        ranks.finish()
    print_report(results, rows, cfg)
    return results


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
