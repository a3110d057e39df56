"""Bad input, through the command lines: the project's promise is one line `error: ...` naming the
cause, exit status 2, no traceback, every file under the folder byte-identical and no folder made
(conftest.refused checks all of it, for every case). Each case is named for the input; its
expected message says what the line must name.
"""
import contextlib
import errno
import io
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
from hpmkit import checkpoint, cli, report, results
from hpmkit.checkpoint import read_head

from conftest import (ROOT, K, SIZE, D, quadrant_mask, quad_data, quad_linear, fitted_hpm, write_setup, run_evaluate,
                      read_results, snapshot, sweep_argv, sweep, with_flag, run_script, refused, edit_head, copy_run,
                      QUADNET, nan_model)


# Bad input through either script: one table of cases, each refused by conftest.refused ---------

def bad_input_setup(tmp, case):
    """Files for one bad-input case in tmp; returns (script, argv)."""
    paths = write_setup(tmp, quad_linear(), n=8)
    ev = ["--head", paths["head"], "--model", paths["model"], "--data", paths["data"], "--steps", "1",
          "--attacks", "apgd-ce/fc", "--out", str(tmp / "r.json"), "--device", "cpu", "--no-progress"]
    base_only = ["--model", paths["model"], "--dataset", "mnist", "--data", paths["data"], "--steps", "1",
                 "--out", str(tmp / "r.json"), "--device", "cpu", "--no-progress"]
    ft = ["--model", paths["model"], "--dataset", "mnist", "--data", paths["data"], "--steps", "1",
          "--out", str(tmp / "new_head.pt"), "--device", "cpu", "--no-progress"]
    # (grey images (N, H, W) are taken as one channel since issue 37: flat vectors are the wrong shape)
    npz = {"finetune: x of flat vectors (N, H*W)": (np.zeros((4, SIZE * SIZE), np.uint8), np.zeros(4, np.int64)),
           "finetune: y shorter than x": (np.zeros((4, 1, SIZE, SIZE), np.uint8), np.zeros(3, np.int64)),
           "finetune: labels out of range": (np.zeros((4, 1, SIZE, SIZE), np.uint8), np.array([0, 1, 10, 2])),
           "labels out of range": (np.zeros((4, 1, SIZE, SIZE), np.uint8), np.array([0, 1, 10, 2])),
           "finetune: RGB images for a grey model": (np.zeros((4, 3, 32, 32), np.uint8), np.zeros(4, np.int64))}
    if case in npz:
        np.savez(paths["data"], x=npz[case][0], y=npz[case][1])
        return ("finetune", ft) if case.startswith("finetune") else ("evaluate", ev)
    if case in ("finetune: an unknown RobustBench name", "an unknown RobustBench name"):
        argv = with_flag(with_flag(ft if case.startswith("finetune") else base_only, "--data"), "--model",
                         "Cui2023Decoupled_WRN-28-1")
        return ("finetune" if case.startswith("finetune") else "evaluate"), with_flag(argv, "--dataset", "cifar10")
    if case == "finetune: a dataset not in --data-dir":
        (tmp / "cifar").mkdir()
        argv = with_flag(with_flag(ft, "--data"), "--dataset", "cifar10")
        return "finetune", argv + ["--data-dir", str(tmp / "cifar")]
    if case == "finetune: a state_dict as --model":
        torch.save(quad_linear().state_dict(), paths["model"])
        return "finetune", ft
    if case == "finetune: a text file as --model":
        Path(paths["model"]).write_text("not a pickle")
        return "finetune", ft
    if case == "missing data":
        return "evaluate", with_flag(ev, "--data", str(tmp / "nowhere.npz"))
    if case == "missing model":
        return "evaluate", with_flag(ev, "--model", str(tmp / "nowhere.pt"))
    if case == "head of a model with another number of classes":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(D, K + 1)), paths["model"])
        return "evaluate", ev
    if case == "head of a model with another feature size":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, K)), paths["model"])
        return "evaluate", ev
    if case == "a head fine-tuned on a model with NaN logits":
        write_setup(tmp, nan_model(), n=8)
        return "evaluate", ev
    if case.startswith("--attackers") or case.startswith("--attacker-eps"):  # the K of B flags; batches of 8
        flags = case.split(",")[0].split()
        flags = flags if flags[0] == "--attackers" else ["--attackers", "1"] + flags
        return "evaluate", ev + flags
    if case == "attackers without a head":
        return "evaluate", base_only + ["--attackers", "1"]
    if case == "head with NaN":
        ckpt = checkpoint.load_checkpoint(paths["head"])
        ckpt["head"]["mixer.weight"][0, 0] = float("inf")
        torch.save(ckpt, paths["head"])
        return "evaluate", ev
    if case in ("base model with NaN outputs", "finetune: base model with NaN outputs"):
        torch.save(nan_model(), paths["model"])
        return ("finetune", ft) if case.startswith("finetune") else ("evaluate", base_only)
    if case == "empty npz":
        np.savez(paths["data"], x=np.zeros((0, 1, SIZE, SIZE), np.uint8), y=np.zeros(0, np.int64))
    elif case == "npz without arrays":
        np.savez(paths["data"])
    elif case == "text file named .npz":
        Path(paths["data"]).write_text("x,y\n1,2\n")
    elif case == "truncated npz":
        Path(paths["data"]).write_bytes(Path(paths["data"]).read_bytes()[:300])
    elif case == "truncated model":
        Path(paths["model"]).write_bytes(Path(paths["model"]).read_bytes()[:500])
    elif case == "truncated head":
        Path(paths["head"]).write_bytes(Path(paths["head"]).read_bytes()[:500])
    elif case == "data of the wrong shape":
        np.savez(paths["data"], x=np.zeros((8, 1, 6, 6), np.uint8), y=np.arange(8) % K)
    elif case == "eps in pixels":
        return "evaluate", ev + ["--eps", "8"]
    elif case == "finetune: eps in pixels":
        return "finetune", ft + ["--eps", "8"]
    elif case in ("batch size 0", "steps 0", "queries 0"):
        flag = {"batch size 0": "--batch-size", "steps 0": "--steps", "queries 0": "--queries"}[case]
        return "evaluate", ev + [flag, "0"]
    elif case == "finetune: epochs 0":
        return "finetune", ft + ["--epochs", "0"]
    elif case == "model file as head":
        ev[ev.index("--head") + 1] = paths["model"]
    elif case == "unimportable model class":
        code = ("import torch, torch.nn as nn\n"
                "class Gone(nn.Sequential):\n    pass\n")
        (tmp / "gone_mod.py").write_text(code)
        subprocess.run([sys.executable, "-c", "import sys, torch, torch.nn as nn; sys.path.insert(0, '.');"
                        " import gone_mod; torch.save(gone_mod.Gone(nn.Flatten(), nn.Linear(64, 4)), "
                        "'gone.pt')"], cwd=tmp, check=True)
        (tmp / "gone_mod.py").unlink()
        return "evaluate", base_only[:1] + [str(tmp / "gone.pt")] + base_only[2:]
    elif case == "three classes, default attacks":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 3)), paths["model"])
        x, _ = quad_data(8)
        np.savez(paths["data"], x=x.numpy(), y=np.arange(8) % 3)
        return "evaluate", base_only
    elif case == "finetune: --out is --model":
        ft[ft.index("--out") + 1] = paths["model"]
        return "finetune", ft
    # the second sweep
    elif case == "finetune: a diverging run over a finished head":
        return "finetune", ft[:ft.index("--out")] + ["--out", paths["head"], "--lr", "1e30", "--epochs", "3",
                                                    "--no-progress"]
    elif case == "finetune: --out is the training data":
        ft[ft.index("--out") + 1] = paths["data"]
        return "finetune", ft
    elif case == "finetune: --out is another file":
        (tmp / "notes.txt").write_text("my notes\n")
        ft[ft.index("--out") + 1] = str(tmp / "notes.txt")
        return "finetune", ft
    elif case == "--overwrite with --out the head":
        ev[ev.index("--out") + 1] = paths["head"]
        return "evaluate", ev + ["--overwrite"]
    elif case == "--overwrite with --out another file":
        (tmp / "notes.txt").write_text("my notes\n")
        ev[ev.index("--out") + 1] = str(tmp / "notes.txt")
        return "evaluate", ev + ["--overwrite"]
    elif case == "head of another model of the same shape":
        torch.save(quad_linear(scale=2.0), paths["model"])
    elif case in ("channels-last data", "finetune: channels-last data"):
        x, y = quad_data(8)
        np.savez(paths["data"], x=x.numpy().transpose(0, 2, 3, 1), y=y.numpy())
        return ("finetune", ft) if case.startswith("finetune") else ("evaluate", ev)
    elif case.removeprefix("finetune: ") in IMAGE_RANGES:  # images in a form the scripts do not guess at
        with np.load(paths["data"]) as f:
            np.savez(paths["data"], x=IMAGE_RANGES[case.removeprefix("finetune: ")](f["x"]), y=f["y"])
        return ("finetune", ft) if case.startswith("finetune") else ("evaluate", ev)
    elif case in ("--out is a folder", "finetune: --out is a folder"):
        (tmp / "folder").mkdir()
        argv = ft if case.startswith("finetune") else ev
        argv[argv.index("--out") + 1] = str(tmp / "folder")
        return ("finetune" if case.startswith("finetune") else "evaluate"), argv
    elif case in ("--out under a file", "finetune: --out under a file"):
        argv = ft if case.startswith("finetune") else ev
        argv[argv.index("--out") + 1] = str(tmp / "test.npz" / "r.json")
        return ("finetune" if case.startswith("finetune") else "evaluate"), argv
    elif case in ("a model returning a tuple", "finetune: a model returning a tuple"):
        torch.save(TupleOut(quad_linear()), paths["model"])
        return ("finetune", ft) if case.startswith("finetune") else ("evaluate", base_only)
    elif case == "finetune: last Linear is not the output":
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, K), nn.Tanh()), paths["model"])
        return "finetune", ft
    elif case == "finetune: --lr nan":
        return "finetune", ft + ["--lr", "nan"]
    elif case == "finetune: --step-size -0.1":
        return "finetune", ft + ["--step-size", "-0.1"]
    elif case in ("finetune: --device tpu", "--device mps", "--device xpu", "--device meta"):
        device = case.split()[-1]
        argv = ft if case.startswith("finetune") else ev
        argv[argv.index("--device") + 1] = device
        return ("finetune" if case.startswith("finetune") else "evaluate"), argv
    elif case == "--save-adv naming a file":
        return "evaluate", ev + ["--save-adv", paths["data"]]
    elif case == "--checks-tol -1":
        return "evaluate", ev + ["--checks", "--checks-tol", "-1"]
    elif case == "--contexts ,":
        return "evaluate", ev + ["--contexts", ","]
    elif case == "results edited by hand":
        run_evaluate(paths, *ev[4:])  # a finished results file at r.json, then a row edited
        text = (tmp / "r.json").read_text()  # a per-image list replaced by a string
        (tmp / "r.json").write_text(re.sub(r"\[[01](, [01]){3,}\]", '"all robust"', text, count=1))
        return "evaluate", ev + ["--n-examples", "1000000"]  # (run_evaluate's: the same configuration)
    elif case == "another run writes --out":
        (tmp / "r.json.lock").write_text(str(os.getppid()))  # a live process that is not this one
        return "evaluate", ev
    return "evaluate", ev


# Images in another range than the two the scripts take (uint8 0-255, float in [0, 1]), from the uint8
# images: each refused with the conversion in its line (issue 37).
IMAGE_RANGES = {"float images in [0, 255]": lambda x: x.astype(np.float32),
                "normalised images": lambda x: (x / 255.0 - 0.5) / 0.25,
                "int64 images": lambda x: x.astype(np.int64)}


class TupleOut(nn.Module):
    """A model whose forward returns (logits, features), as some model zoos do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), x.flatten(1)


BAD_INPUTS = {  # case: what its one line must match
    "finetune: an unknown RobustBench name": r"unknown RobustBench model 'Cui2023Decoupled_WRN-28-1' .*did you mean "
                                             r"Cui2023Decoupled_WRN-28-10",
    "an unknown RobustBench name": r"unknown RobustBench model .*did you mean Cui2023Decoupled_WRN-28-10",
    "finetune: a dataset not in --data-dir": r"cifar10 train set not found in \S+/cifar .*pass --data FILE\.npz",
    "finetune: x of flat vectors (N, H*W)": r"x must be images of shape \(N, C, H, W\), or \(N, H, W\) for grey ones; "
                                            r"got uint8 \(4, 64\)",
    **{prefix + case: message for prefix in ("", "finetune: ") for case, message in {
        "float images in [0, 255]": r"x is float in \[\d+, \d+\], not \[0, 1\].*divide by 255 \(x / 255\), or "
                                    r"x\.astype\(numpy\.uint8\)",
        "normalised images": r"not \[0, 1\].*normalised images\?.*before normalising",
        "int64 images": r"x is int64 in \[\d+, \d+\].*x\.astype\(numpy\.uint8\)"}.items()},
    "finetune: y shorter than x": r"y must be integers of shape \(4,\), got int64 \(3,\)",
    "finetune: labels out of range": r"labels must lie in \[0, 4\) for this model, found range \[0, 10\]",
    "labels out of range": r"labels must lie in \[0, 4\) for this model, found range \[0, 10\]",
    "finetune: RGB images for a grey model": r"cannot classify images of shape \(3, 32, 32\)",
    "finetune: a state_dict as --model": r"holds a dict \(a state_dict\?\), not a whole pickled nn.Module",
    "finetune: a text file as --model": "could not load model file",
    "missing data": "does not exist",
    "missing model": "model file .* does not exist",
    "head of a model with another number of classes": "does not fit this model",
    "head of a model with another feature size": r"does not fit this model \(fc.weight: checkpoint \(4, 64\) vs model "
                                                 r"\(4, 8\)",
    "a head fine-tuned on a model with NaN logits": "NaN or inf",
    "--attackers 8, the batch size": r"--attackers 8: the attacker holds K of the B = 8 slots",
    "--attackers 0": r"--attackers 0: .*1 <= K < 8",
    "--attackers a": "--attackers takes numbers of slots",
    "--attacker-eps 1.5": r"--attacker-eps must lie in \(0, 1\]",
    "--attacker-eps 0": r"--attacker-eps must lie in \(0, 1\]",
    "attackers without a head": "needs an HPM head: a base model alone has no batch context",
    "head with NaN": "head holds NaN or inf values in mixer.weight",
    "base model with NaN outputs": "returns NaN or inf logits",
    "finetune: base model with NaN outputs": "returns NaN or inf logits",
    "empty npz": "holds no images",
    "npz without arrays": "must hold arrays 'x' and 'y', found none",
    "text file named .npz": r"is not an .npz archive of arrays x and y \(no zip archive: text, or another format\)",
    "truncated npz": "is not a readable .npz file",
    "truncated model": "could not load model file",
    "truncated head": "is not a readable head checkpoint",
    "data of the wrong shape": r"cannot classify images of shape \(1, 6, 6\)",
    "eps in pixels": r"--eps 8 is above 1.*--eps 8/255",
    "finetune: eps in pixels": r"--eps 8 is above 1",
    "batch size 0": "--batch-size must be at least 1, got 0",
    "steps 0": "--steps must be at least 1, got 0",
    "queries 0": "--queries must be at least 1, got 0",
    "finetune: epochs 0": "--epochs must be at least 1, got 0",
    "model file as head": "not a head checkpoint.*pass it as --model",
    "unimportable model class": "refers to module 'gone_mod'.*PYTHONPATH",
    "finetune: --out is --model": "is an input of this run",
    "finetune: a diverging run over a finished head": r"fine-tuning diverged in epoch \d: loss .*its head was not saved",
    "finetune: --out is the training data": "is an input of this run",
    "finetune: --out is another file": "exists and is not a head checkpoint; it is never replaced",
    "--overwrite with --out the head": "is an input of this run",
    "--overwrite with --out another file": "exists and is not a results file of evaluate.py; it is never replaced",
    "head of another model of the same shape": "fine-tuned on another base model",
    "channels-last data": r"channels last \(N, H, W, C\).*transpose\(0, 3, 1, 2\)",
    "finetune: channels-last data": r"channels last \(N, H, W, C\)",
    "--out is a folder": "is a folder; give a file name",
    "finetune: --out is a folder": "is a folder; give a file name",
    "--out under a file": "which is a file, not a folder",
    "finetune: --out under a file": "which is a file, not a folder",
    "a model returning a tuple": "returns a tuple, not a logits tensor: wrap it",
    "finetune: a model returning a tuple": "returns a tuple, not a logits tensor: wrap it",
    "finetune: last Linear is not the output": "is not the model's output",
    "finetune: --lr nan": "--lr must be a number > 0, got nan",
    "finetune: --step-size -0.1": "--step-size must be a number > 0, got -0.1",
    "finetune: --device tpu": "--device tpu is not available here",
    "--device mps": "--device mps is not available here",
    "--device xpu": "--device xpu is not available here",
    "--device meta": "--device meta holds no data",
    "--save-adv naming a file": "names a folder for the images",
    "--checks-tol -1": r"--checks-tol is an accuracy difference in \[0, 1\)",
    "--contexts ,": "--contexts must be a list",
    "results edited by hand": "does not hold together .*clean: its per-image record is not a list of 0/1.*edited",
    "another run writes --out": r"another run \(process \d+\) is writing",
    "three classes, default attacks": (r"has 3 classes: apgd-t/fc, apgd-t/mix, flip/mix need at least 4 "
                                       r".*; pass --attacks apgd-ce/fc,.*apgd-dlr/mix,square"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_file_touched(tmp_path, capsys, case):
    script, argv = bad_input_setup(tmp_path, case)
    refused(tmp_path, capsys, script, argv, BAD_INPUTS[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["finetune: labels out of range", "an unknown RobustBench name"])
def test_a_script_run_as_its_own_process_keeps_the_promise(tmp_path, capsys, case):
    """`python finetune.py` / `python evaluate.py` themselves: exit status 2 and the one line on stderr."""
    script, argv = bad_input_setup(tmp_path, case)
    refused(tmp_path, capsys, script, argv, BAD_INPUTS[case], process=True)


class TouchesAFile:
    """Unpickling it creates the file `path` (open(path, "w")): proof that a file ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("case", ["a head naming a model pickle", "a head holding a code object",
                                  "a raw pickle as --head"])
def test_a_head_file_makes_no_code_run(tmp_path, capsys, case):
    """A head is data: what it names is not unpickled unless given as --model, and a head file
    that holds code objects is refused unread; the file a pickle would create never appears."""
    ev, _ = sweep(tmp_path)
    ran, evil = tmp_path / "ran", tmp_path / "evil.pt"
    if case == "a head naming a model pickle":
        torch.save(TouchesAFile(str(ran)), evil)
        edit_head(tmp_path / "head.pt", model=str(evil))
        refused(tmp_path, capsys, "evaluate", with_flag(ev, "--model"),
                rf"the head names model {re.escape(str(evil))}; pass --model {re.escape(str(evil))} to load it "
                r"\(a model file is code: only files you trust\)")
    elif case == "a head holding a code object":
        ckpt = checkpoint.load_checkpoint(tmp_path / "head.pt")
        torch.save({**ckpt, "note": TouchesAFile(str(ran))}, tmp_path / "head.pt")
        refused(tmp_path, capsys, "evaluate", ev, r"not a head checkpoint: it holds pickled code objects \(\S*open\)")
    else:
        with open(tmp_path / "head.pt", "wb") as f:
            pickle.dump(TouchesAFile(str(ran)), f)
        err = refused(tmp_path, capsys, "evaluate", ev, "not a head checkpoint: a pickle that does not read as data")
        assert "weights_only" not in err  # torch's advice to unpickle it anyway is not passed on
    assert not ran.exists()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as help_text:
        evaluate.parse_args(["--help"])
    assert "which runs code: only name files you trust" in " ".join(help_text.getvalue().split())


def unfinish(res, row, attack, done):
    """An attack of a row made unfinished, `done` batches recorded."""
    rr = res.row(row)
    del rr.store["attacks"][attack]
    rr.record(attack, results.Progress(done, rr.per_image[attack]))


EDITS = {  # (edit of the results of results_run, what the refusal names)
    "a shortened clean list": (
        lambda res: res.row("base").record("clean", results.Progress(2, res.row("base").per_image["clean"][:4])),
        "base clean: finished, but 4 of 16 images"),
    "a shortened attack list": (
        lambda res: res.row("hpm/batch").record("apgd-ce/fc", results.Progress(
            2, res.row("hpm/batch").per_image["apgd-ce/fc"][:8])), "hpm/batch apgd-ce/fc: finished, but 8 of 16"),
    "a worst case that is not the AND": (
        lambda res: res.row("base").record("apgd-ce", results.Progress(2, [1] * 16)) or res.row(
            "base").store["attacks"].update({"apgd-ce": 1.0}), "base worst_case: its per-image list is not the AND"),
    "a changed accuracy": (lambda res: res.row("hpm/batch").store["attacks"].update({"apgd-ce/fc": 0.9}),
                           r"hpm/batch apgd-ce/fc: accuracy 0.9 but its per-image list gives [\d.]+"),
    "a NaN accuracy": (lambda res: res.row("base").store.update(clean=float("nan")),
                       "base clean accuracy nan is not a number"),
    "a finished attack's list emptied": (lambda res: res.row("base").reset("apgd-ce"),
                                         "base apgd-ce: finished, but 0 of 16 images"),
    "fewer batches done than the list holds": (
        lambda res: unfinish(res, "base", "apgd-ce", 1),
        r"base apgd-ce: 1 batches done \(8 images\), but its per-image list has 16"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_results_file_is_refused_naming_what_does_not_hold_together(results_run, tmp_path, capsys, case):
    ev = copy_run(results_run, tmp_path)
    res = read_results(tmp_path / "r.json")
    edit, message = EDITS[case]
    edit(res)
    res.write(str(tmp_path / "r.json"))
    refused(tmp_path, capsys, "evaluate", ev, rf"r.json does not hold together \({message}.*\): it was edited or "
                                              "damaged; choose another --out, or pass --overwrite")


def nested(depth):
    v = []
    for _ in range(depth):
        v = [v]
    return v


TRACEBACKS = {  # case: (where (results, head or flag), the edit or the flags, what the refusal says)
    "results nested 50000 deep": ("text", lambda text: text.rstrip()[:-1] + ', "deep": ' + "[" * 50000 +
                                  "]" * 50000 + "}", "exists and is not a results file of evaluate.py"),
    "a value nested 100 deep": ("results", lambda res: res.data["notes"].append(nested(100)),
                                "values nested deeper than evaluate.py writes them"),
    "config.attacks an int": ("results", lambda res: res.config.update(attacks=3),
                              "config.attacks is not a list of attacks"),
    "timing a list": ("results", lambda res: res.data.update(timing=[]), "timing is not a mapping"),
    "a row's timings a string": ("results", lambda res: res.row("base").store.update({results.BOOKKEEPING[1]: "2 s"}),
                                 f"base {results.BOOKKEEPING[1]} is not a mapping"),
    "batches_done 99 on an unfinished attack": ("results", lambda res: unfinish(res, "base", "apgd-ce", 99),
                                                "base apgd-ce: batches_done 99, but the run has 2 batches"),
    "an attack of no catalogue": ("results", lambda res: res.row("base").store["attacks"].update(pgd=0.5),
                                  r"base attacks is not a mapping of the row's jobs \(it names 'pgd'\)"),
    "head batch_size 'abc'": ("head", dict(batch_size="abc"), "its batch_size is 'abc', not a whole number >= 1"),
    "head eps 'x'": ("head", dict(eps="x"), "its eps is 'x', not a number > 0"),
    "head threat_model 'L3'": ("head", dict(threat_model="L3"), "its threat_model is 'L3', not Linf or L2"),
    "head history an int": ("head", dict(history=3), "its history is 3, not a list of epochs"),
    "head model None": ("head", dict(model=None), "its model is None, not a model name or file"),
    "--seed 2**70": ("evaluate", ["--seed", str(2 ** 70)], r"--seed must lie in \[0, 2\*\*63\)"),
    "--subset-seed 2**70": ("evaluate", ["--subset-seed", str(2 ** 70)], r"--subset-seed must lie in \[0, 2\*\*63\)"),
    "finetune --seed 2**70": ("finetune", ["--seed", str(2 ** 70)], r"--seed must lie in \[0, 2\*\*63\)"),
}


class ClosedPipe(io.StringIO):
    """stdout whose reader has gone (`| head -1`)."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


@pytest.mark.parametrize("case", list(TRACEBACKS) + ["stdout closed", pytest.param(
    "evaluate.py | head -1", marks=pytest.mark.slow)])
def test_no_input_gives_a_traceback(results_run, tmp_path, capsys, monkeypatch, case):
    ev = copy_run(results_run, tmp_path)
    _, ft = sweep_argv(tmp_path)
    if case == "stdout closed":  # like a pipe's writer that SIGPIPE ends: silent, files whole
        before = snapshot(tmp_path)
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        assert run_script("evaluate", with_flag(ev, "--attacks", "apgd-dlr/fc"), capsys) == (141, "")
        assert snapshot(tmp_path) == before
        return
    if case == "evaluate.py | head -1":
        argv = with_flag(ev, "--overwrite", "--attacks") + ["apgd-dlr/fc"]
        reader = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, cwd=tmp_path)
        reader.stdout.readline()
        reader.stdout.close()
        assert reader.wait(timeout=300) == 141
        assert reader.stderr.read() == b"" and read_results(tmp_path / "r.json")
        return
    where, edit, message = TRACEBACKS[case]
    if where == "text":
        (tmp_path / "r.json").write_text(edit((tmp_path / "r.json").read_text()))
    elif where == "results":
        res = read_results(tmp_path / "r.json")
        edit(res)
        res.write(str(tmp_path / "r.json"))
    elif where == "head":
        edit_head(tmp_path / "head.pt", **edit)
    script = "finetune" if where == "finetune" else "evaluate"
    argv = (ft if script == "finetune" else ev) + (edit if where in ("evaluate", "finetune") else [])
    refused(tmp_path, capsys, script, argv, message)


class NoLinear(nn.Module):
    """The quadrant model without an nn.Linear: a base model evaluated alone needs none."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.stack([quadrant_mask(c).flatten() for c in range(K)]))

    def forward(self, x):
        return x.flatten(1) @ self.w.t()


class Noisy(NoLinear):
    """The quadrant model with noise on its input at every forward, in eval() too: a stochastic model."""

    def forward(self, x):
        return super().forward(x + 0.1 * torch.randn_like(x))


@pytest.mark.parametrize("case", ["--alpha nan", "--beta inf", "--step-size inf", "--dpnp-alpha nan",
                                  "two classes", "a base model without nn.Linear, alone", "a float64 model",
                                  "a float16 model"])
def test_each_message_names_the_real_cause(tmp_path, capsys, case):
    ev, ft = sweep(tmp_path)
    flag, value = case.split()[0], case.split()[-1]
    if case == "two classes":  # DLR needs 3 classes, targeted DLR 4
        torch.save(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2)), tmp_path / "model.pt")
        x, _ = quad_data(16)
        np.savez(tmp_path / "test.npz", x=x.numpy(), y=np.arange(16) % 2)
        base_alone = with_flag(with_flag(ev, "--head"), "--attacks") + ["--dataset", "mnist"]
        refused(tmp_path, capsys, "evaluate", base_alone,
                "the model has 2 classes: apgd-dlr/fc, .*apgd-dlr/mix need at least 3; apgd-t/fc, apgd-t/mix, "
                r"flip/mix need at least 4 \(AutoAttack's DLR loss reads the 3rd largest logit, its targeted DLR "
                "the 4th\\); pass --attacks apgd-ce/fc,")
    elif case == "a base model without nn.Linear, alone":
        torch.save(NoLinear(), tmp_path / "model.pt")
        status, err = run_script("evaluate", with_flag(ev, "--head") + ["--dataset", "mnist"], capsys)
        assert status == 0, err
        assert read_results(tmp_path / "r.json").row("base").clean == 1.0
    elif case.endswith("model"):  # was "cannot classify images of shape ...": a shape problem
        dtype = case.split()[1]
        model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, K)).to(getattr(torch, dtype))
        torch.save(model, tmp_path / "model.pt")
        for script, argv in (("evaluate", with_flag(ev, "--head") + ["--dataset", "mnist"]), ("finetune", ft)):
            refused(tmp_path, capsys, script, argv, rf"model.pt\)? holds {dtype} weights; the scripts feed it "
                                                    r"float32 images: save it after model.float\(\)$")
    else:  # refused before any work (the settings), naming the flag
        argv = ft + [flag, value] + (["--head", "dpnp"] if flag == "--dpnp-alpha" else [])
        refused(tmp_path, capsys, "finetune", argv, rf"{flag} must be a number >=? 0, got {value}$")


@pytest.mark.parametrize("case", ["--attacks ''", "--contexts ''", "--dpnp-alpha -1", "head batch_size 16.7",
                                  "head eps 0", "head eps -1", "--n-examples 100 of 16 images",
                                  "a stochastic model", "a deterministic model"])
def test_what_was_accepted_silently_is_refused_or_recorded_as_run(tmp_path, capsys, case):
    ev, ft = sweep(tmp_path)
    if case.startswith("head"):
        field, value = case.split()[1], float(case.split()[2])
        edit_head(tmp_path / "head.pt", **{field: value})
        refused(tmp_path, capsys, "evaluate", ev, rf"its {field} is {value!r}, not a ")
    elif case == "--dpnp-alpha -1":
        refused(tmp_path, capsys, "finetune", ft + ["--head", "dpnp", "--dpnp-alpha", "-1"],
                "--dpnp-alpha must be a number > 0, got -1")
    elif case.endswith("model"):  # warned about, as AutoAttack's checks do; never a deterministic one
        if case == "a stochastic model":
            torch.save(Noisy(), tmp_path / "model.pt")
        assert cli.run_cli(evaluate.main, evaluate.parse_args, with_flag(ev, "--head") + ["--dataset", "mnist"]) == 0
        warned = re.findall(r"warning: base \(.*model.pt\) gives other logits for the same images in a second "
                            r"forward .* its robust accuracy may be overestimated", capsys.readouterr().out)
        assert len(warned) == (case == "a stochastic model")
    elif case == "--n-examples 100 of 16 images":
        assert run_script("evaluate", ev + ["--n-examples", "100"], capsys)[0] == 0
        assert read_results(tmp_path / "r.json").config["n_examples"] == 16
    else:
        flag = case.split()[0]
        refused(tmp_path, capsys, "evaluate", with_flag(ev, flag, ""),
                "--attacks is empty" if flag == "--attacks" else "--contexts must be a list")


@pytest.mark.parametrize("case", ["over a finished head", "a new --out", "two epochs over a finished head"])
def test_an_exploded_head_is_never_saved(tmp_path, capsys, case):
    """--lr 1e30 with one batch per epoch: the epoch's loss, measured before the step, is finite;
    the head after it is not, and the head the run would save is the one checked."""
    _, ft = sweep(tmp_path)
    ft = ft + ["--lr", "1e30", "--batch-size", "16"] + (["--epochs", "2"] if case.startswith("two") else [])
    if case != "a new --out":
        ft = with_flag(ft, "--out", str(tmp_path / "head.pt"))
    refused(tmp_path, capsys, "finetune", ft, r"fine-tuning diverged in epoch 1: loss [\d.]+, NaN/inf logits on a "
                                              r"training batch; its head was not saved \(try a smaller --lr than 1e\+30\)")


# A model from your code, its weights, your own data ------------------------------------------


OWN_BAD_INPUTS = {
    "--weights with a pickled model": ("finetune", "--model {tmp}/model.pt --weights {tmp}/w.pt",
                                       r"--weights needs --model FILE\.py:NAME or package\.module:NAME"),
    "a .py without NAME": ("finetune", "--model {tmp}/quadnet.py", r"name what builds the model, --model \S+quadnet\.py:NAME"),
    "a code file that does not exist": ("finetune", "--model {tmp}/gone.py:build", r"model code file \S+gone\.py does not exist"),
    "a NAME that is not a name": ("finetune", "--model {tmp}/quadnet.py:no-name", "after the colon give the name of a class"),
    "a missing NAME": ("finetune", "--model {tmp}/quadnet.py:Nope", r"has no 'Nope'; it defines build, Needs, number"),
    "a NAME that needs arguments": ("finetune", "--model {tmp}/quadnet.py:Needs",
                                    r"Needs needs arguments .*def build\(\): return Needs\(\.\.\.\)"),
    "a NAME that builds no module": ("finetune", "--model {tmp}/quadnet.py:number", "returned a int, not an nn.Module"),
    "a file that does not import": ("finetune", "--model {tmp}/broken.py:build",
                                    r"broken\.py does not import \(ModuleNotFoundError: No module named 'no_such_mod"),
    "a module that is not there": ("finetune", "--model no_such_pkg.net:build", r"no module no_such_pkg\.net here"),
    "weights of another model": ("finetune", "--model {tmp}/quadnet.py:build --weights {tmp}/wide.pt",
                                 r"do not fit the model build\(\) builds: shape of 1\.weight \(5, 64\) there, \(4, 64\)"),
    "weights that are a pickled model": ("finetune", "--model {tmp}/quadnet.py:build --weights {tmp}/model.pt",
                                         "holds pickled objects, not a state_dict"),
    "weights that are a head": ("finetune", "--model {tmp}/quadnet.py:build --weights {tmp}/head.pt",
                                "is a head checkpoint of finetune.py, not weights"),
    "weights that do not exist": ("finetune", "--model {tmp}/quadnet.py:build --weights {tmp}/gone.pt",
                                  r"weights file \S+gone\.pt does not exist"),
    "a RobustBench name on own data": ("finetune", "--model Some_Model", "a RobustBench name needs --dataset"),
    "evaluate: a head naming code, without --model": ("evaluate", "--head {tmp}/code_head.pt",
                                                      r"the head names model \S+quadnet\.py:build; pass --model"),
    "evaluate: a head on own data, without --data": ("evaluate", "--head {tmp}/own_head.pt --model {tmp}/model.pt",
                                                     "fine-tuned on own data .*pass its test set as --data FILE.npz"),
    "evaluate: the head's weights are gone": ("evaluate", "--head {tmp}/gone_head.pt --model {tmp}/quadnet.py:build",
                                              r"the head's base model weights \S+gone\.pt do not exist .*--weights PATH"),
    "evaluate: other weights than the head's": ("evaluate", "--head {tmp}/code_head.pt --model {tmp}/quadnet.py:build "
                                                "--weights {tmp}/double.pt", r"another base model than \S+ with weights"),
}


def own_bad_files(tmp):
    """quadnet.py, broken.py (an import that fails), weights w.pt (the head's model), double.pt
    (the same shapes, other values), wide.pt (another shape), and heads naming code or own data."""
    paths = write_setup(tmp, quad_linear(), n=8)
    (tmp / "quadnet.py").write_text(QUADNET)
    (tmp / "broken.py").write_text("import no_such_module_anywhere\n")
    torch.save(quad_linear().state_dict(), tmp / "w.pt")
    torch.save(quad_linear(scale=2.0).state_dict(), tmp / "double.pt")
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(D, K + 1)).state_dict(), tmp / "wide.pt")
    for name, fields in (("code_head", dict(model=f"{tmp}/quadnet.py:build", weights=str(tmp / "w.pt"))),
                         ("own_head", dict(dataset="own")), ("gone_head", dict(model=f"{tmp}/quadnet.py:build",
                                                                               weights=str(tmp / "gone.pt")))):
        (tmp / f"{name}.pt").write_bytes(Path(paths["head"]).read_bytes())
        edit_head(tmp / f"{name}.pt", **fields)
    return paths


@pytest.mark.parametrize("case", list(OWN_BAD_INPUTS))
def test_bad_model_code_weights_or_own_data_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, case):
    paths = own_bad_files(tmp_path)
    script, flags, message = OWN_BAD_INPUTS[case]
    given = [f.format(tmp=tmp_path) for f in flags.split()]
    common = {"finetune": ["--data", paths["data"], "--steps", "1", "--out", str(tmp_path / "new.pt")],
              "evaluate": ["--steps", "1", "--attacks", "apgd-ce/fc", "--out", str(tmp_path / "r.json")]}[script]
    if script == "evaluate" and "own_head" not in flags:
        common += ["--data", paths["data"]]
    refused(tmp_path, capsys, script, given + common + ["--device", "cpu", "--no-progress"], message)


# Bad input, fourth sweep (issue 36) ---------------------------------------------------------
# Items 2-8 of issue 36 and item 5 of issue 37, each as a user meets it on the command line:
# refused (one line, exit 2, every file byte-identical), or, where the input is good but was
# mishandled, the run's promise the test names. The Python API's cases (issue 37 item 4) are
# with the API's tests, in test_runs_and_files.py.

@pytest.mark.parametrize("flags,message", [
    (["--checks", "--context-orders", "-1"], r"--context-orders is a number of random orders .*1 to 1000 .*got -1$"),
    (["--checks", "--context-orders", "0"], r"--context-orders is a number of random orders .*got 0$"),
    (["--checks", "--context-orders", "1000000000"], r"--context-orders .*1 to 1000 .*got 1000000000$"),
    (["--context-orders", "3"], r"--context-orders needs --checks"),
], ids=["a negative count of orders is refused, never a pass", "zero orders is refused, not a check dropped",
        "a billion orders is refused before any work", "without --checks the flag is refused, not ignored"])
def test_context_orders_are_checked_and_a_check_never_reports_work_it_did_not_do(tmp_path, capsys, flags, message):
    ev, _ = sweep(tmp_path)
    refused(tmp_path, capsys, "evaluate", ev + flags, message)




class WritesOnce(nn.Module):
    """quad_linear whose first forward creates the file `path` (a user's, appearing during a run)."""

    def __init__(self, path):
        super().__init__()
        self.net, self.path = quad_linear(), path

    def forward(self, x):
        if not os.path.exists(self.path):
            Path(self.path).write_bytes(b"my own notes\n")
        return self.net(x)


@pytest.mark.parametrize("name", ["r.md", "r.png"])
def test_a_users_file_that_appears_during_the_run_where_it_writes_beside_is_kept(tmp_path, capsys, name):
    """OUT.md or OUT.png created while the run is under way stays byte-identical; the run's own goes
    beside it under another name (r-1.md), said in one line, and its last line names that file."""
    ev, _ = sweep(tmp_path)
    torch.save(WritesOnce(str(tmp_path / name)), tmp_path / "model.pt")
    assert cli.run_cli(evaluate.main, evaluate.parse_args, with_flag(ev, "--head") + ["--dataset", "mnist"]) == 0
    out = capsys.readouterr().out
    ours = tmp_path / name.replace("r.", "r-1.")
    assert (tmp_path / name).read_bytes() == b"my own notes\n"
    assert report.is_ours(str(ours), str(tmp_path / "r.json"))
    said = [line for line in out.splitlines() if "appeared during the run" in line]
    assert len(said) == 1 and said[0].endswith(f"{tmp_path / name} -> {ours}"), out
    assert f"{ours})" in out.splitlines()[-1] or f"{ours};" in out.splitlines()[-1]


def test_the_run_removes_only_temporary_files_it_can_prove_are_its_own(tmp_path, capsys):
    """A user's r.json.*.tmp files stay; a temporary file of this project's form stays while its
    process lives, and goes once that process is gone."""
    ev, _ = sweep(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    users = ["r.json.original.tmp", "r.json.backup_1.tmp", "r.json.abcdefgh.tmp", "r.json.hpm-12-abc.tmp"]
    live, stale = f"r.json.hpm-{os.getppid()}-k3j_9xq2.tmp", f"r.json.hpm-{gone.pid}-k3j_9xq2.tmp"
    for name in users + [live, stale]:
        (tmp_path / name).write_text("a user's\n")
    assert run_script("evaluate", ev, capsys)[0] == 0
    assert all((tmp_path / name).read_text() == "a user's\n" for name in users + [live])
    assert not (tmp_path / stale).exists()


BUILDERS = '''import argparse
import sys

import torch.nn as nn


def net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))


def quits():
    quit()


def exits0():
    sys.exit(0)


def exits3():
    sys.exit(3)


def parses():  # a builder that reads its own flags
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=4)
    assert sys.argv[1:] == [], sys.argv
    return nn.Sequential(nn.Flatten(), nn.Linear(64, p.parse_args().width))
'''


@pytest.mark.parametrize("script", ["evaluate", "finetune"])
@pytest.mark.parametrize("name,status", [("quits", "None"), ("exits0", "0"), ("exits3", "3")],
                         ids=["quit() is one line naming the builder", "sys.exit(0) is one line, never exit 0",
                              "sys.exit(3) is one line and exit 2"])
def test_a_builder_that_exits_is_one_line_naming_it(tmp_path, capsys, script, name, status):
    ev, ft = sweep(tmp_path)
    (tmp_path / "nets.py").write_text(BUILDERS)
    spec = f"{tmp_path / 'nets.py'}:{name}"
    argv = (with_flag(with_flag(ev, "--head"), "--model", spec) + ["--dataset", "mnist"] if script == "evaluate"
            else with_flag(ft, "--model", spec))
    refused(tmp_path, capsys, script, argv, rf"nets.py:{name}\(\) exited \(status {status}\) instead of returning "
                                            "the model; a builder must return an nn.Module")


def test_a_builder_that_parses_sys_argv_sees_none_of_our_flags(tmp_path, capsys):
    ev, _ = sweep(tmp_path)
    (tmp_path / "nets.py").write_text(BUILDERS)
    argv = with_flag(with_flag(ev, "--head"), "--model", f"{tmp_path / 'nets.py'}:parses") + ["--dataset", "mnist"]
    status, err = run_script("evaluate", argv, capsys)
    assert status == 0, err  # (the builder asserts that sys.argv holds its file alone)
    assert read_results(tmp_path / "r.json").config["model"].endswith("nets.py:parses")


@pytest.mark.parametrize("script,flag,value", [
    ("evaluate", "--attacker-eps", "nan"), ("evaluate", "--attacker-eps", "inf"),
    ("evaluate", "--attacker-eps", "-0.1"), ("evaluate", "--attacker-eps", "1/0"),
    ("evaluate", "--context-orders", "abc"), ("evaluate", "--eps", "x"), ("evaluate", "--steps", "2.5"),
    ("finetune", "--eps", "nan"), ("finetune", "--lr", "abc"), ("finetune", "--epochs", "one"),
], ids=lambda v: str(v))
def test_a_typed_flags_bad_value_is_one_line_not_the_usage(tmp_path, capsys, script, flag, value):
    ev, ft = sweep(tmp_path)
    refused(tmp_path, capsys, script, (ev if script == "evaluate" else ft) + [flag, value],
            rf"^error: argument {flag}: .*{re.escape(value)}")


@pytest.mark.parametrize("script,flag", [("finetune", "--epoch"), ("evaluate", "--n-ex"), ("evaluate", "--check")],
                         ids=["--epoch is no --epochs: no fine-tune starts", "--n-ex is no --n-examples",
                              "--check is no --checks"])
def test_a_flag_is_never_taken_for_a_longer_one_it_abbreviates(tmp_path, capsys, script, flag):
    ev, ft = sweep(tmp_path)
    argv = (ev if script == "evaluate" else ft) + [flag] + ([] if flag == "--check" else ["1"])
    refused(tmp_path, capsys, script, argv, rf"unrecognized arguments: {flag}")


def test_an_error_names_the_command_the_user_ran(tmp_path, capsys, monkeypatch):
    """Issue 37 item 5: hpm-evaluate's errors say hpm-evaluate (cli.run_script keeps sys.argv[0])."""


    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "hpm-evaluate"), "--n_examples", "3"])
    monkeypatch.setattr(cli, "PROG", None)
    with pytest.raises(SystemExit) as e:
        cli.evaluate()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err == "error: unrecognized arguments: --n_examples 3 (hpm-evaluate --help lists the flags)\n"


@pytest.mark.parametrize("case", ["--attacker-eps without --attackers", "--attacks square with --attackers"])
def test_what_was_accepted_silently_in_the_fourth_sweep_is_refused(tmp_path, capsys, case):
    """A flag that would do nothing is refused, never ignored (a text file as --data: BAD_INPUTS)."""
    ev, _ = sweep(tmp_path)
    if case == "--attacker-eps without --attackers":  # (it entered the resume identity)
        refused(tmp_path, capsys, "evaluate", ev + ["--attacker-eps", "0.5"], "--attacker-eps needs --attackers K")
    else:
        refused(tmp_path, capsys, "evaluate", with_flag(ev, "--attacks", "square") + ["--attackers", "1"],
                "--attacks square has no attack for the --attackers rows: add apgd-ce or apgd-dlr")


def test_apgd_ce_in_attacks_runs_on_the_attacker_rows_as_their_own_apgd_ce(tmp_path, capsys):
    """--attacks apgd-ce/fc --attackers 1: the K-of-B row runs own:apgd-ce/fc (was: no attack at all)."""
    ev, _ = sweep(tmp_path)
    assert run_script("evaluate", ev + ["--attackers", "1"], capsys)[0] == 0
    res = read_results(tmp_path / "r.json")
    assert list(res.row("hpm/attackers-1").accuracies) == ["own:apgd-ce/fc"]
    assert "apgd-ce/fc" in res.row("hpm/batch").accuracies


QUADRELU = '''import torch.nn as nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
'''


@pytest.mark.parametrize("case", ["the code as fine-tuned", "ReLU edited to Tanh", "a head without a probe"])
def test_a_base_model_whose_code_changed_since_fine_tuning_is_said_in_one_line(tmp_path, capsys, case):
    """Issue 36 item 8: the head records the base model's logits on fixed probe images; at evaluation
    other outputs (same weights, edited code) give one warning line; an old head without the probe
    loads without one."""
    ev, ft = sweep(tmp_path)
    (tmp_path / "quadnet.py").write_text(QUADRELU)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    spec = f"{tmp_path / 'quadnet.py'}:build"
    ft = with_flag(with_flag(ft, "--model", spec), "--out", str(tmp_path / "head.pt")) + [
        "--weights", str(tmp_path / "w.pt"), "--overwrite"]
    assert run_script("finetune", ft, capsys)[0] == 0
    assert read_head(str(tmp_path / "head.pt"))["base_probe"]["logits"].shape == (4, 4)
    if case == "ReLU edited to Tanh":
        (tmp_path / "quadnet.py").write_text(QUADRELU.replace("ReLU", "Tanh"))
    elif case == "a head without a probe":
        ckpt = checkpoint.load_checkpoint(tmp_path / "head.pt")
        del ckpt["base_probe"]
        torch.save(ckpt, tmp_path / "head.pt")
    capsys.readouterr()
    assert cli.run_cli(evaluate.main, evaluate.parse_args, with_flag(ev, "--model", spec)) == 0
    warned = [line for line in capsys.readouterr().out.splitlines() if "no longer gives the outputs" in line]
    assert len(warned) == (case == "ReLU edited to Tanh")
    if warned:
        assert re.fullmatch(r"warning: the base model .*quadnet.py:build no longer gives the outputs the head "
                            r"recorded at fine-tuning \(logits moved by up to [\d.e-]+ on its probe images\), "
                            r"though its weights are the same: its code changed since\? .*fine-tune it again",
                            warned[0]), warned[0]


def test_a_last_batch_of_one_image_is_scored_clean_by_every_attacker_attack_and_a_rerun_resumes(tmp_path, capsys):
    """Issue 36 item 1: 9 images in fixed batches of 8 with --attackers 2 leave a last batch of one
    image, which stays benign (a batch's first image is never the attacker's), so it has nothing to
    attack. The promise for good input that was mishandled (a ZeroDivisionError, a traceback): the
    run finishes, every K-of-B attack scores that image as its clean batch scores it, alone; a chunk
    of that batch alone (--chunk 8) gives the same per-image results; the same command resumes the
    finished file and leaves its results as they were."""
    x, y = quad_data(9)
    base = quad_linear()
    model = fitted_hpm(base, x, y)
    write_setup(tmp_path, base, n=9, head=model)
    slot_attacks = ["own:apgd-ce/mix", "own:apgd-dlr/soft", "benign:spread/soft", "benign:square",
                    "benign:victim/soft"]
    ev = with_flag(sweep_argv(tmp_path)[0], "--n-examples", "9")
    ev = with_flag(ev, "--attacks", ",".join(["apgd-ce/fc"] + slot_attacks)) + [
        "--attackers", "2", "--steps", "2", "--queries", "10"]
    assert cli.run_cli(evaluate.main, evaluate.parse_args, ev) == 0
    r = read_results(tmp_path / "r.json").row("hpm/attackers-2")
    assert r.attacker_slots == [0] * 6 + [1, 1] + [0]  # the last image, alone in its batch, benign
    with torch.no_grad():  # its clean batch: the image classified alone, as its fixed batch
        alone = int(model(x[8:].float() / 255, context="batch").argmax(1).item() == y[8].item())
    assert r.correct("clean")[8] == alone
    for attack in slot_attacks:
        assert len(r.correct(attack)) == 9, attack
        assert r.correct(attack)[8] == alone, attack
    chunked = with_flag(ev, "--out", str(tmp_path / "chunked.json")) + ["--chunk", "8"]
    assert cli.run_cli(evaluate.main, evaluate.parse_args, chunked) == 0
    assert read_results(tmp_path / "chunked.json").row("hpm/attackers-2").per_image == r.per_image
    capsys.readouterr()
    assert cli.run_cli(evaluate.main, evaluate.parse_args, ev) == 0
    assert "nothing left to run" in capsys.readouterr().out  # it resumed the finished file
    assert read_results(tmp_path / "r.json").row("hpm/attackers-2").per_image == r.per_image
