"""evaluate.py: the protocol. Known answers on the quadrant toy, gradient masking caught, peer
agreement with AutoAttack's own code, the batch context (saved adversarial batches re-scored), both
versions, and the gradient-masking checks on an honest model.
"""
import os

import pytest
import torch
import torch.nn as nn

import evaluate
import finetune
from hpm import attach
from hpmkit import catalogue, checkpoint, engine
from hpmkit.checkpoint import load_head_state, read_head
from hpmkit.cli import CLIError

from conftest import (K, SIZE, quadrant_mask, quad_data, quad_linear, Quantize, fitted_hpm, write_setup,
                      run_evaluate, comparable, read_results, rows_of, evaluate_rows, attack_once, TinyCNN,
                      masked_head_model, run_cli_out)


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
    res = evaluate_rows(evaluate.build_rows(base), x, y, attacks=catalogue.HPM_ATTACKS,
                            eps=eps, steps=10, queries=100, batch_size=16, progress=False,
                            log=lambda *a: None)
    row = res.row("base")
    assert row.clean == 1.0
    assert row.accuracies == {"apgd-ce": 1.0, "apgd-dlr": 1.0, "square": 1.0}
    assert row.worst_case == 1.0


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
    res = evaluate_rows(rows, x, y, attacks=["apgd-ce/fc", "apgd-ce/mix"], eps=eps, steps=10,
                            batch_size=16, progress=False, log=lambda *a: None)
    assert res.row("base").clean == 1.0 and res.row("base").accuracy("apgd-ce") == 0.0
    for ctx in ("batch", "image"):
        assert res.row(f"hpm/{ctx}").clean == 1.0
        assert res.row(f"hpm/{ctx}").accuracy("apgd-ce/mix") == 0.0
        assert res.row(f"hpm/{ctx}").worst_case == 0.0


def test_hard_argmax_masks_plain_apgd_but_msa_finds_it(tmp_path, capsys):
    x, y = quad_data(32)
    base, hpm_model = masked_head_model(x, y)
    paths = write_setup(tmp_path, base, head=hpm_model)
    res = run_evaluate(paths, "--eps", "0.45", "--steps", "10", "--contexts", "image", "--attacks",
                   "apgd-ce/ste,apgd-dlr/ste,apgd-dlr/fc,apgd-dlr/mix", "--checks",
                   "--checks-n", "16", "--out", str(tmp_path / "r.json"))
    row = res.row("hpm/image")
    assert row.clean == 1.0
    # Plain (end-to-end) APGD on the real model: looks perfectly robust.
    assert row.accuracy("apgd-ce/ste") == 1.0 and row.accuracy("apgd-dlr/ste") == 1.0
    # The Mixed Surrogate Attack finds the adversarial examples.
    assert min(row.accuracy("apgd-dlr/fc"), row.accuracy("apgd-dlr/mix")) <= 0.1
    assert row.worst_case <= 0.1
    assert row.checks["transfer_vs_end_to_end"]["status"] == "flag"
    assert row.checks["eps_sweep"]["status"] == "flag"  # apgd-ce/mix saturates: no fall to 0
    out = capsys.readouterr().out
    assert "transfer_vs_end_to_end  flag" in out
    assert "expected for HPM: obfuscated gradients; this is why MSA exists" in out


def test_quantised_input_masks_apgd_but_square_finds_it(tmp_path):
    x, y = quad_data(32)
    base = nn.Sequential(Quantize(10), *quad_linear())
    paths = write_setup(tmp_path, base)
    res = run_evaluate(paths, "--eps", "0.45", "--steps", "10", "--queries", "200", "--contexts",
                   "image", "--attacks", "apgd-ce/mix,apgd-dlr/ste,square", "--checks",
                   "--checks-n", "16", "--out", str(tmp_path / "r.json"))
    for name, row in rows_of(res).items():
        grads = [v for k, v in row.accuracies.items() if k != "square"]
        assert row.clean == 1.0 and grads == [1.0, 1.0], name  # zero gradients: no progress
        assert row.accuracy("square") <= 0.8, name  # the black-box attack is not fooled
        assert row.checks["square_vs_gradient"]["status"] == "flag", name
        assert row.checks["square_vs_gradient"]["images_only_square_breaks"] >= 7, name
        assert row.checks["eps_sweep"]["status"] == "flag", name
        assert row.checks["eps_sweep"]["accuracy"][-1] == 1.0, name


@pytest.mark.parametrize("norm,eps", [("Linf", 0.05), ("L2", 0.5)])
def test_apgd_ce_agrees_with_autoattack(norm, eps):
    from pyautoattack.autopgd_base import APGDAttack

    torch.manual_seed(0)
    base = TinyCNN().eval()
    x, _ = quad_data(24, seed=1)
    xf = x.float() / 255
    with torch.no_grad():
        y = base(xf).argmax(1)  # clean accuracy 1: every image is attacked
    res = evaluate_rows(evaluate.build_rows(base), x, y, attacks=["apgd-ce/fc"], norm=norm,
                            eps=eps, steps=10, batch_size=8, seed=3, progress=False,
                            log=lambda *a: None)
    peer = []
    for a in range(0, 24, 8):  # the same batches, steps and seed, AutoAttack's own class
        apgd = APGDAttack(base, n_iter=10, norm=norm, eps=eps, seed=3, loss="ce", device="cpu")
        adv = apgd.perturb(xf[a:a + 8], y[a:a + 8])
        with torch.no_grad():
            peer += (base(adv).argmax(1) == y[a:a + 8]).int().tolist()
    assert 0 < sum(peer) < len(peer)  # the attack neither fails nor succeeds everywhere
    assert res.row("base").correct("apgd-ce") == peer
    assert res.row("base").accuracy("apgd-ce") == sum(peer) / len(peer)


# Batch context -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """One run of the whole script with --save-adv and --checks on the honest linear model, with
    the paper's protocol (only final batches scored: each saved batch re-scores exactly)."""
    tmp = tmp_path_factory.mktemp("saved")
    x, y = quad_data(32)
    paths = write_setup(tmp, quad_linear())
    out, adv = str(tmp / "r.json"), str(tmp / "adv")
    results = run_evaluate(paths, "--eps", "0.42", "--steps", "8", "--queries", "60", "--attacks",
                       "apgd-ce/fc,apgd-ce/ste,apgd-ce/mix,apgd-dlr/soft,square", "--save-adv", adv,
                       "--checks", "--checks-n", "16", "--out", out, "--version", "paper")
    return {"results": results, "paths": paths, "out": out, "adv": adv}


def loaded_hpm(paths):
    """The HPM model rebuilt from the files, independently of evaluate.py."""
    base = torch.load(paths["model"], weights_only=False).eval()
    return load_head_state(read_head(paths["head"]), attach(base)).eval()


def test_the_results_file_names_its_run_and_holds_every_row_per_image(saved_run):
    on_disk = read_results(saved_run["out"])
    assert comparable(on_disk) == comparable(saved_run["results"])
    assert on_disk.complete is True
    assert set(on_disk.data["versions"]) >= {"torch", "torchvision", "pyautoattack", "robustbench", "python"}
    assert on_disk.subset["indices"] == sorted(on_disk.subset["indices"])
    assert on_disk.config["eps"] == 0.42 and on_disk.config["batch_size"] == 8
    assert any("weaker than it could be" in n for n in on_disk.data["notes"])
    for name, row in rows_of(on_disk).items():
        n = len(on_disk.subset["indices"])
        assert set(row.per_image) == {"clean", "worst_case", *row.accuracies}
        assert all(len(v) == n for v in row.per_image.values())
        for attack, accuracy in row.accuracies.items():  # each accuracy is its per-image list's mean
            assert accuracy == sum(row.correct(attack)) / n and row.seconds(attack) > 0, (name, attack)
    assert set(on_disk.row("hpm/batch").accuracies) == {"apgd-ce/fc", "apgd-ce/ste", "apgd-ce/mix",
                                                       "apgd-dlr/soft", "square"}
    assert set(on_disk.row("base").accuracies) == {"apgd-ce", "apgd-dlr", "square"}


def test_rescoring_saved_batches_reproduces_accuracy(saved_run):
    results, paths = saved_run["results"], saved_run["paths"]
    model = loaded_hpm(paths)
    row = results.row("hpm/batch")
    fooled_any = False
    for attack in row.accuracies:
        saved = torch.load(engine.adv_path(saved_run["adv"], "hpm/batch", attack), weights_only=True)
        x_adv, y = saved["x_adv"], saved["y"]
        assert x_adv.dtype == torch.float32 and x_adv.shape == (32, 1, SIZE, SIZE)
        correct = []
        with torch.no_grad():
            for a in range(0, len(y), 8):  # the fixed batches, each classified whole
                correct += (model(x_adv[a:a + 8], mode="ste", context="batch").argmax(1)
                            == y[a:a + 8]).int().tolist()
        assert correct == row.correct(attack), attack
        assert sum(correct) / len(correct) == row.accuracy(attack), attack
        fooled_any |= row.accuracy(attack) < row.clean
    assert fooled_any  # the check compares something that moved
    assert not os.path.exists(os.path.join(saved_run["adv"], "parts"))


def test_adversarial_images_stay_in_the_threat_model(saved_run):
    x, _ = quad_data(32)
    x = x.float() / 255
    for name in ("base", "hpm/batch", "hpm/image"):
        for attack in rows_of(saved_run["results"])[name].accuracies:
            saved = torch.load(engine.adv_path(saved_run["adv"], name, attack), weights_only=True)
            delta = (saved["x_adv"] - x[saved["indices"]]).abs().amax()
            assert delta <= 0.42 + 1e-6 and saved["x_adv"].min() >= 0 and saved["x_adv"].max() <= 1


def test_image_context_scores_equal_per_image_calls(saved_run):
    results, paths = saved_run["results"], saved_run["paths"]
    model = loaded_hpm(paths)
    row = results.row("hpm/image")
    x, y = quad_data(32)
    images = {"clean": x.float() / 255}
    for attack in row.accuracies:
        images[attack] = torch.load(engine.adv_path(saved_run["adv"], "hpm/image", attack),
                                    weights_only=True)["x_adv"]
    with torch.no_grad():
        for name, xs in images.items():
            alone = torch.cat([model(xs[i:i + 1], mode="ste", context="batch") for i in range(32)])
            together = evaluate.Surrogate(model, "ste", "image")(xs)
            torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
            assert (alone.argmax(1) == y).int().tolist() == row.correct(name), name


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

    target = Recorder(evaluate.Surrogate(model, "mix", "batch"))
    for attack in ("apgd-ce", "apgd-dlr"):
        attack_once(attack, target, x.float() / 255, y, eps=0.42, steps=6)
    assert len(sizes) == 2 * 7 and set(sizes) == {16}


def test_mixture_is_mean_log_softmax_from_one_backbone_pass():
    x, y = quad_data(12)
    model = fitted_hpm(quad_linear(), x, y)
    calls = []
    model.base_model.register_forward_hook(lambda *a: calls.append(1))
    xf = x.float() / 255
    for ctx in ("batch", "image"):
        calls.clear()
        mix = evaluate.Surrogate(model, "mix", ctx)(xf)
        assert len(calls) == 1
        expected = torch.stack([model(xf, mode=m, context=ctx).double().log_softmax(1)
                                for m in ("fc", "soft", "ste")]).mean(0)
        torch.testing.assert_close(mix.double(), expected, atol=1e-5, rtol=1e-5)


def test_paper_version_is_the_papers_protocol_on_autoattacks_own_attack_single_run(tmp_path):
    """--version paper: the paper's attack list and 40 steps, and in the batch context each
    attack is AutoAttack's attack_single_run on the whole batch, its final batch scored whole."""
    from pyautoattack.autopgd_base import APGDAttack

    x, y = quad_data(32)
    model = fitted_hpm(quad_linear(), x, y)
    paths = write_setup(tmp_path, quad_linear(), head=model)
    res = run_evaluate(paths, "--version", "paper", "--eps", "0.42", "--contexts", "batch",
                       "--queries", "20", "--out", str(tmp_path / "r.json"))
    assert res.config["steps"] == 40 and res.config["score_queries"] is False
    assert list(res.row("hpm/batch").accuracies) == list(catalogue.HPM_ATTACKS)
    xf = x.float() / 255
    for attack in ("apgd-ce/mix", "apgd-dlr/fc"):
        loss, surrogate = attack.split("/")[0].split("-")[1], attack.split("/")[1]
        target = evaluate.Surrogate(model, surrogate, "batch")
        peer = []
        for a in range(0, 32, 8):
            apgd = APGDAttack(target, n_iter=40, norm="Linf", eps=0.42, seed=0, loss=loss, device="cpu")
            apgd.init_hyperparam(xf[a:a + 8])
            torch.manual_seed(0)
            x_best, robust, _, x_best_adv = apgd.attack_single_run(xf[a:a + 8], y[a:a + 8])
            adv = torch.where(robust.view(-1, 1, 1, 1), x_best, x_best_adv)
            with torch.no_grad():
                peer += (model(adv, mode="ste", context="batch").argmax(1) == y[a:a + 8]).int().tolist()
        assert res.row("hpm/batch").correct(attack) == peer, attack


def test_strong_version_is_never_weaker_than_paper(tmp_path):
    x, y = quad_data(32)
    model = fitted_hpm(quad_linear(), x, y)
    paths = write_setup(tmp_path, quad_linear(), head=model)
    common = ["--eps", "0.35", "--steps", "10", "--queries", "20", "--contexts", "batch,image"]
    paper = run_evaluate(paths, "--version", "paper", *common, "--out", str(tmp_path / "p.json"))
    strong = run_evaluate(paths, *common, "--out", str(tmp_path / "s.json"))
    assert strong.version == "strong" and strong.config["score_queries"] is True
    for name, row in rows_of(strong).items():
        p = rows_of(paper)[name]
        for attack, correct in p.per_image.items():
            if attack != "worst_case":  # the same attack with queries scored: never more robust
                assert all(s <= c for s, c in zip(row.correct(attack), correct)), (name, attack)
        assert row.worst_case <= p.worst_case, name
        assert all(row.passes_per_image(a) > 0 for a in row.accuracies)


def test_restarts_run_again_from_new_starts_and_are_never_weaker():
    x, y = quad_data(32)
    model = fitted_hpm(quad_linear(), x, y)
    rows = evaluate.build_rows(quad_linear(), model)
    kw = dict(attacks=["apgd-ce/ste", "apgd-cw/mix"], eps=0.38, steps=5, batch_size=8,
              progress=False, log=lambda *a: None)
    one = evaluate_rows(rows, x, y, **kw)
    three = evaluate_rows(rows, x, y, restarts=3, **kw)
    for name, row in rows_of(three).items():
        for attack, correct in row.per_image.items():  # the first restart is the same run
            assert all(a <= b for a, b in zip(correct, rows_of(one)[name].correct(attack))), (name, attack)
    xf, queried = x[:8].float() / 255, []
    mix = rows[1].surrogate("mix", scorer=lambda q, logits: queried.append(q.clone()))
    runs = attack_once("apgd-ce", mix, xf, y[:8], eps=0.38, steps=3, restarts=3)
    assert len(runs) == 3 and len(queried) == 3 * 4  # each restart: its start and 3 steps
    starts = queried[0::4]
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[2])


def test_an_unfinished_head_is_evaluated_with_a_one_line_warning(tmp_path, capsys):
    paths = write_setup(tmp_path, quad_linear(), n=8)
    ckpt = checkpoint.load_checkpoint(paths["head"])
    torch.save({**ckpt, "finished": False, "history": [{"epoch": 1}]}, paths["head"])
    run_evaluate(paths, "--steps", "1", "--attacks", "apgd-ce/fc", "--contexts", "image",
                 "--out", str(tmp_path / "r.json"))
    warnings_ = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning:")]
    assert len(warnings_) == 1 and "unfinished head" in warnings_[0] and "1 epoch(s)" in warnings_[0]
    ckpt["finished"] = True  # a finished head: no warning
    torch.save(ckpt, paths["head"])
    run_evaluate(paths, "--steps", "1", "--attacks", "apgd-ce/fc", "--contexts", "image",
                 "--out", str(tmp_path / "r2.json"))
    assert "warning:" not in capsys.readouterr().out


def test_a_three_class_model_runs_the_attacks_the_refusal_suggests(tmp_path, capsys):
    """The suggested --attacks (everything but APGD-T and flip) run on a 3-class HPM model."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 3))
    x, _ = quad_data(16)
    with torch.no_grad():
        y = base(x.float() / 255).argmax(1)
    paths = write_setup(tmp_path, base, n=16, y=y, head=fitted_hpm(base, x, y))
    ckpt = checkpoint.load_checkpoint(paths["head"])
    torch.save({**ckpt, "num_classes": 3}, paths["head"])
    with pytest.raises(CLIError, match="pass --attacks") as refused:
        run_evaluate(paths, "--steps", "2", "--queries", "10", "--out", str(tmp_path / "r.json"))
    suggested = str(refused.value).split("--attacks ")[1]
    res = run_evaluate(paths, "--steps", "2", "--queries", "10", "--attacks", suggested,
                       "--out", str(tmp_path / "r.json"))
    assert set(res.row("hpm/batch").accuracies) == set(suggested.split(","))
    assert "apgd-dlr" in res.row("base").accuracies and res.complete


def test_eps_is_accepted_as_a_fraction(tmp_path):
    paths = write_setup(tmp_path, quad_linear(), n=8)
    res = run_evaluate(paths, "--eps", "8/255", "--steps", "1", "--attacks", "apgd-ce/fc",
                       "--contexts", "image", "--out", str(tmp_path / "r.json"))
    assert res.config["eps"] == 8 / 255
    assert finetune.parse_args(["--model", "m", "--eps", "4/255"]).eps == 4 / 255
    with pytest.raises(CLIError, match="argument --eps: not a number or a fraction like 8/255: '8/0'"):
        finetune.parse_args(["--model", "m", "--eps", "8/0"])


def test_a_head_without_a_fingerprint_loads_with_a_one_line_note(tmp_path, capsys):
    paths = write_setup(tmp_path, quad_linear(), n=8)
    ckpt = checkpoint.load_checkpoint(paths["head"])
    del ckpt["base_fingerprint"]  # a head written before fingerprints existed
    torch.save(ckpt, paths["head"])
    res = run_evaluate(paths, "--steps", "1", "--attacks", "apgd-ce/fc", "--out", str(tmp_path / "r.json"))
    notes = [ln for ln in capsys.readouterr().out.splitlines() if "fingerprint" in ln]
    assert len(notes) == 1 and "cannot be checked" in notes[0]
    assert res.row("hpm/batch").clean == 1.0


# The gradient-masking checks pass an honest model (the masked models above are flagged) ---------


def test_checks_pass_an_honest_model(saved_run):
    for name, row in rows_of(saved_run["results"]).items():
        for check in ("eps_sweep", "doubled_steps", "square_vs_gradient"):
            assert row.checks[check]["status"] == "pass", (name, check, row.checks[check])
        assert row.checks["eps_sweep"]["accuracy"][-1] == 0.0


# A head's threat model: evaluated at the eps it was fine-tuned at (issue 37) ---------------------

def test_a_head_is_evaluated_at_its_fine_tuning_eps_and_another_eps_is_said_in_one_line(tmp_path, capsys):
    """A head fine-tuned on own data at eps 0.2 (not own data's default, 8/255) is evaluated at 0.2
    when --eps is left out, the header saying it is the head's, with the same per-image results as
    --eps 0.2 given; --eps 0.1 is used, one line naming both budgets."""
    paths = write_setup(tmp_path, quad_linear(), n=16)
    status, _, err = run_cli_out("finetune", ["--model", paths["model"], "--data", paths["data"], "--eps", "0.2",
                                              "--steps", "1", "--batch-size", "8", "--out", str(tmp_path / "own.pt"),
                                              "--device", "cpu", "--no-progress"], capsys)
    assert status == 0, err
    head = read_head(str(tmp_path / "own.pt"))
    assert (head["dataset"], head["threat_model"], head["attack_eps"]) == ("own", "Linf", 0.2)
    ev = ["--head", str(tmp_path / "own.pt"), "--model", paths["model"], "--data", paths["data"], "--steps", "2",
          "--attacks", "apgd-ce/fc,apgd-ce/mix", "--device", "cpu", "--no-progress"]

    def run(out, *flags):
        status, lines, err = run_cli_out("evaluate", ev + ["--out", str(tmp_path / out), *flags], capsys)
        assert status == 0, err
        return read_results(tmp_path / out), lines

    res, lines = run("default.json")
    assert res.config["eps"] == 0.2
    assert "eps 0.2 (the head's: it was fine-tuned at this eps; --eps to set)" in lines
    given, lines_given = run("given.json", "--eps", "0.2")
    assert {n: r.per_image for n, r in rows_of(res).items()} == {n: r.per_image for n, r in rows_of(given).items()}
    assert not [ln for ln in lines_given if "fine-tuned at" in ln]  # the same budget: nothing to say
    other, lines = run("other.json", "--eps", "0.1")
    assert other.config["eps"] == 0.1
    assert [ln for ln in lines if "eps 0.2" in ln or "fine-tuned" in ln] == [
        "eps 0.1 (given as --eps; the head was fine-tuned at Linf eps 0.2: this is another threat model than the "
        "one it was trained for)"]
