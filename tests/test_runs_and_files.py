"""A run and its files: resume, the identity of a results file, one run per --out (locks), what
is never deleted or replaced, symlinks and modes, a full disk, named pipes, torchrun, the Python API
and pip install.
"""
import errno
import json
import math
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import evaluate
import finetune
import hpm
from experiments import common
from finetune import train_step
from hpm import attach
from hpmkit import cli
from hpmkit.checkpoint import read_head
from hpmkit.cli import CLIError
from hpmkit.data import load_npz
from hpmkit.results import Results

from conftest import (ROOT, SIZE, mnist_slice, quad_data, quad_linear, fitted_hpm, write_setup, run_evaluate,
                      comparable, read_results, rows_of, sweep, with_flag, run_script, refused, edit_head, copy_run)


# Resume ----------------------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_results(tmp_path, monkeypatch):
    paths = write_setup(tmp_path, quad_linear())
    argv = ["--eps", "0.42", "--steps", "5", "--queries", "30", "--contexts", "batch", "--attacks",
            "apgd-ce/mix,apgd-dlr/fc,square", "--checks", "--checks-n", "16"]
    whole = run_evaluate(paths, *argv, "--out", str(tmp_path / "whole.json"))

    real = evaluate.run_attack
    calls = []

    def dies_on_the_fourth_call(*a, **kw):  # chunks of 2 batches: apgd-ce takes calls 1-2, apgd-dlr 3-4
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **kw)

    out = str(tmp_path / "resumed.json")  # whole: one chunk of 4 batches; this run: chunks of 2
    monkeypatch.setattr(evaluate, "run_attack", dies_on_the_fourth_call)
    with pytest.raises(KeyboardInterrupt):
        run_evaluate(paths, *argv, "--out", out, "--chunk", "16")
    partial = read_results(out)
    assert partial.complete is False and partial.row("base").batches_done("apgd-dlr") == 2
    assert "apgd-dlr" not in partial.row("base").accuracies  # interrupted inside its batches
    monkeypatch.setattr(evaluate, "run_attack", real)
    resumed = run_evaluate(paths, *argv, "--out", out)
    assert comparable(resumed) == comparable(whole) == comparable(read_results(out))

    # An attack subset first, then the full list: the same results again.
    out2 = str(tmp_path / "in_two.json")
    first = ["--eps", "0.42", "--steps", "5", "--queries", "30", "--contexts", "batch",
             "--attacks", "apgd-dlr/fc"]
    run_evaluate(paths, *first, "--out", out2)
    assert comparable(run_evaluate(paths, *argv, "--out", out2)) == comparable(whole)


def test_another_configuration_in_out_is_refused(tmp_path):
    paths = write_setup(tmp_path, quad_linear(), n=8)
    argv = ["--steps", "2", "--contexts", "image", "--attacks", "apgd-ce/fc",
            "--out", str(tmp_path / "r.json")]
    run_evaluate(paths, "--eps", "0.1", *argv)
    with pytest.raises(CLIError, match="another configuration.*eps"):
        run_evaluate(paths, "--eps", "0.2", *argv)
    assert run_evaluate(paths, "--eps", "0.2", "--overwrite", *argv).config["eps"] == 0.2


def test_each_version_has_its_own_default_results_file(tmp_path):
    """Without --out, the file is named for the head and the version: a --version paper run after a
    strong one on the same head starts its own file instead of being refused as another
    configuration, and each holds its own version."""
    paths = write_setup(tmp_path, quad_linear(), n=8)
    argv = ["--steps", "2", "--queries", "5", "--contexts", "image", "--attacks", "apgd-ce/fc,square"]
    run_evaluate(paths, *argv)
    run_evaluate(paths, "--version", "paper", *argv)
    for version in ("strong", "paper"):
        assert read_results(tmp_path / f"head.eval-{version}.json").version == version


def test_resuming_with_other_attacks_records_every_attack_the_file_holds(tmp_path):
    paths = write_setup(tmp_path, quad_linear(), n=8)
    argv = ["--steps", "2", "--contexts", "batch", "--eps", "0.3", "--out", str(tmp_path / "r.json")]
    run_evaluate(paths, *argv, "--attacks", "apgd-dlr/fc")
    res = run_evaluate(paths, *argv, "--attacks", "apgd-ce/mix")
    assert res.config["attacks"] == ["apgd-ce/mix", "apgd-dlr/fc"]  # the union, canonical order
    assert list(res.row("hpm/batch").accuracies) == ["apgd-ce/mix", "apgd-dlr/fc"]
    assert list(res.row("base").accuracies) == ["apgd-ce", "apgd-dlr"]


# One run per --out, and the files a run never touches ------------------------------------------

@pytest.mark.parametrize("case", ["the run's own model", "another file", "an earlier unfinished head"])
def test_finetune_never_deletes_or_replaces_a_file_it_did_not_write(tmp_path, capsys, case):
    """While --out holds a finished head, OUT.unfinished.pt is this run's to write only if it is
    free or an unfinished head, and the run removes it only if it wrote it."""
    _, ft = sweep(tmp_path)
    ft, unfinished = with_flag(ft, "--out", str(tmp_path / "head.pt")), tmp_path / "head.unfinished.pt"
    if case == "the run's own model":  # the reproduction: the model file was removed
        unfinished.write_bytes((tmp_path / "model.pt").read_bytes())
        refused(tmp_path, capsys, "finetune", with_flag(ft, "--model", str(unfinished)),
                "head.unfinished.pt exists and is not an unfinished head of finetune.py.*move that file away")
    elif case == "another file":
        unfinished.write_text("my notes\n")
        refused(tmp_path, capsys, "finetune", with_flag(ft, "--epochs", "2"), "is not an unfinished head")
    else:  # an interrupted run's unfinished head: a one-epoch run never writes there, and leaves it
        edit_head(tmp_path / "head.pt", finished=False)
        unfinished.write_bytes((tmp_path / "head.pt").read_bytes())
        edit_head(tmp_path / "head.pt", finished=True)
        kept = unfinished.read_bytes()
        status, err = run_script("finetune", ft, capsys)
        assert status == 0, err
        assert unfinished.read_bytes() == kept and read_head(str(tmp_path / "head.pt"))["history"]


@pytest.mark.parametrize("case", ["finetune on an --out another run writes", "evaluate through a symlink",
                                  "finetune holds the lock all along"])
def test_one_run_writes_an_out_at_a_time_whichever_script_and_spelling(tmp_path, capsys, monkeypatch, case):
    """finetune.py takes evaluate.py's lock, on the resolved --out: a symlink and its target are
    one --out."""
    ev, ft = sweep(tmp_path)
    live = str(os.getppid())  # a live process that is not this one
    if case == "finetune on an --out another run writes":
        (tmp_path / "ft.pt.lock").write_text(live)
        refused(tmp_path, capsys, "finetune", ft, rf"another run \(process {live}\) is writing .*ft.pt")
    elif case == "evaluate through a symlink":
        os.symlink(tmp_path / "r.json", tmp_path / "link.json")
        (tmp_path / "r.json.lock").write_text(live)
        refused(tmp_path, capsys, "evaluate", with_flag(ev, "--out", str(tmp_path / "link.json")),
                rf"another run \(process {live}\) is writing .*link.json")
    else:
        held = []

        def step(*a):
            held.append((tmp_path / "ft.pt.lock").read_text())
            return train_step(*a)

        monkeypatch.setattr(finetune, "train_step", step)
        status, err = run_script("finetune", ft, capsys)
        assert status == 0, err
        assert held == [str(os.getpid())] * 2 and not (tmp_path / "ft.pt.lock").exists()


@pytest.mark.parametrize("case", ["empty", "this very process", "a process that is gone", "process 0",
                                  "a live process", "a folder", "not a process number"])
def test_a_stale_lock_is_taken_over_and_any_other_refused(tmp_path, capsys, case):
    """An empty lock (a run killed as it wrote it, a full disk), one naming this process (a PID
    reused after a restart), a dead process or 0 is stale: the run takes it over and finishes."""
    ev, _ = sweep(tmp_path)
    lock = tmp_path / "r.json.lock"
    if case == "a folder":
        lock.mkdir()
        refused(tmp_path, capsys, "evaluate", ev, r"r.json.lock is a folder, not a lock file of these scripts")
        return
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip() if case == "a process that is gone" else ""
    lock.write_text({"this very process": str(os.getpid()), "a process that is gone": gone, "process 0": "0",
                     "a live process": str(os.getppid()), "not a process number": "my notes"}.get(case, ""))
    if case == "a live process":
        refused(tmp_path, capsys, "evaluate", ev, rf"another run \(process {os.getppid()}\) is writing")
    elif case == "not a process number":  # no lock of ours: never removed
        refused(tmp_path, capsys, "evaluate", ev, "r.json.lock does not name a process: it is no lock")
    else:
        status, err = run_script("evaluate", ev, capsys)
        assert status == 0, err
        assert read_results(tmp_path / "r.json").complete and not lock.exists()


class FullDisk:
    """A file object whose write writes half of what it gets, then fails as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        self.f.write(bytes(b)[:len(b) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("case", ["evaluate --out newdir/", "finetune --out newdir/", "a name too long",
                                  "bad data with --out in a new folder", "a full disk", "a full disk on resume",
                                  "a full disk at finetune's save"])
def test_a_write_that_cannot_succeed_is_one_line_before_the_work(tmp_path, capsys, monkeypatch, case):
    """A disk cannot be filled from a test: a full disk is os.fdopen's file object failing its
    write with ENOSPC (FullDisk, monkeypatched); the files written before stay as they were."""
    ev, ft = sweep(tmp_path)
    if case in ("evaluate --out newdir/", "finetune --out newdir/"):
        script, argv = ("evaluate", ev) if case.startswith("evaluate") else ("finetune", ft)
        refused(tmp_path, capsys, script, with_flag(argv, "--out", str(tmp_path / "newdir") + "/"),
                "newdir/ ends in a slash, so it names a folder; give a file name")
    elif case == "a name too long":
        refused(tmp_path, capsys, "finetune", with_flag(ft, "--out", str(tmp_path / ("h" * 240 + ".pt"))),
                r"the name h+\.\.\. is too long for this file system \(243 bytes; at most 255, less 36")
    elif case == "bad data with --out in a new folder":  # the lock's folder goes again
        np.savez(tmp_path / "test.npz", x=np.zeros((0, 1, SIZE, SIZE), np.uint8), y=np.zeros(0, np.int64))
        refused(tmp_path, capsys, "evaluate", with_flag(ev, "--out", str(tmp_path / "new" / "dir" / "r.json")),
                "holds no images")
    else:
        if case == "a full disk on resume":
            assert run_script("evaluate", with_flag(ev, "--attacks", "apgd-dlr/fc"), capsys)[0] == 0
        script, argv = ("finetune", with_flag(ft, "--out", str(tmp_path / "head.pt"))) if "finetune" in case else (
            "evaluate", ev)
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **kw: FullDisk(real(*a, **kw)))
        refused(tmp_path, capsys, script, argv, r"could not write .*(r.json|head.pt) \(No space left on device\); "
                                               "it keeps its earlier contents")


@pytest.mark.parametrize("case", ["evaluate through a symlink", "finetune through a symlink", "a mode kept",
                                  "a new file's mode from the umask", "a read-only results file", "a read-only head"])
def test_a_symlink_is_written_through_and_a_files_mode_kept(tmp_path, capsys, case):
    ev, ft = sweep(tmp_path)
    (tmp_path / "kept").mkdir()
    if case in ("evaluate through a symlink", "finetune through a symlink"):
        script, argv, name = ("evaluate", ev, "r.json") if case.startswith("evaluate") else ("finetune", ft, "ft.pt")
        os.symlink(os.path.join("kept", name), tmp_path / name)  # a relative link to a file not there yet
        assert run_script(script, argv, capsys)[0] == 0
        assert (tmp_path / name).is_symlink() and os.readlink(tmp_path / name) == os.path.join("kept", name)
        assert os.listdir(tmp_path / "kept") == [name]  # no lock, no temporary file left
        assert (Results.read(str(tmp_path / name)) if script == "evaluate" else read_head(str(tmp_path / name)))
    elif case in ("a mode kept", "a new file's mode from the umask"):
        umask = os.umask(0o027)
        try:
            if case == "a mode kept":
                assert run_script("evaluate", ev, capsys)[0] == 0
                os.chmod(tmp_path / "r.json", 0o604)
            assert run_script("evaluate", with_flag(ev, "--overwrite", "--attacks") + ["apgd-dlr/fc"], capsys)[0] == 0
        finally:
            os.umask(umask)
        assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == (0o604 if case == "a mode kept" else 0o640)
    elif case == "a read-only results file":
        assert run_script("evaluate", ev, capsys)[0] == 0
        os.chmod(tmp_path / "r.json", 0o444)  # (root may write it anyway: the scripts read the mode)
        refused(tmp_path, capsys, "evaluate", with_flag(ev, "--overwrite", "--attacks") + ["apgd-dlr/fc"],
                r"--out .*r.json is read-only \(mode 0444\); it is never replaced: make it writable")
    else:
        os.chmod(tmp_path / "head.pt", 0o444)
        refused(tmp_path, capsys, "finetune", with_flag(ft, "--out", str(tmp_path / "head.pt")),
                r"head.pt is read-only \(mode 0444\)")


@pytest.mark.parametrize("case", ["relative paths", "from another folder", "another data file"])
def test_a_resume_compares_files_by_content_not_by_how_their_paths_are_spelled(results_run, tmp_path, capsys,
                                                                              monkeypatch, case):
    """The copy of results_run's files resumes its results wherever it lies and however its paths
    are written; other contents are another configuration, and the message does not put
    --overwrite, which throws the results away, first."""
    ev = copy_run(results_run, tmp_path)  # (itself from another folder)
    before = per_image(read_results(tmp_path / "r.json"))
    if case == "relative paths":
        monkeypatch.chdir(tmp_path)
        ev = [os.path.relpath(a) if a.startswith(str(tmp_path)) else a for a in ev]
        ev = with_flag(ev, "--data", "./test.npz")
    if case == "another data file":
        x, y = quad_data(16, seed=1)
        np.savez(tmp_path / "test.npz", x=x.numpy(), y=y.numpy())
        err = refused(tmp_path, capsys, "evaluate", ev, r"holds results of another configuration \(data_sha256: ")
        assert err.index("another --out") < err.index("--overwrite would discard them")
        return
    status = cli.run_cli(evaluate.main, evaluate.parse_args, ev)
    assert status == 0 and f"resuming from {ev[ev.index('--out') + 1]}" in capsys.readouterr().out
    assert per_image(read_results(tmp_path / "r.json")) == before


def per_image(res):
    return {name: (rr.accuracies, rr.per_image) for name, rr in res.rows().items()}


@pytest.fixture
def no_hang():
    """A test that would block (opening a named pipe) fails in 60 s instead."""
    def stop(*a):
        raise TimeoutError("blocked")
    before = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("case", ["evaluate --out", "finetune --out", "the lock", "OUT.unfinished.pt"])
def test_a_named_pipe_is_never_opened(tmp_path, capsys, no_hang, case):
    ev, ft = sweep(tmp_path)
    if case == "evaluate --out":
        os.mkfifo(tmp_path / "r.json")
        refused(tmp_path, capsys, "evaluate", ev, r"r.json is a named pipe \(FIFO\), not a file; it is never opened")
    elif case == "finetune --out":
        os.mkfifo(tmp_path / "ft.pt")
        refused(tmp_path, capsys, "finetune", ft, r"ft.pt is a named pipe \(FIFO\), not a file")
    elif case == "the lock":
        os.mkfifo(tmp_path / "r.json.lock")
        refused(tmp_path, capsys, "evaluate", ev, r"r.json.lock is a named pipe \(FIFO\), not a lock file")
    else:
        os.mkfifo(tmp_path / "head.unfinished.pt")
        refused(tmp_path, capsys, "finetune", with_flag(ft, "--out", str(tmp_path / "head.pt")) + ["--epochs", "2"],
                "head.unfinished.pt exists and is not an unfinished head")


@pytest.mark.parametrize("script", ["evaluate", "finetune"])
def test_the_temporary_files_a_killed_run_left_are_removed(tmp_path, capsys, script):
    """The temporary files of a killed run beside --out (and OUT.unfinished.pt), OUT.hpm-PID-xxxxxxxx.tmp,
    go once the run holds the lock and PID is gone; a file of another name stays."""
    ev, ft = sweep(tmp_path)
    out = "r.json" if script == "evaluate" else "head.pt"
    killed = subprocess.Popen(["true"])
    killed.wait()
    stale = [f"{out}.hpm-{killed.pid}-k3j_9xq2.tmp"] + (
        [f"head.unfinished.pt.hpm-{killed.pid}-a1b2c3d4.tmp"] if script == "finetune" else [])
    for name in stale + [f"{out}.notes.tmp"]:
        (tmp_path / name).write_text("left by a kill\n")
    argv = ev if script == "evaluate" else with_flag(ft, "--out", str(tmp_path / out)) + ["--epochs", "2"]
    assert run_script(script, argv, capsys)[0] == 0
    assert not any((tmp_path / name).exists() for name in stale) and (tmp_path / f"{out}.notes.tmp").exists()


# torchrun ------------------------------------------------------------------------------------

def torchrun(paths, out, *argv):
    """evaluate.py in two CPU processes under torchrun (gloo), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "evaluate.py"), "--head", paths["head"], "--model", paths["model"], "--data", paths["data"],
           "--device", "cpu",
           "--no-progress", "--n-examples", "1000000", "--out", out, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_under_torchrun_write_what_one_writes_and_resume_after_a_rank_is_killed(tmp_path):
    paths = write_setup(tmp_path, quad_linear(), n=48)
    argv = ["--eps", "0.42", "--steps", "5", "--queries", "100", "--chunk", "16"]
    first = run_evaluate(paths, *argv, "--out", str(tmp_path / "one.json"))
    one = comparable(first)
    assert any(0 < a < 1 for r in rows_of(first).values() for a in r.accuracies.values())  # not trivial

    out = str(tmp_path / "two.json")
    p = torchrun(paths, out, *argv)
    log, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    two = read_results(out)
    assert two.processes == 2 and not os.path.exists(out + ".parts")
    assert comparable(two) == one
    assert log.count("worst case") >= 10 and "results:" in log  # one log, rank 0's

    out = str(tmp_path / "killed.json")
    p = torchrun(paths, out, *argv)
    ledger, t0 = Path(out + ".parts") / "rank1.json", time.time()
    while time.time() - t0 < 120:  # rank 1 has attacked a chunk: kill it there
        try:
            parts = json.loads(ledger.read_text())
        except (OSError, ValueError):
            parts = {}
        if any(k.startswith("base|apgd") for k in parts.get("jobs", {})):
            os.kill(parts["pid"], 9)
            break
        time.sleep(0.01)
    p.communicate(timeout=120)
    assert p.returncode != 0
    assert read_results(out).complete is False
    assert json.loads(ledger.read_text())["jobs"]  # what rank 1 did before it died is kept

    p = torchrun(paths, out, *argv)
    log, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert "resuming from" in log
    assert comparable(read_results(out)) == one


# Install and the Python API ------------------------------------------------------------------
# pip install -e . (pyproject.toml) in a fresh virtual environment: hpm and hpmkit import from any
# folder, and the scripts run as commands (hpmkit/cli.py).


def fresh_venv(folder):
    """A new virtual environment that sees this one's packages (torch and the rest, through a .pth
    file) but not the project: what pip install -e . adds is all the project it gets."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()]
    Path(site, "parent.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.slow
def test_pip_install_e_gives_hpm_and_hpmkit_anywhere_and_both_commands(tmp_path):
    """In a fresh clone and a fresh virtual environment: pip install -e ., then, from another folder,
    the README's snippet runs (its RobustBench download replaced by a small CIFAR-shaped model) and
    hpm-finetune and hpm-evaluate fine-tune and evaluate a model of that folder."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split()
    for path in listed:  # this checkout's files as they are, committed or not (CI: the same)
        if (ROOT / path).is_file():
            (clone / path).parent.mkdir(parents=True, exist_ok=True)
            (clone / path).write_bytes((ROOT / path).read_bytes())
    python = fresh_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    before = subprocess.run([str(python), "-c", "import hpm"], cwd=outside, env=env, capture_output=True)
    assert before.returncode != 0  # the project is not there until it is installed
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                    str(clone)], check=True, cwd=outside, env=env, capture_output=True)
    snippet = (ROOT / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    driver = textwrap.dedent("""
        import sys, torch, torch.nn as nn, hpmkit.models
        torch.manual_seed(0)
        hpmkit.models.load_model = lambda *a, **k: nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
        exec(open(sys.argv[1]).read())
        import hpm
        print(hpm.__file__, tuple(logits.shape), torch.equal(oracle, base(x)))
    """)
    (outside / "snippet.py").write_text(snippet)
    (outside / "driver.py").write_text(driver)
    ran = subprocess.run([str(python), "driver.py", "snippet.py"], cwd=outside, env=env, capture_output=True,
                         text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.split() == [str(clone / "hpm.py"), "(64,", "10)", "True"]

    torch.manual_seed(0)  # a model and data of the other folder, given to the commands by relative paths
    net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, 10))
    torch.save(net.eval(), outside / "net.pt")
    x, y = mnist_slice(32)
    np.savez(outside / "d.npz", x=x, y=y)
    bin_ = python.parent
    ft = subprocess.run([str(bin_ / "hpm-finetune"), "--model", "net.pt", "--dataset", "mnist", "--data", "d.npz",
                         "--out", "head.pt", "--steps", "1", "--batch-size", "16", "--device", "cpu", "--no-progress"],
                        cwd=outside, env=env, capture_output=True, text=True)
    assert ft.returncode == 0 and read_head(str(outside / "head.pt"))["finished"], ft.stderr[-2000:]
    ev = subprocess.run([str(bin_ / "hpm-evaluate"), "--head", "head.pt", "--model", "net.pt", "--data", "d.npz",
                         "--out", "r.json", "--n-examples", "16", "--batch-size", "8", "--steps", "1", "--attacks",
                         "apgd-ce/fc", "--device", "cpu", "--no-progress"], cwd=outside, env=env,
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert set(read_results(outside / "r.json").rows()) == {"base", "hpm/batch", "hpm/image"}
    bad = subprocess.run([str(bin_ / "hpm-evaluate"), "--head", "missing.pt"], cwd=outside, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1  # a command's exit status is the script's


# The README's own-model recipe (issue 37): its commands and its lines that make .npz files, as written.

TINY_MYNET = '''import torch.nn as nn


class MyNet(nn.Module):
    """A newcomer's tiny CNN on 1x8x8 grey images of 4 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Linear(16, 4)

    def forward(self, x):
        return self.classifier(self.features(x))
'''


def readme_block(heading, language):
    """The first ```language block under the README's ## heading, as lines."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(f"## {heading}\n"):]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0].splitlines()


@pytest.mark.slow
def test_the_readmes_few_minute_own_model_form_runs_through_the_installed_command(tmp_path):
    """The README's own-model recipe, its commands read from README.md: hpm-finetune, then the
    first-look hpm-evaluate (the one with --steps), run as installed commands in a user's folder
    on a tiny model and data of this test's own; it finishes, with the README's budgets and the
    head's eps."""
    import shlex

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "hpm-evaluate").exists():
        pytest.skip("hpm-evaluate is not installed here (pip install -e .; .ci/run installs it)")
    commands = [ln.split("  #")[0].strip() for ln in readme_block("Your own model and data", "bash")]
    finetune_cmd, = [c for c in commands if c.startswith("hpm-finetune ")]
    first_look, = [c for c in commands if c.startswith("hpm-evaluate ") and "--steps" in c]
    (tmp_path / "mynet.py").write_text(TINY_MYNET)
    namespace = {}
    exec(TINY_MYNET, namespace)
    torch.manual_seed(0)
    torch.save(namespace["MyNet"]().state_dict(), tmp_path / "mynet_weights.pt")
    for name, seed in (("train.npz", 0), ("test.npz", 1)):
        x, y = quad_data(64, seed)
        np.savez(tmp_path / name, x=x.numpy(), y=y.numpy())
    # This checkout's code, wherever the install points; one thread, as conftest.one_thread sets for the
    # tests in this process: on these tiny tensors torch's threads only wait on each other (on 2 shared
    # cores the first look took 48 s with them, 6 s without).
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for command in (finetune_cmd, first_look):
        argv = shlex.split(command)
        proc = subprocess.run([str(bin_dir / argv[0]), *argv[1:], "--device", "cpu"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stderr[-3000:]
    flags = shlex.split(first_look)
    res = read_results(tmp_path / "head.eval-strong.json")
    assert res.complete and res.version == "strong"
    assert res.config["steps"] == int(flags[flags.index("--steps") + 1])
    assert res.config["queries"] == int(flags[flags.index("--queries") + 1])
    assert res.config["eps"] == read_head(str(tmp_path / "head.pt"))["attack_eps"] == 8 / 255
    assert res.subset["n"] == 64  # --n-examples 128 of 64 images: all of them


def test_the_readmes_lines_that_make_npz_files_of_the_embedded_mnist_give_what_the_scripts_read(tmp_path,
                                                                                               monkeypatch):
    code = "\n".join(readme_block("Your own model and data", "python"))
    assert "np.savez(\"train.npz\"" in code
    monkeypatch.chdir(ROOT)
    code = code.replace('"train.npz"', repr(str(tmp_path / "train.npz"))).replace('"test.npz"',
                                                                                   repr(str(tmp_path / "test.npz")))
    exec(code, {})
    x_train, y_train = load_npz(str(tmp_path / "train.npz"))
    x_test, y_test = load_npz(str(tmp_path / "test.npz"))
    assert x_train.shape == x_test.shape == (5000, 1, 28, 28) and x_train.dtype == torch.uint8
    assert sorted(y_train.unique().tolist()) == list(range(10))
    mnist = common.read_idx(ROOT / "experiments" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert torch.equal(torch.cat([x_train, x_test])[:, 0], torch.from_numpy(mnist.copy()))


def test_the_python_api_evaluates_objects_as_the_command_line_evaluates_their_files(tmp_path):
    """hpmkit.api.evaluate on the model object, its head loaded by hpmkit.api.load_head (or given as
    the checkpoint's path), and the images as tensors (uint8, or float in [0, 1]) gives every row's
    per-image results that evaluate.py gives on the same files; nothing is written without out."""
    from hpmkit import api

    paths = write_setup(tmp_path, quad_linear(), n=16)
    flags = dict(steps=3, queries=10, attacks="apgd-ce/mix,flip/mix,square", eps=0.3, version="strong")
    cli_argv = ["--steps", "3", "--queries", "10", "--attacks", flags["attacks"], "--eps", "0.3"]
    expected = run_evaluate(paths, *cli_argv, "--out", str(tmp_path / "cli.json"))
    with np.load(paths["data"]) as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    base = torch.load(paths["model"], weights_only=False)
    hpm_model = api.load_head(paths["head"], base)
    assert isinstance(hpm_model, hpm.HPMClassifier) and not hpm_model.training
    before = sorted(os.listdir(tmp_path))
    for images, head in ((x, hpm_model), (x.float() / 255, paths["head"])):
        got = api.evaluate(base, images, y, head=head, device="cpu", no_progress=True, **flags)
        assert {n: r.per_image for n, r in rows_of(Results(got)).items()} == \
            {n: r.per_image for n, r in rows_of(expected).items()}
    assert sorted(os.listdir(tmp_path)) == before  # no file without out
    api.evaluate(base, x, y, head=hpm_model, device="cpu", no_progress=True, out=str(tmp_path / "api.json"), **flags)
    assert read_results(tmp_path / "api.json").row("hpm/batch").per_image == expected.row("hpm/batch").per_image


@pytest.mark.parametrize("call,error,message", [
    (lambda api, m, x, y: api.evaluate(m, x, y, stepz=3), TypeError, "unknown settings stepz"),
    (lambda api, m, x, y: api.evaluate(m, x, y, data="d.npz"), TypeError, "unknown settings data"),
    (lambda api, m, x, y: api.evaluate(m, x * 2.0, y), ValueError, r"not \[0, 1\].*divide by 255"),
    (lambda api, m, x, y: api.evaluate(m, (x - 0.5) / 0.25, y), ValueError, r"not \[0, 1\].*normalised images\?"),
    (lambda api, m, x, y: api.evaluate(m, (x * 255).round().long(), y), ValueError,
     r"x is int64 in \[\d+, \d+\].*x\.astype\(numpy\.uint8\)"),
    (lambda api, m, x, y: api.evaluate(m, x, y[:3]), ValueError, "integer labels of shape"),
    (lambda api, m, x, y: api.evaluate(m, x, y, head=attach(quad_linear())), ValueError, "this very model"),
])
def test_the_python_api_refuses_what_it_cannot_evaluate_with_one_clear_error(call, error, message):
    from hpmkit import api

    x, y = quad_data(8)
    with pytest.raises(error, match=message):
        call(api, quad_linear(), x.float() / 255, y)


# The Python API's bad input (issue 37 item 4): one CLIError (a ValueError) with the command line's
# line, before any work; Python values taken where a user would pass them; the caller's model
# given back as it came.


def api_refusal(capsys, message, **flags):
    """hpmkit.api.evaluate on 8 quadrant images with flags: one CLIError (a ValueError) whose text is
    one line matching message, raised before any work (nothing printed)."""
    from hpmkit import api

    x, y = quad_data(8)
    base = quad_linear()
    head = flags.pop("head", None)
    with pytest.raises(CLIError, match=message) as e:
        api.evaluate(flags.pop("model", base), x, flags.pop("y", y), head=head, device="cpu", no_progress=True,
                     **flags)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert capsys.readouterr().out == ""
    return str(e.value)


@pytest.mark.parametrize("name,value,text", [
    ("version", "fast", "fast"), ("threat_model", "L3", "L3"), ("steps", 2.5, "2.5"), ("eps", "8/0", "8/0"),
    ("eps", math.nan, "nan"), ("context_orders", -3, "-3"), ("attacker_eps", 0.5, "0.5"),
], ids=["version fast: a choice", "threat_model L3: a choice, before the run", "steps 2.5: a whole number",
        "eps 8/0: as --eps reads it", "eps nan", "context_orders -3 (with checks)", "attacker_eps without attackers"])
def test_the_apis_bad_value_is_the_command_lines_line_before_any_work(tmp_path, capsys, name, value, text):
    line = api_refusal(capsys, "^(argument )?--", **{name: value}, **({"checks": True} if name == "context_orders"
                                                                       else {}))
    ev, _ = sweep(tmp_path)
    argv = ev + ["--" + name.replace("_", "-"), text] + (["--checks"] if name == "context_orders" else [])
    err = refused(tmp_path, capsys, "evaluate", argv, re.escape(line))
    assert err.startswith(f"error: {line}"), err  # the same line (the command line adds where --help is)


@pytest.mark.parametrize("case", ["labels out of range with a head", "the HPM model as the model",
                                  "checks 'yes'", "attackers a dict"])
def test_the_apis_bad_objects_are_one_error_before_any_work(capsys, case):
    x, y = quad_data(8)
    base = quad_linear()
    if case == "labels out of range with a head":  # was: the base row ran, then IndexError
        head = fitted_hpm(base, x, y)
        api_refusal(capsys, r"^y: labels must lie in \[0, 4\) for this model, found range \[0, 7\]$",
                    model=head.base_model, head=head, y=torch.arange(8))
    elif case == "the HPM model as the model":  # was: a per-image "base" row, silently
        api_refusal(capsys, "the model is a HPMClassifier, a base model with its head: pass the base model and "
                            "the head apart", model=fitted_hpm(base, x, y))
    elif case == "checks 'yes'":
        api_refusal(capsys, "^argument --checks: is on or off, True or False; got 'yes'$", checks="yes")
    else:
        api_refusal(capsys, "^argument --attackers: takes text \\(or a list\\), got a dict$", attackers={1: 2})


@pytest.mark.parametrize("flags", [dict(attackers=[1], contexts=["batch"]), dict(attackers=1, contexts=("batch",)),
                                   dict(attackers="1", contexts="batch", eps="3/10", steps="1")],
                         ids=["lists", "an int and a tuple", "text and a fraction as the command line takes them"])
def test_the_api_takes_python_values_where_a_user_would_pass_them(flags):
    from hpmkit import api

    x, y = quad_data(16)
    base = quad_linear()
    head = fitted_hpm(base, x, y)
    kw = dict(device="cpu", no_progress=True, attacks="apgd-ce/fc", steps=1, eps=0.3, batch_size=8)
    got = api.evaluate(head.base_model, x, y, head=head, **{**kw, **flags})
    assert got["config"]["attackers"] == [1] and got["config"]["contexts"] == ["batch"]
    assert got["config"]["eps"] == 0.3 and got["config"]["steps"] == 1


def test_the_api_leaves_the_callers_model_as_it_was_given_also_on_error():
    """Issue 37 item 4: training flags of every submodule and requires_grad, after a run and after a
    refusal; the head model (hpm.attach's) as given too."""
    from hpmkit import api

    x, y = quad_data(8)
    base = quad_linear()
    head = fitted_hpm(base, x, y)
    base, head = head.base_model, head
    base.train()
    base[1].eval()  # a mixed state, submodule by submodule
    head.head.train()
    base[1].weight.requires_grad_(True)
    given = ([m.training for m in head.modules()], [p.requires_grad for p in head.parameters()])
    api.evaluate(base, x, y, head=head, device="cpu", no_progress=True, attacks="apgd-ce/fc", steps=1, eps=0.3,
                 contexts="image")
    assert ([m.training for m in head.modules()], [p.requires_grad for p in head.parameters()]) == given
    with pytest.raises(CLIError):
        api.evaluate(base, x, y, head=head, version="fast")
    assert ([m.training for m in head.modules()], [p.requires_grad for p in head.parameters()]) == given
