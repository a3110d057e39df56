"""hpmkit/attacks.py: each attack AutoAttack lacks earns its place, on a model built for it, where it
breaks images that the rest of the strong suite leaves correct; and queries are scored only when
they are whole fixed batches inside the ball.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
from hpmkit import attacks, catalogue
from hpmkit.catalogue import Setting
from hpmkit.chunks import Chunk

from conftest import (TOL, K, SIZE, D, quadrant_mask, quad_data, quad_linear, Quantize, fitted_hpm, evaluate_rows,
                      attack_once, TinyCNN, make_head)


class BandModel(nn.Module):
    """A batch-dependent toy: on mid-grey images (0.5) it is wrong exactly when the batch's mean
    pixel lies strictly inside (0.5, 0.5 + band) or (0.5 - band, 0.5): so it is right on the clean
    batch (mean exactly 0.5) and on a batch pushed far, and wrong on a batch that is barely moved,
    as APGD's random start is."""

    def __init__(self, band):
        super().__init__()
        self.band = band

    def forward(self, x):
        m = (x.mean() - 0.5).abs()
        wrong = (m > 0) & (m < self.band)
        logits = torch.zeros(len(x), K, dtype=x.dtype)
        logits[:, 0] = 1.0
        return torch.where(wrong, logits.roll(1, dims=1), logits)  # class 0 right, class 1 if wrong


class BrighterLoses(nn.Module):
    """A smooth surrogate whose loss grows with brightness and which is never fooled within eps:
    APGD walks every pixel to +eps, where BandModel is right again. Calls its scorer like
    evaluate.Surrogate does, with the real model's logits for the same query."""

    def __init__(self, real, scorer=None):
        super().__init__()
        self.real, self.scorer = real, scorer

    def forward(self, x):
        logits = torch.zeros(len(x), K, dtype=x.dtype)
        logits[:, 0] = 10.0 - x.flatten(1).mean(1)  # always class 0, by less as pixels brighten
        if self.scorer is not None:
            with torch.no_grad():
                self.scorer(x, self.real(x))
        return logits


class BandRow(evaluate.ModelUnderTest):
    """A batch-context row whose real model is BandModel and whose "ste" surrogate is BrighterLoses."""

    def surrogate(self, name, batch_size=None, scorer=None, x=None):
        return BrighterLoses(self.model, scorer)

    def real(self, batch_size=None):
        return self.model


def band_setup(n=16):
    real = BandModel(band=0.02)
    xf = torch.full((n, 1, SIZE, SIZE), 0.5)
    return xf, torch.zeros(n, dtype=torch.long), BandRow("hpm/batch", real, "batch", backbone=real)


def test_every_query_is_scored_so_an_early_fooling_batch_counts():
    x, y, row = band_setup()
    with torch.no_grad():
        assert (row.model(x).argmax(1) == y).all()  # right on the clean batch
        assert (row.model((x + 0.1).clamp(0, 1)).argmax(1) == y).all()  # and pushed to +eps
    kw = dict(attacks=["apgd-ce/ste"], eps=0.1, steps=5, batch_size=16, progress=False,
              log=lambda *a: None)
    paper = evaluate_rows([row], x, y, **kw).row("hpm/batch")
    strong = evaluate_rows([row], x, y, score_queries=True, **kw).row("hpm/batch")
    assert paper.accuracy("apgd-ce/ste") == 1.0  # the final batch alone: robust
    assert strong.final_correct("apgd-ce/ste") == [1] * 16  # the same final batch
    assert strong.accuracy("apgd-ce/ste") == 0.0  # but the random start fooled every image


def test_queries_of_part_of_a_batch_or_outside_the_ball_are_never_scored():
    x0 = torch.full((4, 1, SIZE, SIZE), 0.5)
    y = torch.zeros(4, dtype=torch.long)
    wrong = torch.zeros(4, K)
    wrong[:, 1] = 1  # every image misclassified
    cases = {
        "part of the batch": (x0[:3], wrong[:3]),
        "one image outside the eps-ball": (torch.cat([x0[:3], x0[3:] + 0.2]), wrong),
        "a pixel above 1": (torch.cat([x0[:3], (x0[3:] + 0.6)]), wrong),
        "a NaN pixel": (torch.cat([x0[:3], x0[3:] * float("nan")]), wrong),
    }
    for case, (x, logits) in cases.items():
        scorer = attacks.QueryScorer(x0, y, "Linf", 0.1)
        scorer(x, logits)
        assert scorer.robust.all(), case
    for norm, delta in (("Linf", 0.1), ("L2", 0.1 / 8)):  # on the boundary of the ball: scored
        scorer = attacks.QueryScorer(x0, y, norm, 0.1)
        scorer(x0 + delta, wrong)
        assert not scorer.robust.any(), norm


def test_square_scores_only_its_whole_batch_queries():
    x, y = quad_data(8)
    model = fitted_hpm(quad_linear(), x, y)
    xf = x.float() / 255
    scorer = attacks.QueryScorer(xf, y, "Linf", 0.6)
    target = evaluate.Surrogate(model, "ste", "batch", scorer=scorer)
    attack_once("square", target, xf, y, eps=0.6, queries=30)
    assert scorer.queries > scorer.scored >= 1  # the later queries hold only the unfooled images


def dead_end_linear(a=0.5, b=5.0, m_B=1.0, m_C=6.0):
    """A linear model on mid-grey 8x8 images of class 0 where untargeted attacks fail and a
    targeted one does not, at L-inf eps 0.1 on the 16 pixels S of the top-left quadrant.
    Class B (1) is the runner-up (gap m_B) and rises with the brightness of S: every gradient,
    and Square's margin, leads there, but it is out of reach (m_B > 16 * eps * a). Class C (2)
    is further away (gap m_C) and rises only with a checkerboard pattern on S: reachable
    (m_C < 16 * eps * b), but only by an attack that aims at it, not by uniform squares."""
    S = quadrant_mask(0)[0]  # (8, 8), 16 ones
    i, j = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1).float() * S  # +-1 on S, summing to 0
    fc = nn.Linear(D, K)
    with torch.no_grad():
        fc.weight.zero_()
        fc.weight[1], fc.weight[2] = a * S.flatten(), -b * checker.flatten()
        fc.bias.copy_(torch.tensor([0.0, -m_B - a * 8, -m_C, -100.0]))
    return nn.Sequential(nn.Flatten(), fc).eval(), S.flatten().bool(), checker.flatten()


def test_apgd_t_breaks_images_that_the_untargeted_attacks_and_square_miss():
    g = torch.Generator().manual_seed(0)
    x = (128 + torch.randint(-2, 3, (16, 1, SIZE, SIZE), generator=g)).to(torch.uint8)
    y = torch.zeros(16, dtype=torch.long)
    base, S, checker = dead_end_linear()
    # Independently, in float64: the best an eps-perturbation can do for B and for C.
    xf = (x.double() / 255).flatten(1)
    l_y, best_B = 0.0, 0.5 * (xf[:, S] + 0.1).clamp(max=1).sum(1) - 1.0 - 4.0
    best_C = 5.0 * 0.1 * checker.abs().sum() - 5.0 * (checker.double() * xf).sum(1) - 6.0
    assert (best_B < l_y).all() and (best_C > l_y).all()
    res = evaluate_rows(evaluate.build_rows(base), x, y, attacks=["apgd-ce/fc", "apgd-dlr/fc",
                            "apgd-t/fc", "square"], eps=0.1, steps=20, queries=1000, batch_size=8,
                            progress=False, log=lambda *a: None, score_queries=True).row("base")
    assert res.clean == 1.0
    assert res.accuracy("apgd-ce") == res.accuracy("apgd-dlr") == res.accuracy("square") == 1.0
    assert res.accuracy("apgd-t") == 0.0 and res.worst_case == 0.0


@pytest.mark.parametrize("norm,eps", [("Linf", 0.05), ("L2", 0.5)])
def test_apgd_t_agrees_with_autoattack_on_a_per_image_model(norm, eps):
    from pyautoattack.autopgd_base import APGDAttack_targeted

    torch.manual_seed(0)
    base = TinyCNN().eval()
    x, _ = quad_data(24, seed=1)
    xf = x.float() / 255
    with torch.no_grad():
        y = base(xf).argmax(1)
    res = evaluate_rows(evaluate.build_rows(base), x, y, attacks=["apgd-t/fc"], norm=norm,
                            eps=eps, steps=10, batch_size=8, seed=3, progress=False,
                            log=lambda *a: None)
    peer = []
    for a in range(0, 24, 8):
        apgd = APGDAttack_targeted(base, n_iter=10, norm=norm, eps=eps, seed=3, device="cpu",
                                   n_target_classes=K - 1)
        adv = apgd.perturb(xf[a:a + 8], y[a:a + 8])
        with torch.no_grad():
            peer += (base(adv).argmax(1) == y[a:a + 8]).int().tolist()
    assert 0 < sum(peer) < len(peer)
    assert res.row("base").correct("apgd-t") == peer


@pytest.mark.parametrize("context", ["batch", "image"])
def test_fixed_prototype_surrogate_is_the_real_model_at_the_clean_batch(context):
    """The adaptive surrogate "fixed" freezes the clean batch's hybrid prototypes: at the clean
    batch it equals the real model, and its gradient reaches only each image's own features."""
    head = make_head()
    torch.manual_seed(1)
    z0 = torch.randn(6, 5, dtype=torch.float64)
    fixed = attacks.fixed_prototype_logits(head, z0, z0, context)
    torch.testing.assert_close(fixed, head(z0, mode="ste", context=context), **TOL)
    z = (z0 + 0.3 * torch.randn_like(z0)).requires_grad_(True)
    logits = attacks.fixed_prototype_logits(head, z, z0, context)
    # independently: the clean hybrid prototypes of each row, then plain l2 distances to z
    C_rows = []
    for i in range(6):
        if context == "batch":
            C_rows.append(hpm_hybrid(head, z0))
        else:
            C_rows.append(hpm_hybrid(head, z0[i:i + 1]))
    expected = -torch.stack([torch.stack([(z[i] - C_rows[i][j]).norm() for j in range(4)]) for i in range(6)])
    torch.testing.assert_close(logits, expected, **TOL)
    logits[2].sum().backward()
    assert z.grad[[0, 1, 3, 4, 5]].abs().max() == 0 and z.grad[2].abs().max() > 0


def hpm_hybrid(head, z):
    """C_hybrid (K, D) of a batch z with hard assignments, written out (Eq. 15-17)."""
    L = head.fc(z)
    P = F.one_hot(L.argmax(1), L.shape[1]).double()
    C_batch = (P.t() @ z) / (P.sum(0)[:, None] + head.eps)
    return torch.cat([head.prototypes, C_batch], 1) @ head.mixer.weight.t() + head.mixer.bias


@pytest.mark.slow
def test_flip_breaks_batches_that_the_rest_of_the_strong_suite_leaves_correct():
    """The adaptive flip attack against the batch prototypes: on the quadrant model with a
    saturated FC layer (every softmax one-hot, so STE and soft gradients carry nothing through
    the assignment) and the default mixer, the per-image attacks of the strong suite find no
    adversarial batch at eps 0.35, while flipping FC assignments does, in the batch context
    only. The batch adversary, which runs after it, breaks these batches too (every image):
    flip's place is to break them first, at a fraction of target/mix's cost."""
    x, y = quad_data(32)
    base = quad_linear(scale=50.0)
    model = fitted_hpm(base, x, y)
    rows = evaluate.build_rows(base, model)[1:]
    kw = dict(eps=0.35, steps=20, queries=100, batch_size=8, progress=False, log=lambda *a: None,
              score_queries=True)
    rest = [a for a in evaluate.VERSIONS["strong"]["attacks"] if a != "flip/mix" and a not in catalogue.BATCH_ADVERSARY]
    later = evaluate_rows(rows[:1], x, y, attacks=["target/mix"], **kw).row("hpm/batch")
    assert later.correct("target/mix") == [0] * 32
    without = evaluate_rows(rows, x, y, attacks=rest, **kw)
    flip = evaluate_rows(rows, x, y, attacks=["flip/mix"], **kw)
    for ctx in ("batch", "image"):
        assert without.row(f"hpm/{ctx}").worst_case == 1.0, ctx
    broken = [i for i, c in enumerate(flip.row("hpm/batch").correct("flip/mix")) if not c]
    assert len(broken) >= 2
    assert flip.row("hpm/image").correct("flip/mix") == [1] * 32  # per image, flipping gains nothing

    # Independently: record every batch the attack queries, keep those inside the ball, classify
    # each whole with the model itself; the images some batch fools are exactly those reported.
    xf, fooled = x.float() / 255, []
    for a in range(0, 32, 8):
        xb, yb, queried = xf[a:a + 8], y[a:a + 8], []
        scorer = lambda q, logits: queried.append(q.detach().clone())  # noqa: E731
        runs = attack_once("flip/mix", rows[0].surrogate("mix", scorer=scorer), xb, yb, eps=0.35, steps=20,
                          helpers=dict(fc=rows[0].surrogate("fc", scorer=scorer), real=rows[0].real()))
        ok = torch.ones(8, dtype=torch.bool)
        for q in queried + runs:
            if q.shape == xb.shape and (q - xb).abs().max() <= 0.35 + 1e-6 and 0 <= q.min() and q.max() <= 1:
                with torch.no_grad():
                    ok &= model(q, mode="ste", context="batch").argmax(1) == yb
        fooled += [a + i for i in range(8) if not ok[i]]
    assert fooled == broken


def test_margin_loss_is_the_carlini_wagner_margin():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    apgd = attacks.library_attack("apgd-cw", nn.Identity(), Setting("Linf", 0.1, steps=3), logits.device)
    expected = torch.stack([max(logits[i, j] for j in range(5) if j != y[i]) - logits[i, y[i]]
                            for i in range(6)])
    torch.testing.assert_close(attacks.cw_loss(logits, y), expected, **TOL)
    torch.testing.assert_close(apgd.dlr_loss(logits, y), expected, **TOL)  # the loss APGD maximises


def test_fixed_batch_square_queries_only_whole_batches_inside_the_ball():
    x, y = quad_data(16)
    model = fitted_hpm(quad_linear(), x, y)
    xf, queried = x.float() / 255, []
    target = evaluate.Surrogate(model, "ste", "batch", scorer=lambda q, logits: queried.append(q.clone()))
    x_adv = attacks.square_fixed_batch(target, Chunk(xf, y, [16]), Setting("Linf", 0.45, queries=40))
    assert len(queried) >= 2 and all(q.shape == xf.shape for q in queried)
    for q in queried + [x_adv]:
        assert (q - xf).abs().max() <= 0.45 + 1e-6 and q.min() >= 0 and q.max() <= 1
        assert torch.isclose((q - xf).abs(), torch.tensor(0.45)).any()  # squares of +-eps


def test_fixed_batch_square_breaks_batches_that_autoattacks_square_misses():
    """On HPM's batch context AutoAttack's Square scores its proposals on sub-batches, another
    model than the one evaluated; the fixed-batch Square searches the evaluated model itself."""
    x, y = quad_data(32)
    base = nn.Sequential(Quantize(10), *quad_linear())  # no gradients: only black-box attacks work
    model = fitted_hpm(base, x, y)
    row = evaluate.build_rows(base, model, contexts=["batch"])[1]
    kw = dict(eps=0.4, queries=300, batch_size=8, progress=False, log=lambda *a: None, attacks=["square"])
    library = evaluate_rows([row], x, y, **kw).row("hpm/batch")
    fixed = evaluate_rows([row], x, y, score_queries=True, **kw).row("hpm/batch")
    only_fixed = [i for i, (a, b) in enumerate(zip(library.correct("square"), fixed.correct("square")))
                  if a and not b]
    assert library.clean == 1.0 and len(only_fixed) >= 3


def batch_adversary_setup():
    """The quadrant toy (batches of 8) at eps 0.36, where the strong suite without the batch
    adversary leaves about half of the images robust in the batch context, and all per image."""
    x, y = quad_data(32)
    base = quad_linear()
    model = fitted_hpm(base, x, y)
    kw = dict(eps=0.36, steps=30, queries=100, batch_size=8, progress=False, log=lambda *a: None,
              score_queries=True)
    return x, y, base, model, kw


@pytest.mark.slow
def test_the_batch_adversary_breaks_images_every_other_strong_attack_leaves_robust():
    """joint breaks images that every attack before it leaves robust; target breaks, among the
    images every other strong attack (joint included) leaves robust, most of them. The base
    model and the image context are untouched: the attacks exist for the batch context only.
    (One run: each attack's per-image record is what it alone fooled, the rest's the AND of theirs.)"""
    x, y, base, model, kw = batch_adversary_setup()
    rows = evaluate.build_rows(base, model)
    strong = list(evaluate.VERSIONS["strong"]["attacks"])
    assert strong[-2:] == ["joint/soft", "target/mix"]
    full = evaluate_rows(rows, x, y, attacks=strong, **kw)
    batch = full.row("hpm/batch")
    rest = [batch.correct("clean")] + [batch.correct(a) for a in strong[:-2] if batch.finished(a)]
    robust = [all(c) for c in zip(*rest)]
    assert len(rest) == len(strong) - 1 and 8 <= sum(robust) <= 24  # (no batch adversary on the image context)
    only_joint = [i for i in range(32) if robust[i] and not batch.correct("joint/soft")[i]]
    assert len(only_joint) >= 1
    before_target = [robust[i] and batch.correct("joint/soft")[i] for i in range(32)]
    only_target = [i for i in range(32) if before_target[i] and not batch.correct("target/mix")[i]]
    assert len(only_target) >= sum(before_target) // 2 >= 4
    assert batch.worst_case < sum(robust) / 32 - 0.2
    assert "joint/soft" not in full.row("hpm/image").accuracies and "target/mix" not in full.row("base").accuracies
    assert full.row("base").worst_case == 1.0


class RecordingScorer(attacks.QueryScorer):
    """A QueryScorer that keeps every query it is shown, for an independent re-scoring."""
    seen = []

    def __call__(self, x, logits):
        RecordingScorer.seen.append((x.detach().clone(), self.x0.clone(), self.y.clone(), self.batch_size))
        super().__call__(x, logits)


def test_a_targets_attack_changes_another_images_record_only_when_a_scored_batch_fooled_it(monkeypatch):
    """target_attack's record, re-derived by hand: every batch it queried that is a whole copy of
    a fixed batch inside the ball, classified whole by the model itself; an image is recorded
    fooled exactly when one of those batches fooled it, whoever the copy's target was."""
    x, y, base, model, kw = batch_adversary_setup()
    xf = x.double() / 255
    model = model.double()
    standing = torch.ones(32, dtype=torch.bool)
    standing[[1, 2, 9, 30]] = False  # not targets: their batches are attacked for the others only
    monkeypatch.setattr(attacks, "QueryScorer", RecordingScorer)
    RecordingScorer.seen = []
    scorer = attacks.QueryScorer(xf, y, "Linf", 0.36, batch_size=8)
    target = evaluate.Surrogate(model, "mix", "batch", batch_size=8, scorer=scorer)
    attacks.target_attack(target, Chunk(xf, y, [8] * 4), Setting("Linf", 0.36, steps=10), standing)
    fooled = torch.zeros(32, dtype=torch.bool)
    copies = RecordingScorer.seen  # (the outer scorer is only merged into, never called)
    assert len(copies) >= 10
    for q, x0, y0, group in copies:
        assert group == 8 and q.shape == x0.shape
        inside = (q - x0).abs().flatten(1).amax(1) <= 0.36 * (1 + 1e-5) + 1e-7
        for c in range(len(q) // 8):
            rows = slice(8 * c, 8 * c + 8)
            if not inside[rows].all():
                continue
            with torch.no_grad():
                wrong = model(q[rows], context="batch").argmax(1) != y0[rows]
            first = int(torch.nonzero((xf == x0[8 * c]).flatten(1).all(1))[0])  # which fixed batch
            assert torch.equal(xf[first:first + 8], x0[rows])
            fooled[first:first + 8] |= wrong
    assert fooled.any() and not fooled.all()
    assert torch.equal(scorer.robust, ~fooled)


def test_the_batch_adversary_chunked_equals_batch_by_batch():
    x, y, base, model, kw = batch_adversary_setup()
    rows = evaluate.build_rows(base, model, contexts=("batch",))[1:]
    kw["attacks"] = ["apgd-ce/mix", "joint/soft", "target/mix"]
    kw["steps"] = 10
    one = evaluate_rows(rows, x, y, chunk=None, **kw).row("hpm/batch")
    chunked = evaluate_rows(rows, x, y, chunk=24, **kw).row("hpm/batch")
    assert one.per_image == chunked.per_image
    assert one.finals == chunked.finals
    assert 0 < sum(one.correct("target/mix")) < sum(one.correct("apgd-ce/mix"))
