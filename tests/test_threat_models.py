"""Threat models beyond one image: an attacker who holds the last K slots of every fixed batch among
benign, clean images (hpmkit/attackers.py, K of B), and the context sensitivity of clean labels to
the order batches are formed in (hpmkit/checks.py).
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
from hpmkit import attacks, engine, models
from hpmkit.catalogue import CATALOGUE
from hpmkit.checkpoint import HeadRecord, save_head
from hpmkit.chunks import FixedBatches

from conftest import quad_data, quad_linear, Quantize, fitted_hpm, run_evaluate, comparable, read_results, evaluate_rows


# K of B. An attacker who holds the last K slots of every fixed batch among benign, clean images. The
# pixel toy: 10x10 images of 100 classes, class c has its pixel c bright; a linear FC layer reads
# each pixel, so with more classes than a batch holds most classes are absent from a batch, and
# one image assigned to a benign image's class defines that class's batch prototype.


def pixel_data(n, classes=100, seed=0):
    """uint8 images (n, 1, 10, 10): pixel y bright (0.9), the rest dark (0.1), a little noise; n
    distinct classes when n <= classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(classes, generator=g)[:n] if n <= classes else torch.arange(n) % classes
    x = torch.full((n, 1, 10, 10), 25.0)
    x.view(n, -1)[torch.arange(n), y] = 230
    x = x + torch.randint(-10, 11, x.shape, generator=g)
    return x.clamp(0, 255).to(torch.uint8), y


def pixel_linear(scale=5.0, classes=100):
    fc = nn.Linear(100, classes)
    with torch.no_grad():
        fc.weight.copy_(scale * torch.eye(100)[:classes])
        fc.bias.zero_()
    return nn.Sequential(nn.Flatten(), fc)


def pixel_setup(n=64, base=None):
    """The pixel toy: n test images of distinct classes; C_global the class means of every class."""
    x, y = pixel_data(n)
    base = pixel_linear() if base is None else base
    xs, ys = pixel_data(100, seed=3)  # every class seen once more, for C_global
    return x, y, base, fitted_hpm(base, torch.cat([x, xs]), torch.cat([y, ys]))


def slot_row(base, model, K=1, eps=1.0):
    return evaluate.build_rows(base, model, contexts=(), attackers=[K], attacker_eps=eps)[1]


SLOT_ATTACKS = [a.name for a in CATALOGUE.values() if a.rows == "attackers"]


def test_the_attacker_slots_are_the_last_k_of_each_batch_and_a_short_batch_keeps_one_benign():
    from hpmkit.attackers import attacker_slots
    assert attacker_slots([4, 4, 2], 2).int().tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    assert attacker_slots([3, 1], 3).int().tolist() == [0, 1, 1, 0]


class SlotRecorder(attacks.QueryScorer):
    """A QueryScorer that keeps every query with its frozen (benign) images."""
    seen = []

    def __call__(self, x, logits):
        SlotRecorder.seen.append((x.detach().clone(), self.x0.clone(), self.frozen.clone()))
        super().__call__(x, logits)


def test_the_attacker_moves_only_its_slots_within_its_budget_and_benign_images_stay_bitwise_clean(
        monkeypatch, tmp_path):
    x, y, base, model = pixel_setup(16)
    for module in (evaluate, hpmkit_attackers()):
        monkeypatch.setattr(module, "QueryScorer", SlotRecorder)
    SlotRecorder.seen = []
    row = slot_row(base, model, K=2, eps=0.3)
    res = evaluate_rows([row], x, y, SLOT_ATTACKS, batch_size=8, eps=0.1, steps=3, queries=20,
                        save_adv=str(tmp_path))
    assert len(SlotRecorder.seen) > 50
    slots = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1] * 2, dtype=torch.bool)
    for q, x0, frozen in SlotRecorder.seen:
        assert q.shape == x0.shape
        benign = frozen.nonzero().flatten()
        assert torch.equal(q[benign], x0[benign])  # bitwise the clean images
        moved = (q - x0).abs().flatten(1).amax(1)
        assert moved.max() <= 0.3 + 1e-9 and q.min() >= 0 and q.max() <= 1  # the attacker's budget
    xf = x.float() / 255
    for attack in SLOT_ATTACKS:
        saved = torch.load(engine.adv_path(str(tmp_path), row.name, attack), weights_only=True)["x_adv"]
        assert torch.equal(saved[~slots], xf[~slots]), attack
        assert (saved - xf).abs().max() <= 0.3 + 1e-6, attack
    assert res.row(row.name).benign_clean == 1.0


def hpmkit_attackers():
    from hpmkit import attackers
    return attackers


def test_one_attacker_image_in_a_batch_of_8_flips_a_benign_image_and_the_base_model_has_no_collateral():
    x, y, base, model = pixel_setup(16)
    rows = evaluate.build_rows(base, model, contexts=("batch",), attackers=[1], attacker_eps=1.0)
    res = evaluate_rows(rows, x, y, ["apgd-ce/fc", "benign:victim/soft"], batch_size=8, eps=0.05, steps=10)
    r = res.row("hpm/attackers-1")
    assert r.benign_clean == 1.0 and r.by_role("benign:victim/soft", "benign") < 1.0
    slots = r.attacker_slots
    assert sum(slots) == 2 and slots[7] == slots[15] == 1  # one attacker image in each batch of 8
    assert set(res.rows()) == {"base", "hpm/batch", "hpm/attackers-1"}  # no attacker row for the base
    assert not res.row("base").attacker_slots  # a per-image model: nobody's image changes another's


def test_where_the_batch_prototypes_cannot_matter_collateral_is_zero_and_own_is_the_image_context():
    """The mixer's C_batch half zero: the batch context is the image context, so the attacker's
    images change no benign label, and its own images fare as they do alone (the same attack on
    them, in batches of K, in the image context)."""
    x, y, base, model = pixel_setup(16)
    with torch.no_grad():
        model.head.mixer.weight[:, 100:] = 0  # C_hybrid = C_global W_g + b_m: no batch prototypes
    row = slot_row(base, model, K=2, eps=0.45)
    res = evaluate_rows([row], x, y, SLOT_ATTACKS, batch_size=8, eps=0.1, steps=6, queries=30)
    r = res.row(row.name)
    clean = r.correct("clean")
    slots = r.attacker_slots
    for attack in SLOT_ATTACKS:
        benign = [c for c, s in zip(r.correct(attack), slots) if not s]
        assert benign == [c for c, s in zip(clean, slots) if not s], attack  # no collateral, per image
    own = torch.tensor(slots, dtype=torch.bool)
    alone = evaluate.build_rows(base, model, contexts=("image",))[1]
    mine = evaluate_rows([alone], x[own], y[own], ["apgd-ce/fc", "apgd-ce/mix"], batch_size=2, eps=0.45,
                         steps=6, score_queries=True).row("hpm/image")
    for attack in ("apgd-ce/fc", "apgd-ce/mix"):
        assert [c for c, s in zip(r.correct(f"own:{attack}"), slots) if s] == mine.correct(attack), attack
    assert r.own < r.by_role("clean", "own")  # the own attacks break something: the equality is not trivial


def test_with_more_classes_than_a_batch_holds_one_attacker_image_takes_a_benign_images_label():
    """100 classes, batches of 64: every class of a batch is there once, most are absent. An attacker
    image the FC layer assigns to a benign image's class, far from it, takes that class's batch
    prototype away from it (by hand); the evaluation's victim attack finds such images."""
    x, y, base, model = pixel_setup(64)
    xf = x.float() / 255
    victim = 5
    attacker = torch.full((1, 1, 10, 10), 0.99)
    attacker.view(-1)[y[victim]] = 1.0  # every pixel bright, the victim's class the brightest
    batch = torch.cat([xf[:63], attacker])
    with torch.no_grad():
        assert model.head.fc(model.features(attacker)).argmax(1).item() == y[victim]
        before = model(xf[:64]).argmax(1)
        after = model(batch).argmax(1)
    assert torch.equal(before, y) and after[victim] != y[victim]  # one image took the label away
    res = evaluate_rows([slot_row(base, model)], x, y, ["benign:victim/soft"], batch_size=64, eps=0.05, steps=10)
    r = res.row("hpm/attackers-1")
    assert r.benign_clean == 1.0 and r.by_role("benign:victim/soft", "benign") <= 0.5


def test_each_collateral_attack_breaks_benign_images_the_others_leave():
    """spread (one run: the cheapest), victim (one copy of the batch per standing image) and square
    (no gradients): each breaks benign images on a model built for it."""
    x, y, base, model = pixel_setup(64)
    row = slot_row(base, model)
    kw = dict(batch_size=64, eps=0.05, steps=20, queries=300)
    r = evaluate_rows([row], x, y, ["benign:spread/soft", "benign:victim/soft"], **kw).row(row.name)
    slots = r.attacker_slots
    spread = [c for c, s in zip(r.correct("benign:spread/soft"), slots) if not s]
    victim = [c for c, s in zip(r.correct("benign:victim/soft"), slots) if not s]
    assert sum(spread) <= 0.8 * len(spread)  # spread breaks a fifth at the cost of one run
    assert r.passes_per_image("benign:spread/soft") * 5 < r.passes_per_image("benign:victim/soft")
    assert sum(1 for a, b in zip(spread, victim) if a and not b) >= 20  # victim: those spread left
    # Without gradients (quantised inputs), only the black-box search finds collateral.
    q = nn.Sequential(Quantize(10), *pixel_linear())
    _, _, _, qmodel = pixel_setup(64, base=q)
    rq = evaluate_rows([slot_row(q, qmodel)], x, y, ["benign:spread/soft", "benign:victim/soft",
                                                     "benign:square"], **kw).row("hpm/attackers-1")
    assert rq.by_role("benign:spread/soft", "benign") == rq.by_role("benign:victim/soft", "benign") == 1.0
    assert rq.by_role("benign:square", "benign") < 1.0


def test_the_own_attacks_fool_the_attackers_images_through_their_slots_alone():
    x, y, base, model = pixel_setup(16)
    r = evaluate_rows([slot_row(base, model, K=2, eps=0.45)], x, y, ["own:apgd-ce/mix", "own:apgd-dlr/soft"],
                      batch_size=8, eps=0.05, steps=10).row("hpm/attackers-2")
    assert r.by_role("clean", "own") == 1.0 and r.own <= 0.5
    assert r.benign_clean == 1.0


def test_attacker_rows_chunked_equal_batch_by_batch_and_resume_to_the_same_file(tmp_path, monkeypatch):
    x, y, base, model = pixel_setup(32)
    row = slot_row(base, model, K=1, eps=1.0)
    kw = dict(batch_size=8, eps=0.05, steps=4, queries=20)
    attacks_ = ["own:apgd-ce/mix", "benign:spread/soft", "benign:square", "benign:victim/soft"]
    one = evaluate_rows([row], x, y, attacks_, chunk=None, **kw).row(row.name)
    chunked = evaluate_rows([row], x, y, attacks_, chunk=24, **kw).row(row.name)
    assert one.per_image == chunked.per_image and one.finals == chunked.finals
    assert 0 < sum(one.correct("worst_case")) < 32

    paths = {"model": str(tmp_path / "pixel.pt"), "data": str(tmp_path / "pixel.npz"), "head": str(tmp_path / "h.pt")}
    torch.save(base, paths["model"])
    np.savez(paths["data"], x=x.numpy(), y=y.numpy())
    save_head(paths["head"], model, HeadRecord("hpm", paths["model"], "mnist", "Linf", 8, 0.05, {},
                                               models.fingerprint(base.state_dict())), [], True)
    argv = ["--eps", "0.05", "--steps", "4", "--queries", "20", "--contexts", "batch", "--attacks",
            "apgd-ce/fc," + ",".join(attacks_), "--attackers", "1,2", "--attacker-eps", "1", "--chunk", "16"]
    whole = run_evaluate(paths, *argv, "--out", str(tmp_path / "whole.json"))
    real, calls = evaluate.run_slot_attack, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "run_slot_attack", dies)
    out = str(tmp_path / "resumed.json")
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(paths, *argv, "--out", out)
    assert read_results(out).complete is False
    monkeypatch.setattr(evaluate, "run_slot_attack", real)
    resumed = run_evaluate(paths, *argv, "--out", out)
    assert comparable(resumed) == comparable(whole) == comparable(read_results(out))
    assert {"hpm/attackers-1", "hpm/attackers-2"} <= set(whole.rows())


def test_context_sensitivity_counts_the_clean_labels_another_batch_order_changes():
    """On clean images, the fraction whose prediction changes when the subset's batches are formed
    again in random orders: none for a per-image model; for HPM's batch context exactly the images
    an independent re-batching (by hand, the same seeded orders) changes."""
    from hpmkit import checks
    x, y = quad_data(32)
    base = quad_linear()
    model = fitted_hpm(base, x, y)
    x = ((x.float() + x.roll(1, 0).float()) / 2).to(torch.uint8)  # halfway between two classes: ambiguous
    rows = evaluate.build_rows(base, model, contexts=("batch", "image"))
    data = FixedBatches(x, y, 8)
    assert not checks.context_sensitivity(rows[0], data, 3).any()
    assert not checks.context_sensitivity(rows[2], data, 3).any()
    changed = checks.context_sensitivity(rows[1], data, 3)
    xf = x.float() / 255
    with torch.no_grad():
        first = torch.cat([model(xf[a:a + 8]).argmax(1) for a in range(0, 32, 8)])
        expected = torch.zeros(32, dtype=torch.bool)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            perm = torch.randperm(32, generator=g)
            again = torch.cat([model(xf[perm][a:a + 8]).argmax(1) for a in range(0, 32, 8)])
            expected[perm] |= again != first[perm]
    assert torch.equal(changed, expected) and 0 < changed.sum() < 32
