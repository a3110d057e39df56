"""The golden file: what today's code computes, to prove a restructuring changes nothing.

Through the command lines only (they stay stable when the modules behind them move):
a one-epoch fine-tuning of a small CNN's head on 256 real MNIST images, then a small
evaluation of that head with both --version paper and --version strong, every per-image
result kept. test_hpm.py runs the same commands and compares exactly.

    python testdata/golden/make_golden.py            # writes testdata/golden/golden.pt
"""
import gzip
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FINETUNE = ["--dataset", "mnist", "--epochs", "1", "--lr", "2e-3", "--steps", "3",
            "--batch-size", "32", "--device", "cpu", "--no-progress"]
EVALUATE = ["--n-examples", "64", "--eps", "0.08", "--batch-size", "16", "--steps", "4", "--queries", "30",
            "--device", "cpu", "--no-progress", "--chunk", "32"]


def inputs(folder):
    """The model file and the data (written once beside this script; both in the repository)."""
    model, data = os.path.join(HERE, "cnn.pt"), os.path.join(HERE, "mnist256.npz")
    if not os.path.exists(data):
        src = os.path.join(ROOT, "..", "shared", "data", "mnist")
        with gzip.open(os.path.join(src, "t10k-images-idx3-ubyte.gz")) as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:256]
        with gzip.open(os.path.join(src, "t10k-labels-idx1-ubyte.gz")) as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)[:256].astype(np.int64)
        np.savez(data, x=x, y=y)
    if not os.path.exists(model):
        d = np.load(data)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        xf, yt = torch.from_numpy(d["x"]).float() / 255, torch.from_numpy(d["y"])
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for step in range(60):
            idx = torch.arange(step * 64, step * 64 + 64) % len(xf)
            opt.zero_grad()
            F.cross_entropy(net(xf[idx]), yt[idx]).backward()
            opt.step()
        torch.save(net.eval(), model)
    return model, data


def run(script, *argv, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], check=True, cwd=cwd, env=env,
                   stdout=subprocess.DEVNULL)


def per_image(results):
    """Every per-image record of every row (and the accuracies), nothing that measures time."""
    rows = {"base": results["base"], **{f"hpm/{c}": r for c, r in results.get("hpm", {}).items()}}
    return {name: {"correct": r["correct"], "final_batch_correct": r.get("final_batch_correct", {}),
                   "attacks": r["attacks"], "clean": r["clean"], "worst_case": r["worst_case"]}
            for name, r in rows.items()}


def compute(tmp, golden_head=None):
    """{"head": the fine-tuned head's tensors, "eval": {version: per-image results}}.
    golden_head: evaluate this head file (the golden one) rather than the one just trained."""
    import json

    model, data = inputs(tmp)
    head = os.path.join(tmp, "head.pt")
    run("finetune.py", "--model", model, "--data", data, "--out", head, *FINETUNE)
    ckpt = torch.load(head, weights_only=True)
    out = {"head": ckpt["head"], "eval": {}}
    head_file = golden_head or head
    for version in ("paper", "strong"):
        res = os.path.join(tmp, f"{version}.json")
        run("evaluate.py", "--head", head_file, "--model", model, "--data", data, "--version", version,
            "--out", res, *EVALUATE)
        with open(res) as f:
            out["eval"][version] = per_image(json.load(f))
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        out = compute(tmp)
        head = os.path.join(tmp, "head.pt")
        ckpt = torch.load(head, weights_only=True)
        out["torch"] = str(torch.__version__)
        torch.save(out, os.path.join(HERE, "golden.pt"))
        torch.save(ckpt, os.path.join(HERE, "head.pt"))  # the head the golden evaluation used
    print("wrote", os.path.join(HERE, "golden.pt"))
