"""finetune.py: IKL against independent computations, the training step, the command line end to
end, what the official IKL code does (class weights, attack loss, augmentation), and the study's
control heads (Adv-DPNP's unified prototypes against the paper's formulas, NCM).
"""
import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import finetune
from finetune import clean_pass, head_parameters, ikl_loss, perturb, soft_cross_entropy, train_step, weighted_mse
from hpm import attach
from hpmkit import cli, config, controls
from hpmkit import data as data_module
from hpmkit.checkpoint import load_head_state, read_head
from hpmkit.data import load_npz

from conftest import TOL, K, quad_data, quad_linear


# IKL against independent computations, in double precision --------------------------------

def random_logits(B=5, K=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    zn = (3 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_()
    za = (3 * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.rand(B, K, generator=g, dtype=torch.float64).softmax(1)  # rows sum to 1, as rows of S
    return zn, za, w


def pairwise_wmse(zn, za, w):
    """The IKL code's form, O(K^2) per image: 0.25 * sum_{j,l} w_j w_l ((zn_j - zn_l) - (za_j - za_l))^2."""
    B, K = zn.shape
    total = 0
    for i in range(B):
        for j in range(K):
            for l in range(K):
                gap = (zn[i, j] - zn[i, l]) - (za[i, j] - za[i, l])
                total = total + 0.25 * w[i, j] * w[i, l] * gap ** 2
    return total / B


def test_weighted_mse_equals_pairwise_form_and_spec_form():
    zn, za, w = random_logits()
    ours = weighted_mse(zn, za, w)
    pairwise = pairwise_wmse(zn, za, w)
    d = zn - za
    spec = (0.5 * ((w * d ** 2).sum(1) - (w * d).sum(1) ** 2)).mean()  # SPEC.md's words
    torch.testing.assert_close(ours, pairwise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, spec, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours, [zn, za])
    g_pair = torch.autograd.grad(pairwise, [zn, za])
    for a, b in zip(g_ours, g_pair):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weighted_mse_sends_gradients_to_clean_and_adversarial_logits():
    zn, za, w = random_logits(seed=1)
    g_zn, g_za = torch.autograd.grad(weighted_mse(zn, za, w), [zn, za])
    assert g_zn.abs().min() > 0 and g_za.abs().min() > 0  # no stop-gradient on either side
    torch.testing.assert_close(g_zn, -g_za, rtol=0, atol=1e-14)  # a function of zn - za only
    # d/dd_j of 0.5 * Var_w(d), averaged over the batch: w_j (d_j - sum_l w_l d_l) / B
    d = (zn - za).detach()
    expected = w * (d - (w * d).sum(1, keepdim=True)) / len(d)
    torch.testing.assert_close(g_zn, expected, rtol=1e-12, atol=1e-12)


def test_soft_cross_entropy_matches_direct_sum_and_holds_the_clean_side_fixed():
    zn, za, _ = random_logits(seed=2)
    B, K = zn.shape
    direct = 0.0
    for i in range(B):
        p = [math.exp(v) for v in zn[i].tolist()]
        p = [v / sum(p) for v in p]
        log_norm = math.log(sum(math.exp(v) for v in za[i].tolist()))
        direct -= sum(p[j] * (za[i, j].item() - log_norm) for j in range(K))
    direct /= B
    ours = soft_cross_entropy(zn, za)
    assert abs(ours.item() - direct) < 1e-12
    g_za, = torch.autograd.grad(ours, za, retain_graph=True)
    torch.testing.assert_close(g_za, (za.softmax(1) - zn.softmax(1)).detach() / B, rtol=1e-12, atol=1e-12)
    assert not torch.autograd.grad(ours, zn, allow_unused=True, materialize_grads=True)[0].any()


def test_ikl_loss_is_ce_plus_beta_wmse_plus_alpha_softce_with_weights_of_the_true_class():
    zn, za, _ = random_logits(B=6, K=4, seed=3)
    g = torch.Generator().manual_seed(4)
    S = torch.rand(4, 4, generator=g, dtype=torch.float64).softmax(1)
    y = torch.tensor([0, 3, 1, 1, 2, 3])
    alpha, beta = 3.0, 10.0
    ce = np.mean([np.log(np.exp(zn[i].tolist()).sum()) - zn[i, y[i]].item() for i in range(6)])
    expected = ce + beta * pairwise_wmse(zn, za, S[y]).item() + alpha * soft_cross_entropy(zn, za).item()
    assert abs(ikl_loss(zn, za, y, S, alpha, beta).item() - expected) < 1e-10


# The clean pass, the attack and one step, on tiny models ---------------------------------

def tiny_mlp(K=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, K)).eval()


def test_clean_pass_sets_exact_class_means_and_weights():
    K, T, batch = 4, 4.0, 7
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 3, 2, 2), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (20,), generator=g)  # class 3 never occurs
    model = attach(tiny_mlp(K))
    S = clean_pass(model, x, y, T, batch, "cpu")  # (C_global is read from the head, as finetune.py does)
    with torch.no_grad():
        Z = model.features(x.float() / 255).double().numpy()  # (N, D)
    for c in range(3):
        np.testing.assert_allclose(model.head.prototypes[c].numpy(), Z[y.numpy() == c].mean(0), atol=1e-6)
    assert not model.head.prototypes[3].any() and model.head.seen.tolist() == [True, True, True, False]
    # S[c]: mean of softmax(zn / T) over class c, zn the HPM logits of the clean pass's batches
    rows = {c: [] for c in range(K)}
    with torch.no_grad():
        for i in range(0, 20, batch):
            zn = model.head(torch.from_numpy(Z[i:i + batch]).float()).double().numpy()
            for z, c in zip(zn, y[i:i + batch].tolist()):
                e = np.exp(z / T - (z / T).max())
                rows[c].append(e / e.sum())
    for c in range(3):
        np.testing.assert_allclose(S[c].numpy(), np.mean(rows[c], 0), atol=1e-6)
    np.testing.assert_allclose(S[3].numpy(), np.full(K, 1 / K), atol=1e-7)  # absent class: uniform
    np.testing.assert_allclose(S.sum(1).numpy(), np.ones(K), atol=1e-6)


def attack_args(threat_model="Linf", eps=0.1, mode="ste", steps=10):
    """The settings of one training step, fixed here (attack on the whole training loss, S held)."""
    args = finetune.parse_args(["--model", "m", "--dataset", "mnist", "--threat-model", threat_model,
                                "--eps", str(eps), "--step-size", str(eps / 4), "--steps", str(steps),
                                "--attack-mode", mode, "--alpha", "3", "--beta", "10", "--device", "cpu",
                                "--class-weights", "fixed", "--attack-loss", "train", "--no-augment"])
    args.attack_alpha, args.attack_beta = args.alpha, args.beta
    return args


@pytest.mark.parametrize("threat_model, eps", [("Linf", 0.1), ("L2", 1.0)])
def test_attack_stays_in_the_ball_and_raises_ikl(threat_model, eps):
    model = attach(tiny_mlp())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 2, 2, generator=g)
    y = torch.randint(0, 4, (16,), generator=g)
    with torch.no_grad():
        model.head.update_prototypes(model.features(x), y)
        S = torch.full((4, 4), 0.25)
        zn = model(x)
    args = attack_args(threat_model, eps)
    torch.manual_seed(0)
    x_adv = perturb(model, x, zn, y, S, args)
    delta = (x_adv - x).flatten(1)
    norm = delta.abs().amax(1) if threat_model == "Linf" else delta.norm(dim=1)
    assert norm.max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert ikl_loss(zn, model(x_adv), y, S, 3, 10) > ikl_loss(zn, model(x), y, S, 3, 10) + 1e-3
    assert all(p.grad is None for p in model.parameters())  # the attack touches no parameter .grad


def test_train_step_moves_only_fc_and_mixer_and_the_ema_sees_clean_features():
    model = attach(tiny_mlp())
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 3, 2, 2, generator=g)
    y = torch.arange(16) % 3  # classes 0, 1, 2 present, 3 absent
    with torch.no_grad():
        model.head.update_prototypes(model.features(x[:4]), y[:4])
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.Adam(head_parameters(model), lr=1e-2)
    torch.manual_seed(0)
    train_step(model, optimizer, x, y, torch.full((4, 4), 0.25), attack_args())
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"head.fc.weight", "head.fc.bias", "head.mixer.weight", "head.mixer.bias",
                     "head.prototypes"}
    with torch.no_grad():  # Eq. 14 on the clean features, lam = 0.98, absent class 3 untouched
        z = model.features(x)
    for c in range(3):
        expected = 0.98 * before["head.prototypes"][c] + 0.02 * z[y == c].mean(0)
        torch.testing.assert_close(after["head.prototypes"][c], expected, rtol=0, atol=1e-6)
    assert torch.equal(after["head.prototypes"][3], before["head.prototypes"][3])


def fixed_batch_loss(model, S, x, y):
    """The training objective on one fixed batch, the attack re-run from the same seed."""
    torch.manual_seed(123)
    with torch.no_grad():
        z = model.features(x)
        zn = model.head(z)
    x_adv = perturb(model, x, zn, y, S, attack_args(eps=0.3))
    with torch.no_grad():
        return ikl_loss(zn, model(x_adv), y, S, 3.0, 10.0).item()


@pytest.fixture(scope="module")
def run(files):
    argv = ["--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(files / "train.npz"),
            "--epochs", "3", "--lr", "2e-3", "--out", str(files / "head.pt"), "--device", "cpu"]
    x, y = load_npz(str(files / "train.npz"))
    xb, yb = x[:64].float() / 255, y[:64]
    fresh = attach(torch.load(files / "cnn.pt", weights_only=False), momentum=0.98)
    S = clean_pass(fresh, x, y, 4.0, 64, "cpu")
    loss_before = fixed_batch_loss(fresh, S, xb, yb)
    model = finetune.main(finetune.parse_args(argv))
    return {"model": model, "fresh": fresh, "S": S, "xb": xb, "yb": yb, "loss_before": loss_before,
            "ckpt": torch.load(files / "head.pt", weights_only=True)}


def test_finetune_lowers_the_training_loss(run):
    losses = [h["loss"] for h in run["ckpt"]["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    loss_after = fixed_batch_loss(run["model"], run["S"], run["xb"], run["yb"])
    assert loss_after < run["loss_before"] - 0.01


def test_finetune_moves_only_fc_and_mixer(run):
    model, fresh = run["model"], run["fresh"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.fc.weight", "head.fc.bias", "head.mixer.weight", "head.mixer.bias"}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, fresh.get_parameter(n))}
    assert moved == trainable


def test_finetune_leaves_the_base_model_bitwise_unchanged(run, files):
    original = torch.load(files / "cnn.pt", weights_only=False).state_dict()
    trained = run["model"].base_model.state_dict()
    assert original.keys() == trained.keys() and any("running_mean" in k for k in original)
    assert all(torch.equal(original[k], trained[k]) for k in original)
    assert not any(m.training for m in run["model"].base_model.modules())


def test_checkpoint_reloads_through_attach_and_load_head_to_identical_outputs(run, files):
    ckpt = read_head(str(files / "head.pt"))
    assert ckpt["model"] == str(files / "cnn.pt") and ckpt["dataset"] == "mnist" and ckpt["finished"]
    assert (ckpt["num_classes"], ckpt["feature_dim"], ckpt["fc_name"]) == (10, 16, "7")
    assert ckpt["momentum"] == 0.98 and ckpt["attack_eps"] == 0.3 and ckpt["args"]["epochs"] == 3
    rebuilt = load_head_state(ckpt, attach(torch.load(ckpt["model"], weights_only=False), momentum=ckpt["momentum"]))
    with torch.no_grad():
        for mode in ("ste", "soft", "fc"):
            for context in ("batch", "image"):
                assert torch.equal(rebuilt(run["xb"], mode, context), run["model"](run["xb"], mode, context))


def test_an_interrupted_run_keeps_its_checkpoint(files, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupted_step(*a):
        calls.append(1)
        if len(calls) == 6:  # the second batch of epoch 2 (4 batches per epoch)
            raise KeyboardInterrupt
        return train_step(*a)

    monkeypatch.setattr(finetune, "train_step", interrupted_step)
    out = tmp_path / "head.pt"
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune.parse_args(["--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data",
                         str(files / "train.npz"), "--epochs", "2", "--out", str(out), "--device", "cpu"]))
    ckpt = read_head(str(out))
    assert not ckpt["finished"] and [h["epoch"] for h in ckpt["history"]] == [1]
    base_fc = torch.load(files / "cnn.pt", weights_only=False)[7].weight
    assert not torch.equal(ckpt["head"]["fc.weight"], base_fc)  # the five steps taken are kept
    assert "interrupted" in capsys.readouterr().err


def interrupt_at(monkeypatch, step):
    """Make the fine-tuning raise KeyboardInterrupt (what SIGINT raises) at its step-th batch."""
    calls = []

    def interrupted_step(*a):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return train_step(*a)

    monkeypatch.setattr(finetune, "train_step", interrupted_step)


def test_an_interrupt_never_replaces_a_finished_head(run, files, tmp_path, monkeypatch):
    out = tmp_path / "head.pt"
    out.write_bytes((files / "head.pt").read_bytes())  # a finished head, from the `run` fixture
    finished = out.read_bytes()
    argv = ["--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(files / "train.npz"),
            "--epochs", "2", "--out", str(out), "--device", "cpu", "--no-progress"]
    interrupt_at(monkeypatch, 6)  # the second batch of epoch 2
    assert cli.run_cli(finetune.main, finetune.parse_args, argv) == 130
    assert out.read_bytes() == finished
    unfinished = read_head(str(tmp_path / "head.unfinished.pt"))
    assert unfinished["finished"] is False and [h["epoch"] for h in unfinished["history"]] == [1]

    # Finishing replaces it, and the unfinished file goes.
    monkeypatch.setattr(finetune, "train_step", train_step)
    assert cli.run_cli(finetune.main, finetune.parse_args, argv) == 0
    assert read_head(str(out))["finished"] is True and out.read_bytes() != finished
    assert not (tmp_path / "head.unfinished.pt").exists()

    # --overwrite: asked for, so the unfinished head is written at --out itself.
    interrupt_at(monkeypatch, 2)
    assert cli.run_cli(finetune.main, finetune.parse_args, argv + ["--overwrite"]) == 130
    assert read_head(str(out))["finished"] is False


def test_class_weight_ema_follows_its_rule_on_two_batches():
    T, lam = 4.0, 0.9
    S = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    batches = [(torch.tensor([[2.0, 0.0, -1.0], [1.0, 1.0, 0.0], [0.0, 3.0, 1.0]], dtype=torch.float64),
                torch.tensor([0, 0, 1])),
               (torch.tensor([[0.5, 0.0, 2.0], [-1.0, 2.0, 0.0]], dtype=torch.float64), torch.tensor([2, 0]))]
    expected = [[1 / 3] * 3 for _ in range(3)]
    for zn, y in batches:
        finetune.update_class_weights(S, zn, y, T, lam)
        for c in range(3):  # by hand: mean of softmax(zn / T) over the rows of class c, then the EMA
            rows = [i for i in range(len(y)) if y[i] == c]
            if rows:
                p = [[math.exp(v / T) / sum(math.exp(u / T) for u in zn[i].tolist()) for v in zn[i].tolist()]
                     for i in rows]
                mean = [sum(r[j] for r in p) / len(rows) for j in range(3)]
                expected[c] = [lam * expected[c][j] + (1 - lam) * mean[j] for j in range(3)]
    torch.testing.assert_close(S, torch.tensor(expected, dtype=torch.float64), **TOL)
    torch.testing.assert_close(S.sum(1), torch.ones(3, dtype=torch.float64), **TOL)


def spy_on_class_weights(monkeypatch):
    """Record the class weights S that every training step receives."""
    seen = []

    def spying_step(model, optimizer, x, y, S, args):
        seen.append(S.clone())
        return train_step(model, optimizer, x, y, S, args)

    monkeypatch.setattr(finetune, "train_step", spying_step)
    return seen


@pytest.mark.parametrize("weights", ["fixed", "ema"])
def test_class_weights_fixed_are_the_clean_pass_and_ema_start_uniform(weights, files, tmp_path, monkeypatch):
    seen = spy_on_class_weights(monkeypatch)
    finetune.main(finetune.parse_args(["--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data",
                                       str(files / "train.npz"), "--out", str(tmp_path / "h.pt"), "--device",
                                       "cpu", "--no-progress", "--steps", "2", "--class-weights", weights]))
    x, y = load_npz(str(files / "train.npz"))
    S = clean_pass(attach(torch.load(files / "cnn.pt", weights_only=False)), x, y, 4.0, 64, "cpu")
    assert len(seen) == 4  # 256 images, batches of 64
    if weights == "fixed":  # today's S, held for the run
        assert all(torch.equal(s, S) for s in seen)
    else:  # uniform first, then moving
        assert torch.equal(seen[0], torch.full_like(S, 0.1)) and not torch.equal(seen[1], seen[0])
        assert torch.allclose(seen[-1].sum(1), torch.ones(10))


def test_official_attack_loss_is_soft_ce_alone_on_cifar10():
    def settings(*argv):
        return config.finetune_settings(finetune.parse_args(["--model", "m", "--device", "cpu", *argv]), finetune.DEFAULTS, finetune.OFFICIAL_ATTACK)

    a = settings("--dataset", "cifar10")
    assert (a.attack_loss, a.attack_alpha, a.attack_beta, a.alpha, a.beta) == ("official", 1.0, 0.0, 3.0, 10.0)
    assert (settings("--dataset", "cifar100").attack_alpha, settings("--dataset", "cifar100").attack_beta) == (1.0, 1.0)
    b = settings("--dataset", "cifar10", "--attack-loss", "train")
    assert (b.attack_alpha, b.attack_beta) == (3.0, 10.0)
    # Its gradient with respect to the adversarial logits is softCE's, which the attack ascends.
    zn, za, w = random_logits()
    y = torch.arange(5) % 7
    S = torch.softmax(torch.randn(7, 7, dtype=torch.float64), 1)
    za1, za2 = za.detach().clone().requires_grad_(True), za.detach().clone().requires_grad_(True)  # leaves: .grad kept
    ikl_loss(zn, za1, y, S, a.attack_alpha, a.attack_beta).backward()
    soft_cross_entropy(zn, za2).backward()
    torch.testing.assert_close(za1.grad, za2.grad, **TOL)
    assert za1.grad.abs().max() > 1e-3  # (a gradient there, not two Nones)


def test_the_help_states_the_per_dataset_defaults_that_finetune_settings_resolves(capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split("options:")[1].split())
    value = {"all": None, "on": True, "off": False}
    for key, flag in (("epochs", "--epochs"), ("momentum", "--momentum"), ("alpha", "--alpha"), ("beta", "--beta"),
                      ("T", "--T"), ("per_class", "--per-class"), ("augment", "--augment")):
        said = re.search(r"per dataset[^:]*: (.*?)(?: \(|\))", text[re.search(flag + "[ ,]", text).start():]).group(1)
        stated = {}  # "1 for cifar10, mnist and own data; 2 for cifar100 and imagenet" -> {dataset: value}
        for part in said.split("; "):
            v, datasets = part.split(" for ")
            for d in re.split(", | and ", datasets):
                stated["own" if d == "own data" else d] = value.get(v, v)
        assert sorted(stated) == sorted(finetune.DEFAULTS), flag
        for d, v in stated.items():
            argv = ["--data", "own.npz"] if d == "own" else ["--dataset", d]
            cfg = config.finetune_settings(finetune.parse_args(["--model", "m", "--device", "cpu", *argv]),
                                           finetune.DEFAULTS, finetune.OFFICIAL_ATTACK)
            assert getattr(cfg, key) == (v if v is None or isinstance(v, bool) else float(v)), (flag, d)


def test_random_crop_flip_is_a_crop_of_the_padded_image_and_a_flip():
    x = torch.randint(0, 256, (6, 3, 5, 7), dtype=torch.uint8)
    out = data_module.random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    g = torch.Generator().manual_seed(0)  # the same draws, one image at a time
    top, left = torch.randint(0, 5, (6,), generator=g), torch.randint(0, 5, (6,), generator=g)
    flip = torch.rand(6, generator=g) < 0.5
    assert flip.any() and (~flip).any()
    for i in range(6):
        padded = torch.zeros(3, 9, 11, dtype=torch.uint8)
        padded[:, 2:7, 2:9] = x[i]
        crop = padded[:, top[i]:top[i] + 5, left[i]:left[i] + 7]
        assert torch.equal(out[i], crop.flip(-1) if flip[i] else crop), i


# The study's control heads: Adv-DPNP's unified prototypes, against the paper's formulas ------


def dpnp_setup(B=6, M=4, D=5, seed=0):
    torch.manual_seed(seed)
    head = controls.DPNPHead(nn.Linear(D, M), alpha=3.0).double()
    with torch.no_grad():
        head.prototypes.add_(0.3 * torch.randn_like(head.prototypes))  # off the sphere
    z = torch.randn(B, D, dtype=torch.float64)
    return head, z, z + 0.2 * torch.randn_like(z), torch.arange(B) % M


def test_dpnp_losses_equal_the_papers_formulas():
    head, z, z_adv, y = dpnp_setup()
    C, a = head.prototypes.detach(), head.alpha
    B, M = len(y), C.shape[0]

    def p(zz, i):  # Eq. 1 for one image, written out
        s = [math.exp(float(C[j] @ zz[i]) / a) for j in range(M)]
        return [v / sum(s) for v in s]

    dpp = sum(-math.log(p(z, i)[y[i]]) + 0.1 / 2 * float((z[i] - C[y[i]]).pow(2).sum()) for i in range(B)) / B
    assert float(controls.dpp_loss(head(z), z, C, y, 0.1)) == pytest.approx(dpp, rel=1e-12)
    dnp = 0.0
    for j in range(M):  # Eq. 4-5: the nearest other prototype, then sum of |.|^(1/2)
        k = min((k for k in range(M) if k != j), key=lambda k: float((C[k] - C[j]).norm()))
        dnp -= float((C[j] - C[k]).abs().sqrt().sum()) / M
    assert float(dnp_value := controls.dnp_loss(C)) == pytest.approx(dnp, rel=1e-12) and dnp_value < 0
    dfa = sum(sum(p(z, i)[j] * math.log(p(z, i)[j] / p(z_adv, i)[j]) for j in range(M)) for i in range(B)) / B
    assert float(controls.dfa_loss(head(z), head(z_adv))) == pytest.approx(dfa, rel=1e-10)
    dpp_adv = sum(-math.log(p(z_adv, i)[y[i]]) + 0.1 / 2 * float((z_adv[i] - C[y[i]]).pow(2).sum())
                  for i in range(B)) / B
    total = 0.1 * dnp + (dpp + dpp_adv + 2.0 * dfa) / 2  # Eq. 7
    assert float(controls.adv_dpnp_loss(head, z, z_adv, y)) == pytest.approx(total, rel=1e-10)


def test_prototypes_get_no_gradient_from_the_adversarial_dpp_term_and_do_from_dfa():
    head, z, z_adv, y = dpnp_setup()
    z_adv.requires_grad_(True)

    def grad_of(loss_fn):
        head.zero_grad()
        z_adv.grad = None
        loss_fn().backward()
        return head.prototypes.grad.clone(), z_adv.grad.clone()

    # Eq. 7 minus everything but the adversarial DPP term: the prototypes' gradient vanishes.
    full = grad_of(lambda: controls.adv_dpnp_loss(head, z, z_adv, y))
    no_adv = grad_of(lambda: controls.adv_dpnp_loss(head, z, z_adv, y) - controls.dpp_loss(
        z_adv @ head.prototypes.detach().t() / head.alpha, z_adv, head.prototypes.detach(), y, 0.1) / 2)
    torch.testing.assert_close(full[0], no_adv[0], **TOL)
    assert not torch.allclose(full[1], no_adv[1])  # the features still get that term's gradient
    dfa = grad_of(lambda: controls.dfa_loss(head(z), head(z_adv)))
    assert dfa[0].abs().max() > 1e-6  # Algorithm 1, line 21: DFA moves the prototypes


def test_prototypes_return_to_the_sphere_and_the_backbone_stays_frozen():
    x, y = quad_data(16)
    base = quad_linear()
    before = copy.deepcopy(base.state_dict())
    model = controls.attach_dpnp(base, alpha=40.0)
    torch.testing.assert_close(model.head.prototypes.norm(dim=1), torch.full((K,), 40.0))
    opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
    xf = x.float() / 255
    for _ in range(3):
        loss = controls.adv_dpnp_loss(model.head, model.features(xf), model.features((xf + 0.05).clamp(0, 1)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(model.head.prototypes.norm(dim=1), torch.full((K,), 40.0))
    model.head.renormalize()
    torch.testing.assert_close(model.head.prototypes.norm(dim=1), torch.full((K,), 40.0))
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert not any(m.training for m in model.train().base_model.modules())


# The study's controls through the command lines: DPNP (head-only Adv-DPNP) and NCM ----------

@pytest.mark.parametrize("head", ["dpnp", "ncm"])
def test_control_heads_train_head_only_and_round_trip_through_evaluate(head, files, tmp_path):
    out = tmp_path / f"{head}.pt"
    model = finetune.main(finetune.parse_args([
        "--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(files / "train.npz"),
        "--out", str(out), "--device", "cpu", "--no-progress", "--steps", "2", "--head", head]))
    base = torch.load(files / "cnn.pt", weights_only=False)
    assert all(torch.equal(v, model.base_model.state_dict()[k]) for k, v in base.state_dict().items())
    ckpt = read_head(str(out))
    assert ckpt["head_type"] == head and ckpt["finished"]
    x, y = load_npz(str(files / "train.npz"))
    if head == "dpnp":
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"head.prototypes"} and ckpt["alpha"] == 40.0
        start = 40.0 * F.normalize(base[7].weight, dim=1)  # the head's start, on the sphere
        assert not torch.allclose(ckpt["head"]["prototypes"], start)  # it learned
    else:  # NCM: C_global the exact class means, the mixer passes it alone, nothing trained
        Z = attach(base).features(x.float() / 255).double()
        means = torch.stack([Z[y == c].mean(0) for c in range(10)])
        torch.testing.assert_close(ckpt["head"]["prototypes"].double(), means, rtol=1e-5, atol=1e-5)
        D = means.shape[1]
        assert torch.equal(ckpt["head"]["mixer.weight"], torch.cat([torch.eye(D), torch.zeros(D, D)], 1))
    np.savez(tmp_path / "test.npz", x=x[:16].numpy(), y=y[:16].numpy())
    res = evaluate.main(evaluate.parse_args([
        "--head", str(out), "--model", str(files / "cnn.pt"), "--data", str(tmp_path / "test.npz"),
        "--n-examples", "16", "--steps", "2",
        "--queries", "5", "--batch-size", "8", "--device", "cpu", "--no-progress",
        "--out", str(tmp_path / "r.json")]))
    rows = set(res.rows())
    if head == "dpnp":
        assert rows == {"base", "dpnp"} and set(res.row("dpnp").accuracies) == set(res.row("base").accuracies)
        rebuilt = load_head_state(ckpt, controls.attach_dpnp(copy.deepcopy(base)))
        with torch.no_grad():
            clean = (rebuilt(x[:16].float() / 255).argmax(1) == y[:16]).float().mean().item()
        assert res.row("dpnp").clean == pytest.approx(clean)
    else:
        assert rows == {"base", "hpm/image"}
    assert res.config["head_type"] == head
