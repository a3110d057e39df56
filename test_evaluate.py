"""Tests of evaluate.py: known answers, caught gradient masking, agreement with AutoAttack,
the batch context, resuming, and clean errors. CPU, tiny models, fixed seeds.

The toy data: 8x8 grey images of 4 classes, class c has its quadrant c bright (0.9) and the
rest dark (0.1), with a little noise. The toy model: a linear classifier that sums each
quadrant, so its robust margin is known in closed form.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
from finetune import CLIError, load_head, read_checkpoint
from hpm import attach

HERE = os.path.dirname(os.path.abspath(__file__))
K, SIZE, D = 4, 8, 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and fair to other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quadrant_mask(c):
    m = torch.zeros(1, SIZE, SIZE)
    r, col = divmod(c, 2)
    m[0, r * SIZE // 2:(r + 1) * SIZE // 2, col * SIZE // 2:(col + 1) * SIZE // 2] = 1
    return m  # (1, H, W)


def quad_data(n, seed=0):
    """uint8 images (n, 1, 8, 8) and int64 labels; classes in turn."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = 25 + 205 * torch.stack([quadrant_mask(int(c)) for c in y])  # dark 0.1, bright 0.9
    x = x + torch.randint(-12, 13, x.shape, generator=g)
    return x.clamp(0, 255).to(torch.uint8), y


def quad_linear(scale=1.0):
    """logit_c = scale * (sum of quadrant c): ends in an nn.Linear, as HPM needs."""
    fc = nn.Linear(D, K)
    with torch.no_grad():
        fc.weight.copy_(scale * torch.stack([quadrant_mask(c).flatten() for c in range(K)]))
        fc.bias.zero_()
    return nn.Sequential(nn.Flatten(), fc)


class Quantize(nn.Module):
    """round(x * levels) / levels: the forward is honest, the gradient is zero everywhere."""

    def __init__(self, levels=10):
        super().__init__()
        self.levels = levels

    def forward(self, x):
        return torch.round(x * self.levels) / self.levels


def fitted_hpm(base, x, y):
    """attach() with C_global set to the clean class means (what finetune.py does first)."""
    model = attach(copy.deepcopy(base))
    with torch.no_grad():
        model.head.update_prototypes(model.features(x.float() / 255), y)
    return model


def write_setup(tmp, base, n=32, seed=0, head=None, y=None, batch_size=8):
    """Model file, .npz test set and head checkpoint in tmp; returns their paths."""
    x, y0 = quad_data(n, seed)
    y = y0 if y is None else y
    paths = {k: str(tmp / f) for k, f in (("model", "model.pt"), ("data", "test.npz"),
                                          ("head", "head.pt"))}
    torch.save(base, paths["model"])
    np.savez(paths["data"], x=x.numpy(), y=y.numpy())
    hpm_model = fitted_hpm(base, x, y0) if head is None else head
    torch.save({"head": hpm_model.head.state_dict(), "model": paths["model"], "dataset": "mnist",
                "threat_model": "Linf", "momentum": 0.98, "eps": 1e-6, "num_classes": K,
                "feature_dim": D, "fc_name": "1", "args": {"batch_size": batch_size},
                "history": []}, paths["head"])
    return paths


def run_main(paths, *argv):
    args = evaluate.parse_args(["--head", paths["head"], "--data", paths["data"], "--device", "cpu",
                                "--no-progress", "--n-examples", "1000000", *argv])
    return evaluate.main(args)


def strip_timings(obj):
    """The results without anything that measures time or names the output file."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items()
                if k not in ("timing", "timings_s", "out")}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def rows_of(results):
    rows = {"base": results["base"]}
    rows.update({f"hpm/{c}": r for c, r in results.get("hpm", {}).items()})
    return rows


# Known answers ------------------------------------------------------------------------------

def test_margin_above_eps_keeps_clean_accuracy():
    x, y = quad_data(32)
    base = quad_linear()
    eps = 0.1
    # The guarantee, independently: (w_y - w_j) . x > eps * ||w_y - w_j||_1 for every j != y
    # means no L-inf perturbation of size eps can change the prediction.
    W = base[1].weight.double()
    logits = x.double().flatten(1) / 255 @ W.t()  # (N, K)
    for j in range(K):
        other = y != j
        margin = logits[other, y[other]] - logits[other, j]
        assert (margin > eps * (W[y[other]] - W[j]).abs().sum(1)).all()
    res = evaluate.evaluate(evaluate.build_rows(base), x, y, attacks=evaluate.HPM_ATTACKS,
                            eps=eps, steps=10, queries=100, batch_size=16, progress=False,
                            log=lambda *a: None)
    row = res["base"]
    assert row["clean"] == 1.0
    assert row["attacks"] == {"apgd-ce": 1.0, "apgd-dlr": 1.0, "square": 1.0}
    assert row["worst_case"] == 1.0


def test_large_eps_drives_accuracy_to_zero():
    x, y = quad_data(32)
    base = quad_linear()
    eps = 0.6
    # An adversarial example exists for every image: darken quadrant y, brighten another.
    xf = x.float() / 255
    j = (y + 1) % K
    mask_y = torch.stack([quadrant_mask(int(c)) for c in y])
    mask_j = torch.stack([quadrant_mask(int(c)) for c in j])
    x_flip = (xf - eps * mask_y + eps * mask_j).clamp(0, 1)
    assert (base(x_flip).argmax(1) != y).all()

    hpm_model = fitted_hpm(base, x, y)
    rows = evaluate.build_rows(base, hpm_model)
    res = evaluate.evaluate(rows, x, y, attacks=["apgd-ce/fc", "apgd-ce/mix"], eps=eps, steps=10,
                            batch_size=16, progress=False, log=lambda *a: None)
    assert res["base"]["clean"] == 1.0 and res["base"]["attacks"]["apgd-ce"] == 0.0
    for ctx in ("batch", "image"):
        assert res["hpm"][ctx]["clean"] == 1.0
        assert res["hpm"][ctx]["attacks"]["apgd-ce/mix"] == 0.0
        assert res["hpm"][ctx]["worst_case"] == 0.0


# Gradient masking is caught ----------------------------------------------------------------

def masked_head_model(x, y):
    """A base model with saturated FC logits and an HPM head whose mixer passes only C_batch.

    In the "image" context the real logits are then -(1 - a_j) ||z|| with a = the hard (argmax)
    FC assignment: the prediction is the FC argmax, but every gradient of the real model is
    useless (the saturated softmax makes the STE gradient exactly zero; what is left points
    along ||z||, which the FC argmax ignores). The FC oracle itself is fine under DLR.
    """
    base = quad_linear(scale=50.0)
    hpm_model = fitted_hpm(base, x, y)
    with torch.no_grad():
        hpm_model.head.mixer.weight.zero_()
        hpm_model.head.mixer.weight[:, D:] = torch.eye(D)  # C_hybrid = C_batch
    return base, hpm_model


def test_hard_argmax_masks_plain_apgd_but_msa_finds_it(tmp_path, capsys):
    x, y = quad_data(32)
    base, hpm_model = masked_head_model(x, y)
    paths = write_setup(tmp_path, base, head=hpm_model)
    res = run_main(paths, "--eps", "0.45", "--steps", "10", "--contexts", "image", "--attacks",
                   "apgd-ce/ste,apgd-dlr/ste,apgd-dlr/fc,apgd-dlr/mix", "--checks",
                   "--checks-n", "16", "--out", str(tmp_path / "r.json"))
    row = res["hpm"]["image"]
    assert row["clean"] == 1.0
    # Plain (end-to-end) APGD on the real model: looks perfectly robust.
    assert row["attacks"]["apgd-ce/ste"] == 1.0 and row["attacks"]["apgd-dlr/ste"] == 1.0
    # The Mixed Surrogate Attack finds the adversarial examples.
    assert min(row["attacks"]["apgd-dlr/fc"], row["attacks"]["apgd-dlr/mix"]) <= 0.1
    assert row["worst_case"] <= 0.1
    assert row["checks"]["transfer_vs_end_to_end"]["status"] == "flag"
    assert row["checks"]["eps_sweep"]["status"] == "flag"  # apgd-ce/mix saturates: no fall to 0
    out = capsys.readouterr().out
    assert "transfer_vs_end_to_end  flag" in out
    assert "expected for HPM: obfuscated gradients; this is why MSA exists" in out


def test_quantised_input_masks_apgd_but_square_finds_it(tmp_path):
    x, y = quad_data(32)
    base = nn.Sequential(Quantize(10), *quad_linear())
    paths = write_setup(tmp_path, base)
    res = run_main(paths, "--eps", "0.45", "--steps", "10", "--queries", "200", "--contexts",
                   "image", "--attacks", "apgd-ce/mix,apgd-dlr/ste,square", "--checks",
                   "--checks-n", "16", "--out", str(tmp_path / "r.json"))
    for name, row in rows_of(res).items():
        grads = [v for k, v in row["attacks"].items() if k != "square"]
        assert row["clean"] == 1.0 and grads == [1.0, 1.0], name  # zero gradients: no progress
        assert row["attacks"]["square"] <= 0.8, name  # the black-box attack is not fooled
        assert row["checks"]["square_vs_gradient"]["status"] == "flag", name
        assert row["checks"]["square_vs_gradient"]["images_only_square_breaks"] >= 7, name
        assert row["checks"]["eps_sweep"]["status"] == "flag", name
        assert row["checks"]["eps_sweep"]["accuracy"][-1] == 1.0, name


def test_checks_pass_an_honest_model(saved_run):
    for name, row in rows_of(saved_run["results"]).items():
        for check in ("eps_sweep", "doubled_steps", "square_vs_gradient"):
            assert row["checks"][check]["status"] == "pass", (name, check, row["checks"][check])
        assert row["checks"]["eps_sweep"]["accuracy"][-1] == 0.0


# Peer agreement ------------------------------------------------------------------------------

class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, K)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("norm,eps", [("Linf", 0.05), ("L2", 0.5)])
def test_apgd_ce_agrees_with_autoattack(norm, eps):
    from pyautoattack.autopgd_base import APGDAttack

    torch.manual_seed(0)
    base = TinyCNN().eval()
    x, _ = quad_data(24, seed=1)
    xf = x.float() / 255
    with torch.no_grad():
        y = base(xf).argmax(1)  # clean accuracy 1: every image is attacked
    res = evaluate.evaluate(evaluate.build_rows(base), x, y, attacks=["apgd-ce/fc"], norm=norm,
                            eps=eps, steps=10, batch_size=8, seed=3, progress=False,
                            log=lambda *a: None)
    peer = []
    for a in range(0, 24, 8):  # the same batches, steps and seed, AutoAttack's own class
        apgd = APGDAttack(base, n_iter=10, norm=norm, eps=eps, seed=3, loss="ce", device="cpu")
        adv = apgd.perturb(xf[a:a + 8], y[a:a + 8])
        with torch.no_grad():
            peer += (base(adv).argmax(1) == y[a:a + 8]).int().tolist()
    assert 0 < sum(peer) < len(peer)  # the attack neither fails nor succeeds everywhere
    assert res["base"]["correct"]["apgd-ce"] == peer
    assert res["base"]["attacks"]["apgd-ce"] == sum(peer) / len(peer)


# Batch context -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One run of the whole script with --save-adv and --checks on the honest linear model."""
    tmp = tmp_path_factory.mktemp("saved")
    x, y = quad_data(32)
    paths = write_setup(tmp, quad_linear())
    out, adv = str(tmp / "r.json"), str(tmp / "adv")
    results = run_main(paths, "--eps", "0.42", "--steps", "8", "--queries", "60", "--attacks",
                       "apgd-ce/fc,apgd-ce/ste,apgd-ce/mix,apgd-dlr/soft,square", "--save-adv", adv,
                       "--checks", "--checks-n", "16", "--out", out)
    return {"results": results, "paths": paths, "out": out, "adv": adv}


def loaded_hpm(paths):
    """The HPM model rebuilt from the files, independently of evaluate.py."""
    base = torch.load(paths["model"], weights_only=False).eval()
    return load_head(read_checkpoint(paths["head"]), attach(base)).eval()


def test_json_holds_what_the_issue_asks(saved_run):
    with open(saved_run["out"]) as f:
        on_disk = json.load(f)
    assert strip_timings(on_disk) == strip_timings(saved_run["results"])
    assert on_disk["complete"] is True
    assert set(on_disk["versions"]) >= {"torch", "torchvision", "pyautoattack", "robustbench", "python"}
    assert on_disk["subset"]["indices"] == sorted(on_disk["subset"]["indices"])
    assert on_disk["config"]["eps"] == 0.42 and on_disk["config"]["batch_size"] == 8
    assert any("weaker than it could be" in n for n in on_disk["notes"])
    for name, row in rows_of(on_disk).items():
        assert {"clean", "attacks", "worst_case", "correct", "timings_s"} <= set(row)
        n = len(on_disk["subset"]["indices"])
        assert all(len(v) == n and set(v) <= {0, 1} for v in row["correct"].values())
        # worst case: correct clean and under every attack, per image
        per_image = [int(all(v)) for v in zip(*(row["correct"][k] for k in ["clean", *row["attacks"]]))]
        assert row["correct"]["worst_case"] == per_image
        assert row["worst_case"] == sum(per_image) / n
        assert all(row["worst_case"] <= a for a in [row["clean"], *row["attacks"].values()])
    assert set(on_disk["hpm"]["batch"]["attacks"]) == {"apgd-ce/fc", "apgd-ce/ste", "apgd-ce/mix",
                                                       "apgd-dlr/soft", "square"}
    assert set(on_disk["base"]["attacks"]) == {"apgd-ce", "apgd-dlr", "square"}


def test_rescoring_saved_batches_reproduces_accuracy(saved_run):
    results, paths = saved_run["results"], saved_run["paths"]
    model = loaded_hpm(paths)
    row = results["hpm"]["batch"]
    fooled_any = False
    for attack in row["attacks"]:
        saved = torch.load(evaluate.adv_path(saved_run["adv"], "hpm/batch", attack), weights_only=True)
        x_adv, y = saved["x_adv"], saved["y"]
        assert x_adv.dtype == torch.float32 and x_adv.shape == (32, 1, SIZE, SIZE)
        correct = []
        with torch.no_grad():
            for a in range(0, len(y), 8):  # the fixed batches, each classified whole
                correct += (model(x_adv[a:a + 8], mode="ste", context="batch").argmax(1)
                            == y[a:a + 8]).int().tolist()
        assert correct == row["correct"][attack], attack
        assert sum(correct) / len(correct) == row["attacks"][attack], attack
        fooled_any |= row["attacks"][attack] < row["clean"]
    assert fooled_any  # the check compares something that moved
    assert not os.path.exists(os.path.join(saved_run["adv"], "parts"))


def test_adversarial_images_stay_in_the_threat_model(saved_run):
    x, _ = quad_data(32)
    x = x.float() / 255
    for name in ("base", "hpm/batch", "hpm/image"):
        for attack in rows_of(saved_run["results"])[name]["attacks"]:
            saved = torch.load(evaluate.adv_path(saved_run["adv"], name, attack), weights_only=True)
            delta = (saved["x_adv"] - x[saved["indices"]]).abs().amax()
            assert delta <= 0.42 + 1e-6 and saved["x_adv"].min() >= 0 and saved["x_adv"].max() <= 1


def test_image_context_scores_equal_per_image_calls(saved_run):
    results, paths = saved_run["results"], saved_run["paths"]
    model = loaded_hpm(paths)
    row = results["hpm"]["image"]
    x, y = quad_data(32)
    images = {"clean": x.float() / 255}
    for attack in row["attacks"]:
        images[attack] = torch.load(evaluate.adv_path(saved_run["adv"], "hpm/image", attack),
                                    weights_only=True)["x_adv"]
    with torch.no_grad():
        for name, xs in images.items():
            alone = torch.cat([model(xs[i:i + 1], mode="ste", context="batch") for i in range(32)])
            together = evaluate.Surrogates(model, "ste", "image")(xs)
            torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
            assert (alone.argmax(1) == y).int().tolist() == row["correct"][name], name


def test_batch_context_attack_sees_the_whole_batch():
    x, y = quad_data(16)
    model = fitted_hpm(quad_linear(), x, y)
    sizes = []

    class Recorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, xb):
            sizes.append(xb.shape[0])
            return self.inner(xb)

    target = Recorder(evaluate.Surrogates(model, "mix", "batch"))
    for attack in ("apgd-ce", "apgd-dlr"):
        evaluate.run_attack(attack, target, x.float() / 255, y, eps=0.42, steps=6, whole_batch=True)
    assert len(sizes) == 2 * 7 and set(sizes) == {16}


def test_mixture_is_mean_log_softmax_from_one_backbone_pass():
    x, y = quad_data(12)
    model = fitted_hpm(quad_linear(), x, y)
    calls = []
    model.base_model.register_forward_hook(lambda *a: calls.append(1))
    xf = x.float() / 255
    for ctx in ("batch", "image"):
        calls.clear()
        mix = evaluate.Surrogates(model, "mix", ctx)(xf)
        assert len(calls) == 1
        expected = torch.stack([model(xf, mode=m, context=ctx).double().log_softmax(1)
                                for m in ("fc", "soft", "ste")]).mean(0)
        torch.testing.assert_close(mix.double(), expected, atol=1e-5, rtol=1e-5)


# Resume ----------------------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_results(tmp_path, monkeypatch):
    paths = write_setup(tmp_path, quad_linear())
    argv = ["--eps", "0.42", "--steps", "5", "--queries", "30", "--contexts", "batch", "--attacks",
            "apgd-ce/mix,apgd-dlr/fc,square", "--checks", "--checks-n", "16"]
    whole = run_main(paths, *argv, "--out", str(tmp_path / "whole.json"))

    real = evaluate.run_attack
    calls = []

    def dies_on_the_seventh_call(*a, **kw):  # base: apgd-ce takes calls 1-4, apgd-dlr 5-8
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = str(tmp_path / "resumed.json")
    monkeypatch.setattr(evaluate, "run_attack", dies_on_the_seventh_call)
    with pytest.raises(KeyboardInterrupt):
        run_main(paths, *argv, "--out", out)
    with open(out) as f:
        partial = json.load(f)
    assert partial["complete"] is False and partial["base"]["batches_done"]["apgd-dlr"] == 2
    assert "apgd-dlr" not in partial["base"]["attacks"]  # interrupted inside its batches
    monkeypatch.setattr(evaluate, "run_attack", real)
    resumed = run_main(paths, *argv, "--out", out)
    with open(out) as f:
        on_disk = json.load(f)
    assert strip_timings(resumed) == strip_timings(whole) == strip_timings(on_disk)

    # An attack subset first, then the full list: the same results again.
    out2 = str(tmp_path / "in_two.json")
    first = ["--eps", "0.42", "--steps", "5", "--queries", "30", "--contexts", "batch",
             "--attacks", "apgd-dlr/fc"]
    run_main(paths, *first, "--out", out2)
    assert strip_timings(run_main(paths, *argv, "--out", out2)) == strip_timings(whole)


def test_another_configuration_in_out_is_refused(tmp_path):
    paths = write_setup(tmp_path, quad_linear(), n=8)
    argv = ["--steps", "2", "--contexts", "image", "--attacks", "apgd-ce/fc",
            "--out", str(tmp_path / "r.json")]
    run_main(paths, "--eps", "0.1", *argv)
    with pytest.raises(CLIError, match="another configuration.*eps"):
        run_main(paths, "--eps", "0.2", *argv)
    assert run_main(paths, "--eps", "0.2", "--overwrite", *argv)["config"]["eps"] == 0.2


# Clean errors ------------------------------------------------------------------------------------

def nan_model():
    base = quad_linear()
    with torch.no_grad():
        base[1].bias[0] = float("nan")
    return base


@pytest.mark.parametrize("case,message", [
    ("missing data", "does not exist"),
    ("missing model", "model file .* does not exist"),
    ("head does not fit", "does not fit this model"),
    ("nan logits", "NaN or inf logits"),
    ("labels out of range", r"labels must lie in \[0, 4\)"),
    ("images of the wrong shape", r"cannot classify the images \(1, 6, 6\)"),
])
def test_bad_input_gives_a_clean_error(tmp_path, case, message):
    y = torch.arange(8) % K
    if case == "labels out of range":
        y = y + 3
    paths = write_setup(tmp_path, nan_model() if case == "nan logits" else quad_linear(), n=8, y=y)
    extra = []
    if case == "missing data":
        paths["data"] = str(tmp_path / "nowhere.npz")
    elif case == "missing model":
        extra = ["--model", str(tmp_path / "nowhere.pt")]
    elif case == "images of the wrong shape":
        np.savez(paths["data"], x=np.zeros((8, 1, 6, 6), np.uint8), y=y.numpy())
    elif case == "head does not fit":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(D, K + 1)), paths["model"])
    with pytest.raises(CLIError, match=message):
        run_main(paths, "--steps", "1", "--attacks", "apgd-ce/fc", "--out",
                 str(tmp_path / "r.json"), *extra)


def test_unknown_robustbench_model_is_one_line_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "evaluate.py"), "--model",
                           "Cui2023Decoupled_WRN-28-1", "--dataset", "cifar10", "--out",
                           str(tmp_path / "r.json")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown RobustBench model") and "Traceback" not in proc.stderr
    assert "Cui2023Decoupled_WRN-28-10" in proc.stderr  # the suggestion
