"""Train the embedded model of the main job: a small CNN adversarially trained on MNIST.

    python -m experiments.train_mnist_model            # writes experiments/data/mnist_cnn_at.pt (+ .json)

experiments/common.py's SmallCNN (FC classifier), PGD adversarial training at L-inf eps 0.3 (Madry
et al.) on the training part of the embedded MNIST test set's seeded split (seed 0, the first
5,000 images; the other 5,000 are held out, as in experiments.run_mnist): 10 epochs, 7 PGD
steps of 2.5 eps / 7 from a random start, the first 10% of the updates clean and eps ramped to
0.3 over the next 10%, Adam 1e-3, batch 64. The state_dict is committed (loaded with
weights_only=True and checked against its SHA-256 on every read, like the data); the .json beside
it records the command, the training time, the machine and the held-out clean accuracy.
"""
import argparse
import hashlib
import json
import shlex
import sys
import time

import torch

from experiments.common import (EPS, MNIST_DIR, SmallCNN, accuracy, machine, make_splits, pgd_linf, train)

SETTINGS = dict(n_train=5000, batch_size=64, at_epochs=10, at_steps=7, seed=0)
MODEL = MNIST_DIR.parent / "mnist_cnn_at.pt"


def main(args):
    t0 = time.time()
    s = SETTINGS
    x_tr, y_tr, x_ho, y_ho, source = make_splits(None, s, s["seed"])
    x_tr, y_tr, x_ho, y_ho = map(torch.from_numpy, (x_tr, y_tr, x_ho, y_ho))
    torch.manual_seed(s["seed"])
    model = train(SmallCNN("fc"), x_tr, y_tr, s["at_epochs"], s["batch_size"], "cpu", "cnn_fc_at", s["at_steps"])
    seconds = time.time() - t0
    torch.save(model.state_dict(), MODEL)
    clean = accuracy(model, x_ho, y_ho, "cpu")
    torch.manual_seed(0)
    n = 1000
    x_adv = pgd_linf(model, x_ho[:n].float() / 255, y_ho[:n], EPS, 20)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y_ho[:n]).float().mean().item()
    record = {"command": args.command, "seconds": round(seconds, 1), "machine": machine(), "data": source,
              "settings": s, "heldout_clean_accuracy": clean, "heldout_pgd20_accuracy_first_1000": robust,
              "sha256": hashlib.sha256(MODEL.read_bytes()).hexdigest()}
    MODEL.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{MODEL}: held-out clean accuracy {clean:.1%}, PGD-20 at eps {EPS} {robust:.1%} (first {n}); "
          f"trained in {seconds / 60:.1f} min; sha256 {record['sha256']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "-m", "experiments.train_mnist_model", *argv])
    return args


if __name__ == "__main__":
    main(parse_args())
