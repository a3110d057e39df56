"""Models, data and names as a new user meets them (hpmkit/models.py, hpmkit/data.py): RobustBench
names and pickles, the README snippet, a model from your own code (FILE.py:NAME with --weights),
your own data, and where each default comes from.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
import finetune
from hpmkit import autoattack, checkpoint, cli, config, models
from hpmkit.checkpoint import read_head
from hpmkit.cli import CLIError
from hpmkit.data import load_npz

from conftest import (ROOT, K, quad_data, quad_linear, write_setup, run_evaluate, read_results, rows_of, run_script,
                      run_cli_out, refused, QUADNET, MYNET)


def rb_wideresnet():
    """A tiny WideResNet from robustbench's own classes (the class a RobustBench download has)."""
    autoattack.alias_autoattack()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    return WideResNet(depth=10, widen_factor=1, num_classes=10).eval()


@pytest.mark.slow
def test_a_pickled_robustbench_model_loads_through_both_command_lines(tmp_path):
    """A fresh Python (no `autoattack` alias yet) unpickles a model whose class is robustbench's."""
    torch.save(rb_wideresnet(), tmp_path / "rb.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),
             y=np.arange(8) % 10)
    common = ["--data", str(tmp_path / "c.npz"), "--device", "cpu", "--no-progress"]
    ft = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--model", str(tmp_path / "rb.pt"),
                         "--dataset", "cifar10", "--steps", "1", "--batch-size", "4",
                         "--out", str(tmp_path / "head.pt"), *common],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ft.returncode == 0, ft.stderr
    assert read_head(str(tmp_path / "head.pt"))["finished"] is True
    ev = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--head", str(tmp_path / "head.pt"),
                         "--model", str(tmp_path / "rb.pt"), "--steps", "1", "--queries", "2", "--attacks", "apgd-ce/fc,square",
                         "--n-examples", "8", "--out", str(tmp_path / "r.json"), *common],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    results = read_results(tmp_path / "r.json")
    assert results.complete and results.config["model"] == str(tmp_path / "rb.pt")


def test_the_readme_snippet_runs_as_written(monkeypatch):
    """The README's Python block, executed as it stands (the RobustBench download replaced by
    the same architecture built offline)."""
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    calls = []

    def offline_load_model(name, dataset, *a, **kw):
        calls.append((name, dataset))
        return rb_wideresnet()

    monkeypatch.setattr(models, "load_model", offline_load_model)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert calls == [("Cui2023Decoupled_WRN-28-10", "cifar10")]
    model, x = scope["model"], scope["x"]
    assert torch.equal(scope["oracle"], model.base_model(x))  # mode "fc" is the base model
    assert scope["logits"].shape == scope["alone"].shape == (len(x), 10)
    assert model.head.seen.any()  # the EMA update ran


def test_offline_robustbench_name_is_one_line(monkeypatch, tmp_path):
    autoattack.alias_autoattack()
    import robustbench.utils

    def no_network(**kw):
        raise ConnectionError("Max retries exceeded with url: /uc?id=...\n  (many more lines)\n...")

    monkeypatch.setattr(robustbench.utils, "load_model", no_network)
    with pytest.raises(CLIError) as e:
        models.load_model("Cui2023Decoupled_WRN-28-10", "cifar10", model_dir=str(tmp_path))
    assert "\n" not in str(e.value) and "--model PATH" in str(e.value)


def pickle_from_module(folder, name, code, make):
    """folder/name.py holding code, and make(module) pickled from it to folder/net.pt as a class of
    module `name` (as a user's script that imports it would save it); sys.modules as it was."""
    import importlib.util

    (folder / f"{name}.py").write_text(code)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pickle finds the class by module and name
    try:
        spec.loader.exec_module(module)
        net = make(module)
        torch.save(net, folder / "net.pt")
    finally:
        del sys.modules[name]
    return net


def own_files(tmp):
    """A user's folder: mynet.py, net.pt (a MyNet pickled from module mynet), w.pt (its
    state_dict), d.npz (32 images 3x16x16 of 10 classes). Returns the model."""
    torch.manual_seed(0)
    net = pickle_from_module(tmp, "mynet", MYNET, lambda m: m.MyNet())
    torch.save(net.state_dict(), tmp / "w.pt")
    rng = np.random.default_rng(0)
    np.savez(tmp / "d.npz", x=rng.integers(0, 256, (32, 3, 16, 16), dtype=np.uint8), y=np.arange(32) % 10)
    return net


@pytest.mark.slow
def test_a_users_model_and_data_run_through_the_scripts_called_by_path_from_their_folder(tmp_path, capsys,
                                                                                         monkeypatch):
    """The scripts run as `python /path/to/finetune.py` (their own folder on the import path, not
    the current one): the pickle's class is found in the current folder; the same model from
    code and weights gives the same base fingerprint, and evaluate.py takes it from the head."""
    net = own_files(tmp_path)
    folder = os.path.realpath(tmp_path)  # (what the scripts see as the current folder)

    def script(name, *argv):
        return subprocess.run([sys.executable, str(ROOT / name), *argv, "--device", "cpu", "--no-progress"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    tiny = ["--data", "d.npz", "--steps", "1", "--batch-size", "8"]
    ft = script("finetune.py", "--model", "net.pt", *tiny, "--out", "head.pt")
    assert ft.returncode == 0, ft.stderr
    ev = script("evaluate.py", "--head", "head.pt", "--model", "net.pt", "--data", "d.npz", "--n-examples", "16",
                "--steps", "1", "--queries", "5", "--attacks", "apgd-ce/fc,square", "--out", "r.json")
    assert ev.returncode == 0, ev.stderr
    assert read_results(tmp_path / "r.json").complete
    head = read_head(str(tmp_path / "head.pt"))
    assert (head["dataset"], head["model"], head["weights"]) == ("own", os.path.join(folder, "net.pt"), None)

    monkeypatch.chdir(tmp_path)  # the same model from code, in this process
    status, err = run_script("finetune", ["--model", "mynet.py:MyNet", "--weights", "w.pt", *tiny, "--out", "head2.pt",
                                          "--device", "cpu", "--no-progress"], capsys)
    assert status == 0, err
    head2 = read_head(str(tmp_path / "head2.pt"))
    assert head2["base_fingerprint"] == head["base_fingerprint"] == models.fingerprint(net.state_dict())
    assert head2["model"] == os.path.join(folder, "mynet.py") + ":MyNet"
    assert head2["weights"] == os.path.join(folder, "w.pt")
    status, err = run_script("evaluate", ["--head", "head2.pt", "--model", "mynet.py:MyNet", "--data", "d.npz",
                                          "--n-examples", "16", "--steps", "1", "--attacks", "apgd-ce/fc",
                                          "--out", "r2.json", "--device", "cpu", "--no-progress"], capsys)
    assert status == 0, err
    assert read_results(tmp_path / "r2.json").config["weights"] == os.path.join(folder, "w.pt")  # the head's


@pytest.mark.slow
def test_a_class_pickled_from_main_is_one_line_naming_the_code_and_weights_form(tmp_path, capsys, monkeypatch):
    own_files(tmp_path)
    (tmp_path / "train.py").write_text(MYNET + '\n\nimport torch\n\ntorch.save(MyNet(), "main.pt")\n')
    subprocess.run([sys.executable, "train.py"], cwd=tmp_path, check=True, timeout=120)
    monkeypatch.chdir(tmp_path)
    err = refused(tmp_path, capsys, "finetune", ["--model", "main.pt", "--data", "d.npz", "--out", "head.pt",
                                                 "--device", "cpu"],
                  r"holds class MyNet of a script run as __main__.*--model SCRIPT\.py:MyNet --weights W\.pt")
    assert 'torch.save(model.state_dict(), "W.pt")' in err


def test_a_pickled_models_class_is_found_beside_the_file_from_another_folder(tmp_path, monkeypatch):
    (tmp_path / "user").mkdir()
    torch.manual_seed(1)
    net = pickle_from_module(tmp_path / "user", "besidenet", MYNET, lambda m: m.MyNet())
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        loaded = models.load_model(str(tmp_path / "user" / "net.pt"), "own")
    finally:
        sys.modules.pop("besidenet", None)
    assert sys.path == path_before  # the file's folder was on it while unpickling only
    assert not loaded.training and models.fingerprint(loaded.state_dict()) == models.fingerprint(net.state_dict())


def test_weights_bare_or_under_state_dict_fill_the_model_the_code_builds(tmp_path, capsys):
    (tmp_path / "quadnet.py").write_text(QUADNET)
    ref = quad_linear(scale=0.5)
    torch.save(ref.state_dict(), tmp_path / "bare.pt")
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    x = quad_data(8)[0].float() / 255
    for weights in ("bare.pt", "wrapped.pt"):
        net = models.load_model(f"{tmp_path}/quadnet.py:build", "own", weights=str(tmp_path / weights))
        assert not net.training and torch.equal(net(x), ref(x)), weights
    assert "quadnet" not in sys.modules  # a file is loaded afresh, not left under its name
    models.load_model(f"{tmp_path}/quadnet.py:build", "own")
    assert capsys.readouterr().out == "note: no --weights: the model is used as build() builds it\n"


def test_a_module_spec_is_imported_from_the_current_folder_and_known_by_its_files_contents(tmp_path, monkeypatch):
    import hashlib

    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "quadnet.py").write_text(QUADNET)
    torch.save(quad_linear().state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    try:
        net = models.load_model("userpkg.quadnet:build", "own", weights="w.pt")
        identity = config.model_sha256("userpkg.quadnet:build")
    finally:
        for name in ("userpkg", "userpkg.quadnet"):
            sys.modules.pop(name, None)
    x = quad_data(4)[0].float() / 255
    assert torch.equal(net(x), quad_linear()(x))
    assert identity == hashlib.sha256((tmp_path / "userpkg" / "quadnet.py").read_bytes()).hexdigest() + ":build"


def test_own_data_alone_switches_nothing_on_silently_and_says_where_each_default_comes_from(tmp_path, capsys):
    x, y = quad_data(16)
    y[:4] = (y[:4] + 1) % K  # four labels the base model gets wrong
    paths = write_setup(tmp_path, quad_linear(), n=16, y=y)
    expected = (quad_linear()(x.float() / 255).argmax(1) == y).double().mean().item()  # 0.75
    argv = ["--model", paths["model"], "--data", paths["data"], "--steps", "1", "--batch-size", "8",
            "--device", "cpu", "--no-progress"]

    def finetune_run(out, *flags):
        assert cli.run_cli(finetune.main, finetune.parse_args, argv + ["--out", str(tmp_path / out), *flags]) == 0
        return capsys.readouterr().out.splitlines(), read_head(str(tmp_path / out))["args"]

    lines, args = finetune_run("a.pt")
    assert lines[:3] == [f"dataset own (--data {paths['data']} without --dataset: your own data, image size from "
                         "the file, classes from the model)",
                         "eps 0.03137 (8/255: own data's default, RobustBench's CIFAR budget; --eps to set)",
                         "augmentation off (own data's default; --augment to crop and flip)"]
    assert f"base model: clean accuracy {expected:.1%} on the 16 training images (no augmentation)" in lines
    assert (args["dataset"], args["augment"], args["eps"], args["epochs"], args["alpha"]) == ("own", False, 8 / 255, 1, 3.0)
    lines, args = finetune_run("b.pt", "--augment", "--eps", "0.1", "--threat-model", "L2")
    assert lines[1:3] == ["eps 0.1 (given as --eps)", "augmentation on (given as --augment)"]
    assert (args["augment"], args["eps"]) == (True, 0.1)
    lines, args = finetune_run("c.pt", "--threat-model", "L2")
    assert lines[1] == "eps 0.5 (own data's default, RobustBench's CIFAR budget; --eps to set)" and args["eps"] == 0.5

    # without --data or --dataset: CIFAR-10, and the lines say it is the default
    given = finetune.parse_args(["--model", "m", "--device", "cpu", "--out", str(tmp_path / "d.pt")])
    lines = config.finetune_origins(given, config.finetune_settings(given, finetune.DEFAULTS, finetune.OFFICIAL_ATTACK))
    assert lines == ["dataset cifar10 (the default; --dataset to choose, or --data FILE.npz alone for your own data)",
                     "eps 0.03137 (8/255: the paper's for cifar10; --eps to set)",
                     "augmentation on (the IKL code's for cifar10; --no-augment to turn it off)"]

    # evaluate.py on own data: its header says where eps and the batch size come from
    status, err = run_script("evaluate", ["--model", paths["model"], "--data", paths["data"], "--steps", "1",
                                          "--attacks", "apgd-ce", "--out", str(tmp_path / "r.json"),
                                          "--device", "cpu", "--no-progress"], capsys)
    assert status == 0, err
    res = read_results(tmp_path / "r.json")
    assert (res.config["dataset"], res.config["eps"], res.config["batch_size"]) == ("own", 8 / 255, 64)
    status, err = run_script("evaluate", ["--head", paths["head"], "--model", paths["model"], "--data", paths["data"],
                                          "--steps", "1", "--attacks", "apgd-ce/fc", "--contexts", "batch",
                                          "--out", str(tmp_path / "r2.json"), "--device", "cpu", "--no-progress"], capsys)
    assert status == 0, err


def test_evaluates_header_says_where_eps_and_the_batch_size_come_from(tmp_path, capsys):
    paths = write_setup(tmp_path, quad_linear(), n=8, batch_size=4)
    common = ["--model", paths["model"], "--data", paths["data"], "--steps", "1", "--device", "cpu", "--no-progress"]
    res = run_evaluate(paths, "--attacks", "apgd-ce/fc", "--contexts", "batch", "--out", str(tmp_path / "r.json"))
    out = capsys.readouterr().out.splitlines()
    assert "eps 0.3 (the head's: it was fine-tuned at this eps; --eps to set)" in out  # its attack_eps
    assert "batch size 4 (the head's fine-tuning batch size; --batch-size to set, 1 for the per-image model)" in out
    assert res.config["batch_size"] == 4
    assert cli.run_cli(evaluate.main, evaluate.parse_args, common + ["--attacks", "apgd-ce", "--eps", "1/10",
                                                                     "--out", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "eps 0.1 (given as --eps)" in out
    assert "batch size 64 (the default, the paper's fine-tuning batch size; --batch-size to set)" in out


def test_a_code_spec_and_its_weights_resume_by_content_whatever_the_path_spelling(tmp_path, capsys, monkeypatch):
    import hashlib

    paths = write_setup(tmp_path, quad_linear(), n=8)  # the head's base model: quad_linear()
    (tmp_path / "quadnet.py").write_text(QUADNET)
    torch.save(quad_linear().state_dict(), tmp_path / "w.pt")
    argv = ["--head", paths["head"], "--data", paths["data"], "--steps", "1", "--attacks", "apgd-ce/fc",
            "--contexts", "batch", "--out", str(tmp_path / "r.json"), "--device", "cpu", "--no-progress"]
    status, err = run_script("evaluate", argv + ["--model", f"{tmp_path}/quadnet.py:build", "--weights",
                                                 str(tmp_path / "w.pt")], capsys)
    assert status == 0, err
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    status, err = run_script("evaluate", argv + ["--model", "./quadnet.py:build", "--weights", "w.pt"], capsys)
    assert status == 0, err
    config_ = read_results(tmp_path / "r.json").config
    assert config_["model_sha256"] == hashlib.sha256((tmp_path / "quadnet.py").read_bytes()).hexdigest() + ":build"
    assert config_["weights_sha256"] == hashlib.sha256((tmp_path / "w.pt").read_bytes()).hexdigest()
    (tmp_path / "quadnet.py").write_text(QUADNET + "\n# edited\n")  # the same weights, other code
    refused(tmp_path, capsys, "evaluate", argv + ["--model", "quadnet.py:build", "--weights", "w.pt"],
            r"holds results of another configuration \(model_sha256: ")


def test_the_help_of_model_and_weights_names_each_form_and_that_code_runs(capsys):
    for module in (finetune, evaluate):
        with pytest.raises(SystemExit):
            module.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "FILE.py:NAME or package.module:NAME" in text and "--weights STATE_DICT.pt" in text, module
        assert "which runs code: only name files you trust" in text, module
        assert "torch.save(model.state_dict(), path)" in text, module


# Images in the forms people hold them, and a model saved mid-training (issue 37) ---------------

def test_float_and_grey_npz_files_give_the_per_image_results_of_their_uint8_form(tmp_path, capsys):
    """Float images k/255 (float32 and float64) and grey (N, H, W) images, uint8 or float, give the
    head fine-tuned and the per-image results of every row that the uint8 (N, 1, H, W) file gives."""
    paths = write_setup(tmp_path, quad_linear(), n=16)
    with np.load(paths["data"]) as f:
        x, y = f["x"], f["y"]
    assert x.dtype == np.uint8 and x.shape == (16, 1, 8, 8)
    forms = {"float32": x.astype(np.float32) / 255, "float64": x / 255.0, "grey": x[:, 0],
             "grey float": x[:, 0].astype(np.float32) / 255}
    for name, images in forms.items():
        np.savez(tmp_path / f"{name}.npz", x=images, y=y)
    assert load_npz(str(tmp_path / "float64.npz"))[0].dtype == torch.float32  # used as it is, not rounded

    def heads_and_results(data, tag):
        status, _, err = run_cli_out("finetune", ["--model", paths["model"], "--data", data, "--steps", "1",
                                                  "--batch-size", "8", "--out", str(tmp_path / f"{tag}.pt"),
                                                  "--device", "cpu", "--no-progress"], capsys)
        assert status == 0, err
        status, _, err = run_cli_out("evaluate", [
            "--head", paths["head"], "--model", paths["model"], "--data", data, "--steps", "2", "--queries", "5",
            "--attacks", "apgd-ce/fc,apgd-ce/mix,square", "--out", str(tmp_path / f"{tag}.json"), "--device", "cpu",
            "--no-progress"], capsys)
        assert status == 0, err
        head = checkpoint.load_checkpoint(str(tmp_path / f"{tag}.pt"))["head"]
        return head, {n: r.per_image for n, r in rows_of(read_results(tmp_path / f"{tag}.json")).items()}

    head, per_image = heads_and_results(paths["data"], "uint8")
    for i, name in enumerate(forms):
        other_head, other = heads_and_results(str(tmp_path / f"{name}.npz"), f"form{i}")
        assert other == per_image, name
        assert all(torch.equal(other_head[k], head[k]) for k in head), name


def test_a_model_saved_in_train_mode_is_said_in_one_line_and_evaluated_in_eval_mode(tmp_path, capsys):
    """A model with dropout pickled in train mode: one line says so, and its results are those of
    the same model pickled in eval mode (which gets no line)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), quad_linear())
    paths = write_setup(tmp_path, net, n=16)
    torch.save(net.eval(), tmp_path / "eval.pt")
    assert net.train().training and torch.load(paths["model"], weights_only=False).training

    def run(model, out):
        status, lines, err = run_cli_out("evaluate", ["--model", model, "--data", paths["data"], "--steps", "2",
                                                      "--attacks", "apgd-ce", "--out", str(tmp_path / out),
                                                      "--device", "cpu", "--no-progress"], capsys)
        assert status == 0, err
        assert "gives other logits" not in "\n".join(lines)  # (dropout on would make it stochastic)
        return [ln for ln in lines if "train mode" in ln], read_results(tmp_path / out)

    said, res = run(paths["model"], "train.json")
    assert said == [f"note: model file {paths['model']} was saved in train mode, where its Dropout layers act "
                    "otherwise; the scripts use it in eval mode (model.eval(): dropout off, batch norm's running "
                    "statistics)"]
    said, res_eval = run(str(tmp_path / "eval.pt"), "eval.json")
    assert said == [] and res.row("base").per_image == res_eval.row("base").per_image
