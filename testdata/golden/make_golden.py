"""The golden file: what today's code computes, to prove a restructuring changes nothing.

Through the command lines only (they stay stable when the modules behind them move):
one-epoch fine-tunings of a small CNN's head on 256 real MNIST images (HPM as the paper has it;
HPM with L2, augmentation, two epochs and the non-default choices; the two controls, NCM and
Adv-DPNP), then small evaluations of the committed heads: both --versions, every attack of the
catalogue with restarts and the gradient-masking checks, L2, and the controls. Every per-image
result and every head tensor is kept; tests/test_golden.py runs the same commands and compares exactly.

    python testdata/golden/make_golden.py            # writes testdata/golden/golden.pt and heads
    python testdata/golden/make_golden.py --add attackers attackers_any   # adds evaluations to it

The committed file was written by this script at commit 9b4992d (the code before the settings,
the catalogue and the results' owner moved), with the float kernels pinned (PINNED below).

The JSON is read here by this file's own few lines (per_image), not by hpmkit: the golden file
is the independent witness of a restructuring, and must read the files the old code wrote.
"""
import gzip
import json
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
# Each fine-tuning: its extra flags. Its head is kept as heads/<name>.pt, which the evaluations use.
FINETUNES = {
    "hpm": [],
    "hpm_l2": ["--threat-model", "L2", "--eps", "1.5", "--epochs", "2", "--augment", "--class-weights",
               "fixed", "--attack-loss", "train", "--attack-mode", "soft", "--mixer-init", "default"],
    "ncm": ["--head", "ncm"],
    "dpnp": ["--head", "dpnp"],
}
ALL_ATTACKS = ("apgd-ce/fc,apgd-ce/soft,apgd-ce/ste,apgd-ce/mix,apgd-ce/fixed,apgd-dlr/fc,apgd-dlr/soft,"
               "apgd-dlr/ste,apgd-dlr/mix,apgd-dlr/fixed,apgd-t/fc,apgd-t/soft,apgd-t/ste,apgd-t/mix,"
               "apgd-t/fixed,apgd-cw/fc,apgd-cw/soft,apgd-cw/ste,apgd-cw/mix,apgd-cw/fixed,flip/mix,square,"
               "joint/soft,joint/ste,joint/mix,target/soft,target/ste,target/mix")
# Each evaluation: (the head it evaluates, its extra flags).
EVALUATIONS = {
    "paper": ("hpm", ["--version", "paper"]),
    "strong": ("hpm", ["--version", "strong"]),
    "all": ("hpm", ["--attacks", ALL_ATTACKS, "--restarts", "2", "--checks", "--checks-n", "32"]),
    "l2": ("hpm_l2", ["--threat-model", "L2", "--eps", "1.0"]),
    "ncm": ("ncm", []),
    "dpnp": ("dpnp", ["--version", "paper"]),
    # K of B (added at commit 6b2ecf3, by that code, before the attacks that use the batch moved):
    # 60 images leave a short last batch of 12; the attacker's budget eps, then any image.
    "attackers": ("hpm", ["--attackers", "1,4", "--contexts", "batch", "--n-examples", "60"]),
    "attackers_any": ("hpm", ["--attackers", "2", "--attacker-eps", "1", "--contexts", "batch",
                              "--version", "paper"]),
}


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


# One thread, and the CPU's float kernels pinned to code paths every x86-64 CPU runs alike (ATen's
# scalar kernels, MKL's reproducible mode, oneDNN at SSE4.1): a golden file written on one machine
# must compare exactly on another (with AVX-512 kernels, sums round differently).
PINNED = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
          "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def run(script, *argv, cwd=ROOT):
    env = dict(os.environ, **PINNED)
    subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], check=True, cwd=cwd, env=env,
                   stdout=subprocess.DEVNULL)


def per_image(results):
    """Every per-image record of every row (and the accuracies, the checks' runs), nothing that
    measures time."""
    rows = {k: results[k] for k in ("base", "dpnp") if k in results}
    rows.update({f"hpm/{c}": r for c, r in results.get("hpm", {}).items()})
    out = {}
    for name, r in rows.items():
        out[name] = {"correct": r["correct"], "final_batch_correct": r.get("final_batch_correct", {}),
                     "attacks": r["attacks"], "clean": r["clean"], "worst_case": r["worst_case"]}
        for key in ("attacker_slots", "own", "benign", "benign_clean", "attacks_own", "attacks_benign"):
            if key in r:  # K of B
                out[name][key] = r[key]
        if "checks" in r:
            runs = r["checks"]["runs"]
            out[name]["checks"] = {"runs": {"accuracy": runs["accuracy"], "correct": runs["correct"]},
                                   **{k: v["status"] for k, v in r["checks"].items() if k != "runs"}}
    return out


def compute(tmp, heads=None, only=None):
    """{"head": {fine-tuning: the head's tensors}, "eval": {evaluation: per-image results}}.
    heads: evaluate these head files ({fine-tuning: path}, the golden ones) rather than the
    ones just trained; only: these evaluations alone, no fine-tuning (with heads)."""
    model, data = inputs(tmp)
    out = {"head": {}, "eval": {}}
    trained = {}
    for name, flags in FINETUNES.items() if only is None else ():
        trained[name] = os.path.join(tmp, f"head_{name}.pt")
        run("finetune.py", "--model", model, "--data", data, "--out", trained[name], *FINETUNE, *flags)
        out["head"][name] = torch.load(trained[name], weights_only=True)["head"]
    heads = heads or trained
    for name, (head, flags) in EVALUATIONS.items():
        if only is not None and name not in only:
            continue
        res = os.path.join(tmp, f"{name}.json")
        run("evaluate.py", "--head", heads[head], "--model", model, "--data", data, "--out", res,
            *EVALUATE, *flags)
        with open(res) as f:
            out["eval"][name] = per_image(json.load(f))
    return out


def head_files():
    """The committed heads the golden evaluations used."""
    return {name: os.path.join(HERE, "heads", f"{name}.pt") for name in FINETUNES}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--add"]:  # new evaluations into the existing file, the heads as they are
        golden = torch.load(os.path.join(HERE, "golden.pt"), weights_only=True)
        with tempfile.TemporaryDirectory() as tmp:
            golden["eval"].update(compute(tmp, heads=head_files(), only=sys.argv[2:])["eval"])
        torch.save(golden, os.path.join(HERE, "golden.pt"))
        print("added", *sys.argv[2:])
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = compute(tmp)
        os.makedirs(os.path.join(HERE, "heads"), exist_ok=True)
        for name, path in head_files().items():  # the heads the golden evaluations used
            ckpt = torch.load(os.path.join(tmp, f"head_{name}.pt"), weights_only=True)
            torch.save(ckpt, path)
        out["torch"] = str(torch.__version__)
        torch.save(out, os.path.join(HERE, "golden.pt"))
    print("wrote", os.path.join(HERE, "golden.pt"))
