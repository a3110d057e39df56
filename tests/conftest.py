"""What the test files share: one thread for tiny tensors, the real MNIST slice and a small CNN
trained on it, the quadrant toy (8x8 grey images of 4 classes; class c has its quadrant c bright
(0.9) and the rest dark (0.1), with a little noise; a linear model summing each quadrant, so its
robust margin is known in closed form), TinyCNN, and the command-line runners with the one
bad-input promise (`refused`). Fixtures are fixtures; plain helpers are imported by the test files
with `from conftest import ...` (pytest puts tests/ on sys.path).
"""
import copy
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import finetune
import hpm
from experiments import common
from hpm import attach
from hpmkit import attacks, catalogue, checkpoint, cli, engine, models
from hpmkit.catalogue import CATALOGUE, Setting
from hpmkit.checkpoint import HeadRecord, save_head
from hpmkit.chunks import Chunk, FixedBatches
from hpmkit.engine import Runner
from hpmkit import results as results_module
from hpmkit.results import Results


ROOT = Path(__file__).resolve().parents[1]  # the repository: the scripts, README.md, testdata/
TOL = dict(rtol=1e-10, atol=1e-10)  # double precision comparisons


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and fair to other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# End to end on real MNIST images ---------------------------------------------------------

def mnist_slice(n):
    """The first n images of the real MNIST test set (uint8 (n, 1, 28, 28)), from the embedded
    copy (experiments/data/mnist), checked against its SHA-256: a missing or damaged file fails
    the tests loudly, never switching to other data."""
    _, _, x, y, _ = common.load_mnist()
    return x[:n, None].copy(), y[:n]


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


# The toy data: 8x8 grey images of 4 classes, class c has its quadrant c bright (0.9) and the
# rest dark (0.1), with a little noise. The toy model: a linear classifier that sums each
# quadrant, so its robust margin is known in closed form.

K, SIZE, D = 4, 8, 64


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


def make_head(K=4, D=5, seed=0, dtype=torch.float64):
    """An HPM head (D features, K classes) with its mixer and prototypes away from their trivial
    initial values (as test_hpm.py's, which travels with hpm.py alone)."""
    torch.manual_seed(seed)
    head = hpm.HPMHead(nn.Linear(D, K)).to(dtype)
    with torch.no_grad():
        head.mixer.weight.add_(0.1 * torch.randn_like(head.mixer.weight))
        head.mixer.bias.copy_(0.1 * torch.randn_like(head.mixer.bias))
        head.prototypes.copy_(torch.randn(K, D, dtype=dtype))
        head.seen.fill_(True)
    return head


def write_setup(tmp, base, n=32, seed=0, head=None, y=None, batch_size=8):
    """Model file, .npz test set and head checkpoint in tmp; returns their paths."""
    x, y0 = quad_data(n, seed)
    y = y0 if y is None else y
    paths = {k: str(tmp / f) for k, f in (("model", "model.pt"), ("data", "test.npz"),
                                          ("head", "head.pt"))}
    torch.save(base, paths["model"])
    np.savez(paths["data"], x=x.numpy(), y=y.numpy())
    hpm_model = fitted_hpm(base, x, y0) if head is None else head
    record = HeadRecord("hpm", paths["model"], "mnist", "Linf", batch_size, 0.3, {},
                        models.fingerprint(base.state_dict()))
    save_head(paths["head"], hpm_model, record, history=[], finished=True)
    return paths


def run_evaluate(paths, *argv):
    args = evaluate.parse_args(["--head", paths["head"], "--model", paths["model"], "--data", paths["data"],
                                "--device", "cpu", "--no-progress", "--n-examples", "1000000", *argv])
    return evaluate.main(args)


def comparable(res):
    """What two runs of one configuration must agree on (results.Results or a dict from JSON): the
    contents without what measures time or cost, or names the output file (results.MEASURED)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in results_module.MEASURED}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj
    return strip(res.data if isinstance(res, Results) else res)


def read_results(path):
    """A results file, through its owner (hpmkit/results.py)."""
    res = Results.read(str(path))
    assert res is not None, path
    return res


def rows_of(res):
    return res.rows()


def evaluate_rows(rows, x, y, attacks=catalogue.HPM_ATTACKS, *, batch_size=64, chunk=None, progress=False,
                  log=None, save_adv=None, **setting):
    """evaluate.evaluate on tensors: the rows under `attacks` on fixed batches of x, the Setting's
    fields as keywords (norm L-inf unless given; score_queries=True also chooses the fixed-batch
    Square, as the strong version does); no progress bars, no log."""
    setting.setdefault("norm", "Linf")
    setting.setdefault("fixed_batch_square", setting.get("score_queries", False))
    runner = Runner(chunk=chunk, progress=progress, log=log or (lambda *a: None))
    data = FixedBatches(x, y, batch_size)
    adv = None if save_adv is None else engine.AdvStore(save_adv, y, list(range(len(y))), data.batches)
    return evaluate.evaluate(rows, attacks, data, Setting(**setting), runner, adv=adv)


def attack_once(name, target, x, y, *, sizes=None, whole_batch=True, helpers=None, standing=None, **setting):
    """hpmkit.attacks.run_attack of the catalogue's `name` on x as one chunk of fixed batches of
    these sizes (default: one batch), the Setting's fields as keywords (norm L-inf unless given)."""
    setting.setdefault("norm", "Linf")
    return attacks.run_attack(CATALOGUE[name], target, Chunk(x, y, sizes or [len(y)]), Setting(**setting),
                              whole_batch=whole_batch, helpers=helpers, standing=standing)


def snapshot(folder):
    """Every file under folder: relative path -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file()}


# Models that the attacks must see through or agree on ----------------------------------------

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


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, K)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def nan_model():
    base = quad_linear()
    with torch.no_grad():
        base[1].bias[0] = float("nan")
    return base


# The command-line runners and the one bad-input promise ------------------------------------
# sweep(tmp) writes a model, 16 test images and a finished head; run_script runs a script's command
# line in this process; refused(...) asserts what bad input must give (see its docstring).


def sweep_argv(tmp):
    """evaluate.py's and finetune.py's argv on the files of sweep(tmp)."""
    ev = ["--head", str(tmp / "head.pt"), "--model", str(tmp / "model.pt"), "--data", str(tmp / "test.npz"),
          "--n-examples", "16", "--eps", "0.42", "--steps", "1", "--attacks", "apgd-ce/fc", "--contexts", "batch",
          "--out", str(tmp / "r.json"), "--device", "cpu", "--no-progress"]
    ft = ["--model", str(tmp / "model.pt"), "--dataset", "mnist", "--data", str(tmp / "test.npz"), "--steps", "1",
          "--batch-size", "8", "--out", str(tmp / "ft.pt"), "--device", "cpu", "--no-progress"]
    return ev, ft


def sweep(tmp):
    """Model, 16 test images (two fixed batches of 8) and a finished head in tmp; sweep_argv's."""
    write_setup(tmp, quad_linear(), n=16)
    return sweep_argv(tmp)


def with_flag(argv, flag, value=None):
    """argv with flag set to value (where it is, else added); value None: the flag removed."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv if value is None else argv + [flag, value]


def run_script(script, argv, capsys):
    """(exit status, stderr) of a script's command line, run in this process."""
    module = {"evaluate": evaluate, "finetune": finetune}[script]
    status = cli.run_cli(module.main, module.parse_args, argv)
    return status, capsys.readouterr().err


def run_cli_out(script, argv, capsys):
    """(exit status, stdout lines, stderr) of a script's command line, run in this process."""
    module = {"evaluate": evaluate, "finetune": finetune}[script]
    status = cli.run_cli(module.main, module.parse_args, argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def run_process(script, argv, cwd):
    """(exit status, stderr) of `python SCRIPT.py ARGV` in a new process, from the folder cwd."""
    proc = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *argv], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return proc.returncode, proc.stderr


def folders(tmp):
    return sorted(str(p) for p in Path(tmp).rglob("*") if p.is_dir() and not p.is_symlink())


def refused(tmp, capsys, script, argv, message, process=False):
    """The project's promise for bad input: the run stops with exit status 2 and one line on stderr,
    `error: ...` matching message, no traceback; every file under tmp is byte-identical, none
    added, no folder made. In this process, or (process=True) as `python SCRIPT.py` run from tmp."""
    before, dirs = snapshot(tmp), folders(tmp)
    status, err = run_process(script, argv, tmp) if process else run_script(script, argv, capsys)
    assert status == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert snapshot(tmp) == before and folders(tmp) == dirs
    return err


def edit_head(path, **fields):
    ckpt = checkpoint.load_checkpoint(path)
    ckpt.update(fields)
    torch.save(ckpt, path)


@pytest.fixture(scope="module")
def results_run(tmp_path_factory):
    """A finished evaluation of sweep()'s files: its folder (model.pt, test.npz, head.pt, r.json)."""
    tmp = tmp_path_factory.mktemp("sweep")
    ev, _ = sweep(tmp)
    assert cli.run_cli(evaluate.main, evaluate.parse_args, ev) == 0
    return tmp


def copy_run(src, dst):
    """results_run's files, byte for byte, in dst; evaluate.py's argv there."""
    for name in ("model.pt", "test.npz", "head.pt", "r.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return sweep_argv(dst)[0]


# A user's model as code (issue 29) ------------------------------------------------------------

MYNET = '''import torch.nn as nn


class MyNet(nn.Module):
    """A user's small CNN on 3x16x16 images, its last layer named classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten())
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        return self.classifier(self.features(x))
'''

# The quadrant model as code: build() makes quad_linear's layers, a --weights file fills them.
QUADNET = '''import torch.nn as nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 4))


class Needs(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(64, width)


def number():
    return 3
'''
