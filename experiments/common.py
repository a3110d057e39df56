"""What the experiments share: the embedded MNIST test set and its splits, the small CNNs and
their training, and the runner that drives finetune.py and evaluate.py through their command
lines. No experiment imports another; each imports this module.

The MNIST test set (the two t10k idx files, 10,000 images; Yann LeCun and Corinna Cortes,
CC BY-SA 3.0) is embedded in experiments/data/mnist/ and checked against its SHA-256 on every
read: a run on a clone anywhere needs nothing beside the repository.

The CNN classes live here, at a module path that does not move (experiments.common), so that
the models the experiments pickle (torch.save(model, path)) unpickle in a fresh process:
finetune.py and evaluate.py run from the repository root, where `experiments` is importable.
"""
import gzip
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpm
from hpmkit.cli import progress_bar
from hpmkit.files import sha256
from hpmkit.pgd import ascent_step, project

REPO = Path(__file__).resolve().parent.parent
MNIST_DIR = REPO / "experiments" / "data" / "mnist"  # the embedded test set
MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
EPS = 0.3  # the standard MNIST L-inf budget
# The main job's embedded model: SmallCNN adversarially trained at EPS by experiments.train_mnist_model
# (its command, time and accuracy in mnist_cnn_at.json beside it), a state_dict checked on every read.
MODEL_PATH = REPO / "experiments" / "data" / "mnist_cnn_at.pt"
MODEL_SHA256 = "c49a85dba26ddccd8056a22f453086eb07ed8b1263981d95d30fa785b4da8f04"


def check_embedded(path, digest, what, retrain=""):
    """An embedded file is there and intact (its SHA-256), else SystemExit in one line."""
    restore = f"restore it with `git checkout -- {cli_path(path)}`"
    if not path.is_file():
        raise SystemExit(f"the embedded {what} {path} is missing; {restore}")
    if sha256(path) != digest:
        raise SystemExit(f"the embedded {what} {path} is corrupted (its SHA-256 differs); {restore}{retrain}")


# Data ----------------------------------------------------------------------------------------

def read_idx(path):
    """An idx file (gzip or plain) as a numpy array: images (N, 28, 28) uint8 or labels (N,)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, n = int.from_bytes(data[0:4], "big"), int.from_bytes(data[4:8], "big")
    if magic == 2051:  # images
        rows, cols = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)
    if magic == 2049:  # labels
        return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)
    raise ValueError(f"{path} is not an MNIST idx file (magic number {magic})")


def find_idx(folder, name):
    """FOLDER/NAME or FOLDER/NAME.gz, in FOLDER itself or the torchvision layout MNIST/raw/."""
    for sub in (Path(folder), Path(folder) / "MNIST" / "raw", Path(folder) / "raw"):
        for candidate in (sub / name, sub / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(folder=None):
    """(x_train, y_train, x_heldout, y_heldout, description), with None for the training part
    when the folder holds the test set only. folder None: the embedded test set (checked)."""
    if folder is None or Path(folder).resolve() == MNIST_DIR.resolve():
        for name, digest in MNIST_SHA256.items():
            check_embedded(MNIST_DIR / name, digest, "MNIST file")
        folder = MNIST_DIR
    test = find_idx(folder, "t10k-images-idx3-ubyte"), find_idx(folder, "t10k-labels-idx1-ubyte")
    if None in test:
        raise SystemExit(f"no MNIST test set (t10k-images-idx3-ubyte[.gz], "
                         f"t10k-labels-idx1-ubyte[.gz]) in {folder}, {folder}/MNIST/raw or "
                         f"{folder}/raw; point --mnist-dir at the folder that holds them")
    train = find_idx(folder, "train-images-idx3-ubyte"), find_idx(folder, "train-labels-idx1-ubyte")
    x_test, y_test = read_idx(test[0]), read_idx(test[1])
    if None in train:
        return None, None, x_test, y_test, f"{test[0].parent} (test set only)"
    return read_idx(train[0]), read_idx(train[1]), x_test, y_test, f"{train[0].parent} (training and test sets)"


def make_splits(folder, cfg, seed):
    """Train and held-out parts as uint8 (N, 1, 28, 28) and int64 (N,) arrays, plus a description.
    With the test set alone, a seeded permutation: the first cfg["split"] (default n_train) train,
    the rest is held out; a reduced run (n_heldout) then takes the first n_train and n_heldout of
    each part, so that its held-out images are never those a model of the full split trained on."""
    x_train, y_train, x_test, y_test, source = load_mnist(folder)
    if x_train is None:
        perm = np.random.default_rng(seed).permutation(len(y_test))
        n_train = cfg.get("split", cfg["n_train"])
        train_idx, heldout_idx = perm[:n_train], perm[n_train:]
        x_train, y_train = x_test[train_idx], y_test[train_idx]
        x_test, y_test = x_test[heldout_idx], y_test[heldout_idx]
        how = f"seeded split (seed {seed}) of the 10k test set: {len(y_train)} train / {len(y_test)} held out"
    else:
        how = f"the standard split: {len(y_train)} train / {len(y_test)} held out (test set)"
    if "n_heldout" in cfg:  # quick run: a few hundred images in all
        x_train, y_train = x_train[:cfg["n_train"]], y_train[:cfg["n_train"]]
        x_test, y_test = x_test[:cfg["n_heldout"]], y_test[:cfg["n_heldout"]]
        how += f", cut to {len(y_train)} / {len(y_test)} (--quick)"
    return x_train[:, None], y_train, x_test[:, None], y_test, f"{source}; {how}"


# Models and their training -------------------------------------------------------------------

class L2Classifier(nn.Module):
    """Learnable class prototypes C (K, D); logits[i, j] = -||z_i - C_j||_2 (the paper's Fig. 1)."""

    def __init__(self, D, K):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(K, D) * 0.1)

    def forward(self, z):
        return hpm.l2_logits(z, self.prototypes)  # (B, K), the same distance as HPM's Eq. 18


class SmallCNN(nn.Module):
    """Two 5x5 conv layers (16, 32 channels), a hidden linear layer (D = 128), a classifier.

    classifier "fc": nn.Linear(D, 10), the last nn.Linear, so hpm.attach finds it;
    classifier "l2": L2Classifier. Inputs are images in [0, 1], (B, 1, 28, 28).
    """

    def __init__(self, classifier="fc", D=128, K=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 7, 7)
            nn.Flatten(), nn.Linear(32 * 7 * 7, D), nn.ReLU(),            # (B, D)
        )
        self.classifier = nn.Linear(D, K) if classifier == "fc" else L2Classifier(D, K)

    def forward(self, x):
        return self.classifier(self.features(x))


def pgd_linf(model, x, y, eps, steps):
    """L-inf PGD from a uniform random start, signed steps of 2.5 * eps / steps (Madry et al.)."""
    x_adv = project(x + (torch.rand_like(x) * 2 - 1) * eps, x, eps, "Linf")
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = ascent_step(x_adv.detach(), grad, x, eps, "Linf", 2.5 * eps / steps)
    return x_adv.detach()


def train(model, x, y, epochs, batch_size, device, desc, at_steps=0):
    """Adam, lr 1e-3. With at_steps > 0: PGD adversarial training at EPS (Madry et al.) on a short
    schedule: the first 10% of the updates clean, eps ramped linearly to EPS over the next 10%
    (without the warm-up, small CNNs often stall at chance under eps 0.3)."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n_batches = (len(y) + batch_size - 1) // batch_size
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        bar = progress_bar(n_batches, f"{desc} epoch {epoch + 1}/{epochs}")
        correct = 0
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx].to(device).float().div(255), y[idx].to(device)
            eps = 0.0
            if at_steps:
                progress = (epoch * n_batches + b + 1) / (epochs * n_batches)
                eps = EPS * min(1.0, max(0.0, (progress - 0.1) / 0.1))
                if eps > 0:
                    xb = pgd_linf(model, xb, yb, eps, at_steps)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == yb).sum().item()
            bar.set_postfix_str(f"loss {loss.item():.3f} eps {eps:.2f}")
            bar.update(1)
        bar.close()
        print(f"  {desc} epoch {epoch + 1}/{epochs}: train accuracy {correct / len(y):.2%}"
              + (f" (on PGD examples at eps {eps:.2f} by the end)" if at_steps else ""))
    return model.eval()


def embedded_model():
    """The embedded adversarially trained SmallCNN (eval mode), its file checked."""
    check_embedded(MODEL_PATH, MODEL_SHA256, "model", " or train it again: python -m experiments.train_mnist_model")
    model = SmallCNN("fc")
    model.load_state_dict(torch.load(MODEL_PATH, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y, device):
    """Clean accuracy of a per-image model on uint8 images, in batches."""
    correct = 0
    for i in range(0, len(y), 500):
        xb = x[i:i + 500].to(device).float().div(255)
        correct += (model(xb).argmax(1).cpu() == y[i:i + 500]).sum().item()
    return correct / len(y)


# The scripts through their command lines ----------------------------------------------------

def cli_path(path):
    """A path as the command line shows it: relative to the repository (where the scripts run)
    when it lies inside, so the printed commands can be pasted as they are."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def parse_with_command(parser, module, argv=None):
    """parser's args, with `command`: the command line that ran them (kept in what they write)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "-m", module, *argv])
    return args


def run_script(argv, log_path):
    """Run `python ARGV...` (a script path or `-m module`) from the repository root, where the
    pickled experiments.common models unpickle; its output, stderr's progress lines and warnings
    too, goes to the console (each line under "  | ", so that nothing of the script's reads as the
    experiment's own) and to log_path. A failure ends the experiment in one line."""
    cmd = [sys.executable] + argv
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    print("  $ " + shlex.join(["python"] + argv))
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(["python"] + argv) + "\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            print("  | " + line, end="")
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed (exit code {rc}); see {log_path} and the "
                         "messages above")


def machine():
    """Where the numbers came from, in one line."""
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
