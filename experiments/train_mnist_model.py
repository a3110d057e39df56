"""Train the embedded model of the main job: a small CNN adversarially trained on MNIST.

    python -m experiments.train_mnist_model            # writes experiments/data/mnist_cnn_at.pt (+ .json)

experiments/common.py's SmallCNN (FC classifier), PGD adversarial training at L-inf eps 0.3
(common.train, SETTINGS below) on the training part of the embedded MNIST test set's seeded split
(seed 0, the first 5,000 images; the other 5,000 are held out, as in experiments.run_mnist). The
state_dict is committed (loaded with weights_only=True and checked against its SHA-256 on every
read, like the data); the .json beside it records the command, the training time, the machine and
the held-out accuracy.
"""
import argparse
import json
import time

import torch

from experiments.common import EPS, MODEL_PATH, SmallCNN, accuracy, machine, make_splits, pgd_linf, train
from hpmkit.files import sha256

SETTINGS = dict(n_train=5000, batch_size=64, at_epochs=10, at_steps=7, seed=0)


def main(args):
    t0 = time.time()
    s = SETTINGS
    x_tr, y_tr, x_ho, y_ho, source = make_splits(None, s, s["seed"])
    x_tr, y_tr, x_ho, y_ho = map(torch.from_numpy, (x_tr, y_tr, x_ho, y_ho))
    torch.manual_seed(s["seed"])
    model = train(SmallCNN("fc"), x_tr, y_tr, s["at_epochs"], s["batch_size"], "cpu", "cnn_fc_at", s["at_steps"])
    seconds = time.time() - t0
    torch.save(model.state_dict(), MODEL_PATH)
    clean = accuracy(model, x_ho, y_ho, "cpu")
    torch.manual_seed(0)
    n = 1000
    x_adv = pgd_linf(model, x_ho[:n].float() / 255, y_ho[:n], EPS, 20)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y_ho[:n]).float().mean().item()
    record = {"command": args.command, "seconds": round(seconds, 1), "machine": machine(), "data": source,
              "settings": s, "heldout_clean_accuracy": clean, "heldout_pgd20_accuracy_first_1000": robust,
              "sha256": sha256(MODEL_PATH)}
    MODEL_PATH.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{MODEL_PATH}: held-out clean accuracy {clean:.1%}, PGD-20 at eps {EPS} {robust:.1%} (first {n}); "
          f"trained in {seconds / 60:.1f} min; sha256 {record['sha256']}")


def parse_args(argv=None):
    """No options (--help says what it runs): the command is always the one the .json records."""
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    args.command = "python -m experiments.train_mnist_model"
    return args


if __name__ == "__main__":
    main(parse_args())
