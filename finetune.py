"""Head-only adversarial fine-tuning of HPM with the IKL loss (paper supplementary 6.2).

Take an adversarially trained model, freeze it, attach the HPM head (hpm.py), and train only
the head's FC layer and mixer on adversarial examples that maximise IKL. Defaults reproduce
the paper's setting per dataset (DEFAULTS; the IKL code's where the paper is silent; own data,
--data without --dataset, takes CIFAR-10's without augmentation):

    python finetune.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar10
    python finetune.py --model Salman2020Do_R50 --dataset imagenet --data-dir /data/imagenet
    python finetune.py --model mnist_cnn.pt --dataset mnist --data mnist_train.npz --out head.pt
    python finetune.py --model mynet.py:MyNet --weights mynet_weights.pt --data my_train.npz

IKL (Cui et al. 2024, "Decoupled Kullback-Leibler Divergence Loss"), with clean logits zn,
adversarial logits za, w = S[y] and d = zn - za:

    wMSE   = 0.5 * (sum_j w_j d_j^2 - (sum_j w_j d_j)^2)          no stop-gradient
    softCE = -sum_j softmax(zn).detach()_j * log_softmax(za)_j
    loss   = CE(zn, y) + beta * wMSE + alpha * softCE               (means over the batch)

What is ours, not the paper's, with each alternative flag: docs/finetune.md. The study's
controls (--head ncm, dpnp): hpmkit/controls.py.
"""
import argparse
import sys
import time
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpm import attach
from hpmkit import controls
from hpmkit.checkpoint import HeadRecord, HeadWriter, probe
from hpmkit.cli import ArgumentParser, CLIError, eps_value, progress_bar, run_cli
from hpmkit.config import (EPS_DEFAULTS, FINETUNE_DATASET, PAPER_BATCH_SIZE, finetune_banner, finetune_origins,
                           finetune_settings, per_dataset)
from hpmkit.data import DATASETS, OWN, check_labels, load_data, random_crop_flip, to_float
from hpmkit.files import OutLock
from hpmkit.models import check_images, fingerprint, load_model
from hpmkit.pgd import ascend

# The paper's settings --------------------------------------------------------------------

# Every flag left unset takes its dataset's value (sources in the module docstring).
DEFAULTS = {
    "cifar10": dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, per_class=None, augment=True),
    "cifar100": dict(epochs=2, momentum=0.995, alpha=5.0, beta=12.0, T=4.0, per_class=None, augment=True),
    "imagenet": dict(epochs=2, momentum=0.995, alpha=5.0, beta=12.0, T=4.0, per_class=10, augment=True),
    "mnist": dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, per_class=None, augment=False),
    OWN: dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, per_class=None, augment=False),
}

# --attack-loss official: (alpha, beta) of the IKL code's training attack.
OFFICIAL_ATTACK = {"cifar10": (1.0, 0.0), "mnist": (1.0, 0.0), "cifar100": (1.0, 1.0),
                   "imagenet": (1.0, 1.0), OWN: (1.0, 0.0)}
TRAINED = ("fc", "mixer")  # the parts of the HPM head that train


# The IKL loss ----------------------------------------------------------------------------

def weighted_mse(zn, za, w):
    """wMSE of IKL, written as half the w-weighted variance of d = zn - za: the same value when every
    row of w sums to 1, without the cancellation of a difference of two large sums. No stop-gradient:
    both zn and za receive gradients (IKL's "broken asymmetry")."""
    d = zn - za  # (B, K)
    d_mean = (w * d).sum(1, keepdim=True)  # (B, 1)
    return 0.5 * (w * (d - d_mean).pow(2)).sum(1).mean()


def soft_cross_entropy(zn, za):
    """softCE of IKL: cross-entropy of za against the clean prediction softmax(zn), held fixed."""
    return -(zn.detach().softmax(1) * za.log_softmax(1)).sum(1).mean()


def ikl_loss(zn, za, y, S, alpha, beta):
    """IKL on clean and adversarial logits (B, K); S (K, K): row y weighs an image of class y. The
    temperature T enters only through S (the IKL code calls its loss with T = 1)."""
    w = S[y]  # (B, K)
    return F.cross_entropy(zn, y) + beta * weighted_mse(zn, za, w) + alpha * soft_cross_entropy(zn, za)


@torch.no_grad()
def update_class_weights(S, zn, y, T, momentum):
    """--class-weights ema, in place: S[c] <- momentum * S[c] + (1 - momentum) * (mean of
    softmax(zn / T) over the batch's images of class c), for the classes in the batch."""
    K = S.shape[0]
    onehot = F.one_hot(y, K).to(S.dtype)  # (B, K)
    count = onehot.sum(dim=0)  # (K,)
    mean = onehot.t() @ (zn / T).softmax(dim=1).to(S.dtype) / count.clamp_min(1)[:, None]  # (K, K)
    present = (count > 0)[:, None]
    S.copy_(torch.where(present, momentum * S + (1 - momentum) * mean, S))


# The training attack ---------------------------------------------------------------------

def perturb(model, x, zn, y, S, cfg):
    """The training attack: cfg.steps ascent steps on IKL through the head in cfg.attack_mode (zn:
    the clean logits in that mode, fixed). The batch is perturbed and classified together (context
    "batch"), so the batch prototypes see the adversarial batch."""
    return ascend(x, lambda x_adv: ikl_loss(zn, model(x_adv, mode=cfg.attack_mode), y, S,
                                            cfg.attack_alpha, cfg.attack_beta),
                  cfg.eps, cfg.threat_model, cfg.steps, cfg.step_size)


# The clean pass ----------------------------------------------------------------------------

@torch.no_grad()
def clean_pass(model, x, y, T, batch_size, device, show_progress=True):
    """Before training: C_global (head.prototypes, head.seen) the exact class means of the clean
    features; returns S (K, K), row c the mean of softmax(zn / T) over the images of class c, zn the
    HPM logits once C_global is set (the features wait on the host for that second sweep). Prints
    the base model's clean accuracy, free: the head's FC layer is still the base model's."""
    head = model.head
    K = head.fc.out_features
    starts = range(0, len(x), batch_size)
    bar = progress_bar(len(starts), "clean pass", show_progress)
    Z = []
    for i in starts:
        Z.append(model.features(to_float(x[i:i + batch_size], device)).cpu())
        bar.update(1)
    bar.close()
    Z = torch.cat(Z)  # (N, D)
    if not torch.isfinite(Z).all():
        bad = int((~torch.isfinite(Z).all(1)).sum())
        raise CLIError(f"the base model's features are NaN or inf on {bad} of {len(Z)} training "
                       "images; check the model file and that inputs are meant to lie in [0, 1]")
    count = torch.bincount(y, minlength=K).double()  # (K,)
    sums = torch.zeros(K, Z.shape[1], dtype=torch.float64).index_add_(0, y, Z.double())  # (K, D)
    C_global = sums / count.clamp_min(1)[:, None]  # float64 sums: the exact means, up to rounding
    head.prototypes.copy_(C_global)
    head.seen.copy_(count > 0)
    P_sum = torch.zeros(K, K, dtype=torch.float64)
    base_correct = 0
    for i in starts:
        z = Z[i:i + batch_size].to(device)  # (b, D)
        zn = head(z)  # (b, K)
        P_sum.index_add_(0, y[i:i + batch_size], (zn / T).softmax(1).double().cpu())
        base_correct += (head(z, mode="fc").argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    print(f"base model: clean accuracy {base_correct / len(y):.1%} on the {len(y)} training images "
          "(no augmentation)")
    uniform = torch.full_like(P_sum, 1 / K)  # a class never seen has no evidence: weigh all classes alike
    S = torch.where(count[:, None] > 0, P_sum / count.clamp_min(1)[:, None], uniform)
    return S.to(head.prototypes)


def start(model, x, y, cfg):
    """Before the first epoch: the clean pass; returns the optimizer (None for the NCM control,
    which trains nothing) and the IKL class weights S."""
    optimizer = None if cfg.head == "ncm" else torch.optim.Adam(head_parameters(model), lr=cfg.lr)
    print(finetune_banner(cfg, len(x)))
    S = clean_pass(model, x, y, cfg.T, cfg.batch_size, cfg.device, not cfg.no_progress)
    if optimizer is None:
        return None, None
    if cfg.class_weights == "ema":  # the official first epoch: uniform, then the EMA per batch
        S = torch.full_like(S, 1 / S.shape[0])
    absent = (~model.head.seen).nonzero().flatten().tolist()
    print(f"clean pass: C_global = class means of {len(x)} images" +
          (f"; classes {absent[:10]}{'...' if len(absent) > 10 else ''} absent (zero prototype, "
           "uniform IKL weights)" if absent else ""))
    return optimizer, S


# A step ------------------------------------------------------------------------------------

def train_step(model, optimizer, x, y, S, cfg):
    """One batch: attack through the head, one IKL update of head.fc and head.mixer, then Eq. 14.
    Returns the loss and the numbers of clean and adversarial images the head classifies correctly.
    The backbone is frozen: one feature pass per input serves the attack's targets, the update and the EMA."""
    head = model.head
    with torch.no_grad():
        z_clean = model.features(x)  # (B, D)
        zn_attack = head(z_clean, mode=cfg.attack_mode)
    x_adv = perturb(model, x, zn_attack, y, S, cfg)
    with torch.no_grad():
        z_adv = model.features(x_adv)  # (B, D)
    zn, za = head(z_clean), head(z_adv)  # the real model: mode "ste", context "batch"
    loss = ikl_loss(zn, za, y, S, cfg.alpha, cfg.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    head.update_prototypes(z_clean, y)  # clean features only: adversarial ones would drag the anchors
    if cfg.class_weights == "ema":
        update_class_weights(S, zn.detach(), y, cfg.T, cfg.momentum)
    return loss.item(), (zn.argmax(1) == y).sum().item(), (za.argmax(1) == y).sum().item()


def head_parameters(model, trained=TRAINED):
    """Freeze all but the head's trained parts, as MoCo's linear probe does; return their parameters.
    Set here rather than trusted from attach: the head's FC is a copy of a frozen layer. The
    assertion also catches an FC shared with the base model (it would train the backbone)."""
    model.requires_grad_(False)
    expected = set()
    for part in trained:
        module = getattr(model.head, part).requires_grad_(True)
        expected |= ({f"head.{part}.{name}" for name, _ in module.named_parameters()}
                     if isinstance(module, nn.Module) else {f"head.{part}"})
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected, f"trainable set {sorted(trainable)} is not {sorted(expected)}"
    return [p for p in model.parameters() if p.requires_grad]


def check_frozen(model, base_state):
    """MoCo's sanity check: every base-model tensor, buffers included, is bitwise unchanged."""
    state = model.base_model.state_dict()
    assert state.keys() == base_state.keys(), "the base model's state_dict changed its keys"
    for k, v in state.items():
        assert torch.equal(v.cpu(), base_state[k]), f"base-model tensor {k} changed during fine-tuning"


# The loop ----------------------------------------------------------------------------------

def train_epoch(model, step, x, y, cfg, epoch, generator):
    """One shuffled pass over the uint8 training set, step(xb, yb) on each batch; its summary."""
    model.train()  # the head only: the classifier keeps the backbone in eval mode
    assert not any(m.training for m in model.base_model.modules()), "the backbone left eval mode"
    order = torch.randperm(len(x), generator=generator)
    n = loss_sum = clean_correct = adv_correct = 0
    t0 = time.time()
    starts = range(0, len(x), cfg.batch_size)
    bar = progress_bar(len(starts), f"epoch {epoch}/{cfg.epochs}", not cfg.no_progress)
    for i in starts:
        idx = order[i:i + cfg.batch_size]
        xb = random_crop_flip(x[idx], generator) if cfg.augment else x[idx]
        xb, yb = to_float(xb, cfg.device), y[idx].to(cfg.device)
        loss, clean, adv = step(xb, yb)
        n, loss_sum = n + len(idx), loss_sum + loss * len(idx)
        clean_correct, adv_correct = clean_correct + clean, adv_correct + adv
        bar.set_postfix_str(f"loss {loss_sum / n:.4f} clean {clean_correct / n:.1%} adv {adv_correct / n:.1%}")
        bar.update(1)
    bar.close()
    return {"epoch": epoch, "loss": loss_sum / n, "clean_acc": clean_correct / n,
            "adv_acc": adv_correct / n, "images": n, "seconds": time.time() - t0}


def train(model, optimizer, x, y, S, cfg, save):
    """The epochs (none without an optimizer), the head saved after each (save: a
    checkpoint.HeadWriter) and the backbone checked bitwise unchanged; an interrupt saves the
    unfinished head."""
    base_state = {k: v.detach().cpu().clone() for k, v in model.base_model.state_dict().items()}
    epochs = 0 if optimizer is None else cfg.epochs
    train_one = controls.train_step_dpnp if cfg.head == "dpnp" else train_step  # (NCM: no epochs)

    def step(xb, yb):
        return train_one(model, optimizer, xb, yb, S, cfg)

    history, generator = [], torch.Generator().manual_seed(cfg.seed)
    try:
        for epoch in range(1, epochs + 1):
            if cfg.head == "dpnp":
                model.head.renormalize()  # Algorithm 1, line 4
            history.append(train_epoch(model, step, x, y, cfg, epoch, generator))
            check_frozen(model, base_state)
            path = save.save(history, finished=epoch == epochs)  # (a diverged head stops the run instead)
            h = history[-1]
            augmented = " (cropped and flipped)" if cfg.augment else ""
            print(f"epoch {epoch}/{epochs}: clean acc {h['clean_acc']:.2%}{augmented}  adv acc {h['adv_acc']:.2%} "
                  f"(against the training attack, not an evaluation)  loss {h['loss']:.4f}  "
                  f"({h['seconds']:.0f}s)  -> {path}")
    except KeyboardInterrupt:
        path = save.save(history, finished=False)
        print(f"\ninterrupted: saved the unfinished head ({len(history)} complete epoch(s)) to {path}",
              file=sys.stderr)
        raise
    if epochs == 0:
        check_frozen(model, base_state)
        print(f"-> {save.save(history, finished=True)}")
    return history


# The script --------------------------------------------------------------------------------

def build_model(base_model, cfg):
    """The frozen base model with the head of --head: HPM (with its mixer's start), or a control
    (NCM: HPM's head with C_hybrid = C_global, the nearest class mean)."""
    if cfg.head == "dpnp":
        return controls.attach_dpnp(base_model, alpha=cfg.dpnp_alpha)
    model = attach(base_model, momentum=cfg.momentum)
    model.head.start_mixer("global" if cfg.head == "ncm" else cfg.mixer_init)
    return model


def main(args):
    cfg = finetune_settings(args, DEFAULTS, OFFICIAL_ATTACK)
    for line in finetune_origins(args, cfg):
        print(line)
    with OutLock(cfg.out):  # one run writes --out at a time, this one or an evaluate.py
        torch.manual_seed(cfg.seed)
        base_model = load_model(cfg.model, cfg.dataset, cfg.threat_model, cfg.model_dir, cfg.weights)
        base_model = base_model.to(cfg.device)
        try:
            model = build_model(base_model, cfg)
        except ValueError as e:
            raise CLIError(str(e))
        x, y = load_data(cfg.dataset, "train", cfg.data, cfg.data_dir, cfg.per_class)
        num_classes = model.base_model.get_submodule(model.fc_name).out_features
        check_labels(y, num_classes, cfg.data or f"the {cfg.dataset} training set")
        check_images(model.base_model, x, cfg.device, name=f"the model {cfg.model}")
        check_images(model, x, cfg.device, name=f"the model {cfg.model} with its head")
        record = HeadRecord(cfg.head, cfg.model, cfg.dataset, cfg.threat_model, cfg.batch_size, cfg.eps,
                            asdict(cfg), fingerprint(model.base_model.state_dict()), cfg.weights,
                            probe(model.base_model, x.shape[1:]))
        save = HeadWriter(cfg.out, model, record, to_float(x[:cfg.batch_size], cfg.device), cfg.overwrite)
        if save.unfinished is not None:
            print(f"note: {cfg.out} holds a finished head; it is replaced only when this run finishes "
                  f"(until then checkpoints go to {save.unfinished}; --overwrite to write there)")
        if cfg.head == "dpnp":
            optimizer, S = controls.start(x, cfg, head_parameters(model, ("prototypes",))), None
        else:
            optimizer, S = start(model, x, y, cfg)
        train(model, optimizer, x, y, S, cfg, save)
    return model


def parse_args(argv=None):
    default = {k: per_dataset({d: v[k] for d, v in DEFAULTS.items()}) for k in DEFAULTS["cifar10"]}  # in words
    p = ArgumentParser(
        description="Head-only adversarial fine-tuning of HPM with the IKL loss (paper supp. 6.2). "
                    "Flags marked 'per dataset' default to the paper's setting for --dataset; own data "
                    "(--data without --dataset) takes CIFAR-10's, without augmentation.")
    p.add_argument("--model", required=True,
                   help="the base model (inputs in [0, 1], logits out, its last layer an nn.Linear): a "
                        "RobustBench name; the path of a whole pickled nn.Module (torch.save(model, path); its "
                        "classes are found from the current folder and the file's folder too); or FILE.py:NAME "
                        "or package.module:NAME, NAME a class or a function of no arguments that builds the "
                        "model (a file is imported with its own folder on the import path, a module with the "
                        "current folder), with --weights. A pickle is unpickled and a .py file imported, which "
                        "runs code: only name files you trust")
    p.add_argument("--weights", metavar="STATE_DICT.pt",
                   help="with --model FILE.py:NAME: the model's state_dict, written with torch.save(model."
                        "state_dict(), path) (also a dict holding it under 'state_dict'); read as data, no code "
                        "runs (default: none, the model as NAME builds it)")
    p.add_argument("--dataset", choices=list(DATASETS),
                   help=f"training set (default: {FINETUNE_DATASET}; with --data and no --dataset, your own data: "
                        "image size from the file, classes from the model, CIFAR-10's settings without "
                        "augmentation)")
    p.add_argument("--threat-model", default="Linf", choices=["Linf", "L2"],
                   help="RobustBench threat model of --model and the attack's norm (default %(default)s)")
    p.add_argument("--data", metavar="FILE.npz", help="local training set: x uint8 (N, C, H, W), float in [0, 1], "
                   "or grey (N, H, W); y int (N,) (default: the dataset's own loader); without --dataset it is "
                   "your own data")
    p.add_argument("--data-dir", default="./data",
                   help="where torchvision finds/downloads CIFAR and MNIST; ImageNet: an ImageFolder "
                        "at DATA_DIR/train (default %(default)s)")
    p.add_argument("--model-dir", default="./models", help="RobustBench weights cache (default %(default)s)")
    p.add_argument("--per-class", type=int, help="the first N training images of each class only "
                   f"(per dataset, ImageNet's as in the paper: {default['per_class']})")
    p.add_argument("--out", help="head checkpoint to write (default hpm_<dataset>_<model>.pt, <model> the "
                   "file's name or a code spec's NAME)")
    p.add_argument("--epochs", type=int, help=f"per dataset: {default['epochs']} (CIFAR and ImageNet: the "
                   "paper's)")
    p.add_argument("--batch-size", type=int, default=PAPER_BATCH_SIZE,
                   help="images per batch and per C_batch (paper: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (paper: %(default)g)")
    p.add_argument("--momentum", type=float, help="EMA momentum of C_global, Eq. 14; per dataset: "
                   f"{default['momentum']} (CIFAR and ImageNet: the paper's)")
    p.add_argument("--alpha", type=float, help=f"softCE weight of IKL; per dataset: {default['alpha']} (CIFAR: "
                   "IKL's released models; ImageNet, MNIST and own data: our choices)")
    p.add_argument("--beta", type=float, help=f"wMSE weight of IKL; per dataset: {default['beta']} (CIFAR: "
                   "IKL's released models; ImageNet, MNIST and own data: our choices)")
    p.add_argument("--T", type=float, help=f"temperature of the IKL class weights S (per dataset: {default['T']})")
    p.add_argument("--eps", type=eps_value, help="attack radius, a number or a fraction like 8/255; per "
                   f"dataset: {EPS_DEFAULTS} (the first lines say where it comes from)")
    p.add_argument("--steps", type=int, default=10, help="attack steps maximising IKL (paper: %(default)s)")
    p.add_argument("--step-size", type=float, default=None, help="attack step size (default eps / 4)")
    p.add_argument("--attack-mode", default="ste", choices=["ste", "soft", "fc"],
                   help="head mode the attack differentiates through: 'ste' the real model with "
                        "straight-through gradients (the model being trained), 'soft' the "
                        "smooth surrogate, 'fc' the FC layer alone (default %(default)s)")
    p.add_argument("--head", choices=["hpm", "dpnp", "ncm"], default="hpm",
                   help="the head: 'hpm'; the study's controls 'dpnp' (Adv-DPNP's unified "
                        "prototypes, trained head-only on Eq. 7) and 'ncm' (l2 logits to C_global "
                        "alone, nothing trained) (default %(default)s)")
    p.add_argument("--dpnp-alpha", type=float, default=40.0,
                   help="--head dpnp: radius of the prototypes' sphere (default %(default)g, the paper's)")
    p.add_argument("--lambda-dfa", type=float, default=None,
                   help="--head dpnp: weight of the DFA term (default per dataset: "
                        f"{per_dataset({d: v[2] for d, v in controls.DPNP_LAMBDAS.items()})}); head-only, the "
                        "adversarial branch reaches the prototypes through this term alone")
    p.add_argument("--class-weights", choices=["ema", "fixed"], default="ema",
                   help="IKL class weights S: 'ema' from uniform, an EMA over batches of the "
                        "clean softmax(logits / T) per class with --momentum (the official rule, our "
                        "reading of the paper's second momentum); 'fixed' computed once before training "
                        "(default %(default)s)")
    p.add_argument("--attack-loss", choices=["official", "train"], default="official",
                   help="what the training attack maximises: 'official' the IKL code's "
                        "attack loss (softCE alone on CIFAR-10, MNIST and own data; softCE + wMSE on CIFAR-100 "
                        "and ImageNet); 'train' the whole training loss (default %(default)s)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 4) and horizontal flip of the training batches; per dataset: "
                        f"{default['augment']} (CIFAR: the IKL code's; a flipped digit is another digit; "
                        "nothing switched on unasked for own data); the first lines say which")
    p.add_argument("--mixer-init", choices=["average", "global", "default"], default="average",
                   help="the mixer's start: 'average' (C_global + C_batch) / 2; 'global' "
                        "C_global alone; 'default' PyTorch's nn.Linear initialisation (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffling and the attack's random start")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="let an unfinished run write over a finished head at --out (by default its "
                        "checkpoints go to OUT.unfinished.pt until it finishes)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (a redirected log gets none anyway, only periodic lines)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
