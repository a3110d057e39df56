"""Every attack of the catalogue on a chunk of fixed batches (run_attack), and the attacks of ours
that do not use the batch.

AutoAttack's APGD and Square assume a per-image model; HPM's batch context is not one: an
image's prediction depends on the other images of its fixed batch. What each attack of ours adds
(here, or in hpmkit/batch_attacks.py), kept because a test in tests/test_attacks.py shows images
only it breaks:

- every query scored (batch_attacks.QueryScorer): every query an attack makes with a whole fixed
  batch inside the threat model is an adversarial batch in its own right, scored on the real
  model (test_every_query_is_scored_so_an_early_fooling_batch_counts);
- Square on whole fixed batches (batch_attacks.square_search)
  (test_fixed_batch_square_breaks_batches_that_autoattacks_square_misses);
- flip_attack: against the batch prototypes, FC assignments pushed toward the runner-up
  (test_flip_breaks_batches_that_the_rest_of_the_strong_suite_leaves_correct);
- APGD on the CW margin (pgd.cw_loss, optional, "apgd-cw/*"; no test model showed it breaking
  what the rest misses: test_margin_loss_is_the_carlini_wagner_margin);
- fixed_prototype_logits: the surrogate with the clean batch's hybrid prototypes held fixed
  (optional, "*/fixed"; test_fixed_prototype_surrogate_is_the_real_model_at_the_clean_batch);
- "joint" and "target": the batch as the adversary's, images fooled or sacrificed moving the
  batch prototypes against the images still standing
  (test_the_batch_adversary_breaks_images_every_other_strong_attack_leaves_robust).

The model attacked is x -> logits, with `scorer` (a QueryScorer or None), `alone(scorer)`: the
same model for one fixed batch of a chunk, and `regroup(batch_size, scorer)`: the same model on
rows that are fixed batches of batch_size. Every attack takes a chunk (chunks.Chunk) and the
run's setting (catalogue.Setting).
"""
import math
from dataclasses import replace

import torch

from hpm import l2_logits, ste_assignment
from hpmkit.autoattack import (final_batch, library_attack, per_batch, perturb_chunk, seed_all, square_chunk,
                                tiled_starts)
from hpmkit.batch_attacks import ascend_standing, attack_copies, benign_margins, own_attack, square_search
from hpmkit.pgd import cw_loss, inside, margins


def run_attack(attack, model, chunk, setting, *, whole_batch=True, warnings=None, standing=None, helpers=None):
    """One attack (a catalogue.Attack) on a chunk of fixed batches, the attacker holding every image
    (K of B: run_k_of_b); returns its final adversarial batches, whole chunks (a list: one per run;
    APGD-T makes one per target class). Nothing is scored here, but `model.scorer` (if any) sees
    every query; "joint" and "target" need it.

    whole_batch=True: the library's attack_single_run on the whole batch (for batch-dependent
    models and for transfer attacks), each image's last iterate that fooled `model`, else its
    highest-loss iterate; False: the library's perturb (AutoAttack's standard path). warnings: an
    autoattack.WarningCounter. helpers: for "flip", the FC oracle (scored like model) and the real
    model (not scored), {"fc": ..., "real": ...}. standing: for "target", the images still
    standing (n,) bool.
    """
    kind, x, y, s = attack.kind, chunk.x, chunk.y, setting
    everyone = torch.ones_like(y, dtype=torch.bool)  # the batch adversary holds the whole batch
    if kind == "joint":
        return [ascend_standing(model, chunk, s, everyone, everyone, cw_loss)]
    if kind == "target":
        return [attack_copies(model, chunk, s, everyone, standing)]
    if kind == "flip":
        return flip_attack(model, helpers, chunk, s, warnings)
    several = len(chunk.sizes) > 1  # a chunk of several fixed batches
    if kind == "square":
        if whole_batch and s.square_on_whole_batches:  # every query the whole fixed batch
            return [square_search(model, chunk, s, everyone, lambda logits: margins(logits, y), per_image=True)]
        if several and (whole_batch or s.norm != "Linf"):
            # AutoAttack's Square on shrinking queries (batch context) or in L2: batch by batch
            return per_batch(lambda m, batch: run_attack(attack, m, batch, s, whole_batch=whole_batch,
                                                         warnings=warnings), model, chunk)
        sq = library_attack(kind, model, s, x.device)
        if several:
            return [square_chunk(sq, x, y, chunk.sizes)]
        if not whole_batch:
            return [sq.perturb(x, y)]
        sq.init_hyperparam(x)
        seed_all(s.seed)
        return [sq.attack_single_run(x, y)[1]]
    n_target_classes = 0
    if kind == "apgd-t":
        with torch.no_grad():
            clean_logits = model(x)
        n_target_classes = min(9, clean_logits.shape[1] - 1)
    elif kind not in ("apgd-ce", "apgd-dlr", "apgd-cw"):
        raise ValueError(f"unknown attack {attack.name!r}")
    apgd = library_attack(kind, model, s, x.device, warnings, n_target_classes, loss=cw_loss)
    if not whole_batch:
        return [perturb_chunk(apgd, x, y, chunk.sizes, n_target_classes) if several else apgd.perturb(x, y)]
    apgd.init_hyperparam(x)  # perturb would do this; attack_single_run needs it
    # as perturb: one seed, then each restart (or target class) draws its own random start
    starts = tiled_starts(apgd, x, chunk.batch_size, n_target_classes or s.restarts, s.seed)
    runs = []
    for t, start in enumerate(starts, start=2):
        if n_target_classes:  # APGD-T's target: the class of the t-th largest clean logit
            apgd.y_target = clean_logits.sort(dim=1)[1][:, -t]
        runs.append(final_batch(x, *apgd.attack_single_run(x, y, x_init=start)))
    return runs


def run_k_of_b(attack, model, chunk, setting, held, standing=None, warnings=None):
    """One attack of the rows of K attacker slots (the catalogue's runs_on "attackers") on a chunk:
    the attacker holds the images `held` (n,) bool (batch_attacks.attacker_slots: the last K of
    each fixed batch) and moves them alone, the others stay exactly clean. Returns the final
    adversarial batches, whole chunks (one per run). Every attack needs model.scorer; standing:
    for "benign:victim", the images still standing (n,) bool."""
    kind, s = attack.kind, setting
    if not held.any():  # batches of one image (a short last one): it stays benign, nothing to attack
        return [chunk.x]
    if kind in ("own:apgd-ce", "own:apgd-dlr"):
        return own_attack(kind.removeprefix("own:"), model, chunk, s, held, warnings)
    if kind == "benign:spread":  # the benign images' CW margins clamped at 0: a fooled one adds nothing
        return [ascend_standing(model, chunk, s, held, ~held, lambda logits, y: cw_loss(logits, y).clamp(max=0))]
    if kind == "benign:victim":
        return [attack_copies(model, chunk, s, held, standing & ~held)]
    if kind == "benign:square":
        return [square_search(model, chunk, s, held, benign_margins(held, chunk.y, len(chunk.sizes)),
                              per_image=False)]
    raise ValueError(f"unknown attacker-slot attack {attack.name!r}")


def flip_attack(model, helpers, chunk, setting, warnings=None):
    """Adaptive attack "flip" against HPM's batch prototypes (Eq. 15-16), two APGD runs on the
    whole batch: (1) targeted on the FC oracle helpers["fc"], each image toward its runner-up
    class on the real model helpers["real"], so that FC assignments flip and move the batch
    prototypes C_batch that classify the others; (2) APGD-CE on `model` (the mixture) started
    from that batch. Both final batches are kept."""
    x, y = chunk.x, chunk.y
    with torch.no_grad():
        logits = helpers["real"](x)  # (B, K)
    runner_up = logits.scatter(1, y[:, None], -math.inf).argmax(dim=1)  # (B,)
    one = replace(setting, restarts=1)
    flip = library_attack("apgd-t", helpers["fc"], one, x.device, warnings, n_target_classes=1)
    flip.init_hyperparam(x)
    flip.y_target = runner_up
    start = tiled_starts(flip, x, chunk.batch_size, 1, setting.seed)[0]
    x_flip = final_batch(x, *flip.attack_single_run(x, y, x_init=start))
    apgd = library_attack("apgd-ce", model, one, x.device, warnings)
    apgd.init_hyperparam(x)
    return [x_flip, final_batch(x, *apgd.attack_single_run(x, y, x_init=x_flip))]


def check_adv(x_adv, x, norm, eps, frozen=None):
    """The attack stayed in the threat model: finite rows in [0, 1] within eps, and the images
    `frozen` (n,) bool (benign ones, K of B) exactly the clean ones (else a bug)."""
    x_adv = x_adv.detach()
    bad = ~torch.isfinite(x_adv).flatten(1).all(dim=1)
    x_adv = torch.where(bad.view(-1, *[1] * (x.dim() - 1)), x, x_adv)  # a NaN image is no image
    if frozen is not None and not torch.equal(x_adv[frozen], x[frozen]):
        raise RuntimeError("attack moved a benign image: only the attacker's slots may move")
    if not inside(x_adv, x, eps, norm).all():
        delta = (x_adv - x).flatten(1)
        size = delta.abs().max(dim=1).values if norm == "Linf" else delta.norm(dim=1)
        raise RuntimeError(f"attack left the threat model: max {norm} perturbation "
                           f"{size.max().item():.6g} > eps {eps:.6g} or pixels outside [0, 1]")
    return x_adv


def fixed_prototype_logits(head, z, z_clean, context, batch_size=None):
    """Adaptive surrogate "fixed": the real model with the hybrid prototypes of the clean batch
    held fixed, so the gradient flows only through each image's own features z (B, D), never
    through the batch prototypes nor the STE assignment. Equal to the real model at z = z_clean.
    batch_size: the rows are fixed batches of this size, each with its own prototypes; in the
    image context each row is a fixed batch of one (its own hybrid prototypes, (B, K, D))."""
    if z_clean is None or z_clean.shape != z.shape:
        raise ValueError("surrogate 'fixed' needs the clean batch's features (z_clean)")
    with torch.no_grad():
        P = ste_assignment(head.fc(z_clean))  # (B, K), the clean hard assignment
        C_hybrid = head.hybrid_prototypes(z_clean, P, batch_size if context == "batch" else 1)  # (G, K, D)
    return l2_logits(z.view(len(C_hybrid), -1, z.shape[1]), C_hybrid).view(len(z), -1)
