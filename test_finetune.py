"""Tests of finetune.py: the IKL loss against independent forms, the clean pass, the attack,
one training step, an end-to-end run on real MNIST images, and the one-line errors.

    .venv/bin/pytest -q test_finetune.py
"""
import copy
import gzip
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import finetune
from finetune import (CLIError, clean_pass, head_parameters, ikl_loss, load_head, main, parse_args,
                      perturb, read_checkpoint, soft_cross_entropy, train_step, weighted_mse)
from hpm import attach

HERE = Path(__file__).resolve().parent
MNIST = HERE.parent / "shared" / "data" / "mnist"


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
    C, S = clean_pass(model, x, y, T, batch, "cpu")
    with torch.no_grad():
        Z = model.features(x.float() / 255).double().numpy()  # (N, D)
    for c in range(3):
        np.testing.assert_allclose(model.head.prototypes[c].numpy(), Z[y.numpy() == c].mean(0), atol=1e-6)
    assert not model.head.prototypes[3].any() and model.head.seen.tolist() == [True, True, True, False]
    torch.testing.assert_close(C, model.head.prototypes)
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
    return parse_args(["--model", "m", "--dataset", "mnist", "--threat-model", threat_model, "--eps", str(eps),
                       "--step-size", str(eps / 4), "--steps", str(steps), "--attack-mode", mode,
                       "--alpha", "3", "--beta", "10", "--device", "cpu"])


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


# End to end on real MNIST images ---------------------------------------------------------

def mnist_slice(n):
    """The first n images of the real MNIST test set (uint8 (n, 1, 28, 28)), or, where the shared
    data is missing, n synthetic digits-like images: a bright 7x7 block at a class-given place."""
    if (MNIST / "t10k-images-idx3-ubyte.gz").exists():
        with gzip.open(MNIST / "t10k-images-idx3-ubyte.gz") as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n]
        with gzip.open(MNIST / "t10k-labels-idx1-ubyte.gz") as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int64)
        return x.copy(), y
    rng = np.random.default_rng(0)
    y = np.arange(n) % 10
    x = rng.integers(0, 60, (n, 1, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, col = 7 * (c // 4), 7 * (c % 4)
        x[i, 0, r:r + 7, col:col + 7] = 255
    return x, y


def tiny_cnn(x, y):
    """A small CNN with BatchNorm (buffers that would drift in train mode), trained for a moment."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    xf, yt = torch.from_numpy(x).float() / 255, torch.from_numpy(y)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(60):
        idx = torch.arange(step * 64, step * 64 + 64) % len(xf)
        opt.zero_grad()
        F.cross_entropy(net(xf[idx]), yt[idx]).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    x, y = mnist_slice(256)
    np.savez(root / "train.npz", x=x, y=y)
    torch.save(tiny_cnn(x, y), root / "cnn.pt")  # a whole pickled nn.Module, as --model expects
    return root


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
    x, y = finetune.load_npz(str(files / "train.npz"))
    xb, yb = x[:64].float() / 255, y[:64]
    fresh = attach(torch.load(files / "cnn.pt", weights_only=False), momentum=0.98)
    _, S = clean_pass(fresh, x, y, 4.0, 64, "cpu")
    loss_before = fixed_batch_loss(fresh, S, xb, yb)
    model = main(parse_args(argv))
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
    ckpt = read_checkpoint(str(files / "head.pt"))
    assert ckpt["model"] == str(files / "cnn.pt") and ckpt["dataset"] == "mnist" and ckpt["finished"]
    assert (ckpt["num_classes"], ckpt["feature_dim"], ckpt["fc_name"]) == (10, 16, "7")
    assert ckpt["momentum"] == 0.98 and ckpt["attack_eps"] == 0.3 and ckpt["args"]["epochs"] == 3
    rebuilt = load_head(ckpt, attach(torch.load(ckpt["model"], weights_only=False), momentum=ckpt["momentum"]))
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
        main(parse_args(["--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data",
                         str(files / "train.npz"), "--epochs", "2", "--out", str(out), "--device", "cpu"]))
    ckpt = read_checkpoint(str(out))
    assert not ckpt["finished"] and [h["epoch"] for h in ckpt["history"]] == [1]
    base_fc = torch.load(files / "cnn.pt", weights_only=False)[7].weight
    assert not torch.equal(ckpt["head"]["fc.weight"], base_fc)  # the five steps taken are kept
    assert "interrupted" in capsys.readouterr().err


# Bad input: one clear line, no traceback -------------------------------------------------

def run_main(*argv):
    with pytest.raises(CLIError) as e:
        main(parse_args([*argv, "--device", "cpu"]))
    return str(e.value)


def test_unknown_robustbench_name_suggests_close_matches():
    msg = run_main("--model", "Cui2023Decoupled_WRN-28-1", "--dataset", "cifar10")
    assert "unknown RobustBench model" in msg and "Cui2023Decoupled_WRN-28-10" in msg


def test_missing_dataset_says_where_it_looked_and_how_to_get_it(files, tmp_path):
    msg = run_main("--model", str(files / "cnn.pt"), "--dataset", "cifar10", "--data-dir", str(tmp_path))
    assert str(tmp_path) in msg and "--data" in msg and "not found" in msg


def test_npz_with_wrong_shapes_is_refused(files, tmp_path):
    np.savez(tmp_path / "flat.npz", x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))
    msg = run_main("--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(tmp_path / "flat.npz"))
    assert "(N, C, H, W)" in msg and "(4, 28, 28)" in msg
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 1, 28, 28), np.uint8), y=np.zeros(3, np.int64))
    msg = run_main("--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(tmp_path / "short.npz"))
    assert "y must be integers of shape (4,)" in msg


def test_labels_out_of_range_are_refused(files, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 28, 28), np.uint8), y=np.array([0, 1, 10, 2]))
    msg = run_main("--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(tmp_path / "d.npz"))
    assert "[0, 10)" in msg and "[0, 10]" in msg


def test_images_the_model_cannot_take_are_refused_with_their_shape(files, tmp_path):
    np.savez(tmp_path / "rgb.npz", x=np.zeros((4, 3, 32, 32), np.uint8), y=np.zeros(4, np.int64))
    msg = run_main("--model", str(files / "cnn.pt"), "--dataset", "mnist", "--data", str(tmp_path / "rgb.npz"))
    assert "(3, 32, 32)" in msg and "\n" not in msg


def test_model_file_that_is_not_a_module_is_refused(files, tmp_path):
    torch.save(torch.load(files / "cnn.pt", weights_only=False).state_dict(), tmp_path / "sd.pt")
    msg = run_main("--model", str(tmp_path / "sd.pt"), "--dataset", "mnist", "--data", str(files / "train.npz"))
    assert "not a whole pickled nn.Module" in msg
    (tmp_path / "junk.pt").write_text("not a pickle")
    msg = run_main("--model", str(tmp_path / "junk.pt"), "--dataset", "mnist", "--data", str(files / "train.npz"))
    assert "could not load model file" in msg


def test_checkpoint_that_does_not_fit_is_refused(run, files):
    ckpt = read_checkpoint(str(files / "head.pt"))
    other = attach(nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 10)))
    with pytest.raises(CLIError, match="does not fit this model"):
        load_head(ckpt, other)
    with pytest.raises(CLIError, match="weights_only=True"):  # a pickled model is not a head checkpoint
        read_checkpoint(str(files / "cnn.pt"))


def test_cli_prints_one_error_line_and_exits_2(files, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 28, 28), np.uint8), y=np.array([0, 1, 10, 2]))
    result = subprocess.run(
        [sys.executable, str(HERE / "finetune.py"), "--model", str(files / "cnn.pt"), "--dataset", "mnist",
         "--data", str(tmp_path / "d.npz"), "--device", "cpu", "--out", str(tmp_path / "h.pt")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "h.pt").exists()
