"""Head-only adversarial fine-tuning of HPM with the IKL loss (paper supplementary 6.2).

Take an adversarially trained model, freeze it, attach the HPM head (hpm.py), and train only
the head's FC layer and mixer: Adam, lr 5e-5, batch 64, on adversarial examples that
maximise the IKL loss for 10 steps. Defaults reproduce the paper's setting per dataset:

    python finetune.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar10
    python finetune.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar100
    python finetune.py --model Salman2020Do_R50 --dataset imagenet --data-dir /data/imagenet

Offline, with a whole pickled nn.Module (inputs in [0, 1]) and a local dataset
(x: uint8 N x C x H x W, y: int N):

    python finetune.py --model mnist_cnn.pt --dataset mnist --data mnist_train.npz --out head.pt

The checkpoint (default hpm_<dataset>_<model>.pt) holds the head's state_dict and what
evaluate.py needs to rebuild it; it loads with torch.load(..., weights_only=True).

IKL (Cui et al. 2024, "Decoupled Kullback-Leibler Divergence Loss"), with clean logits zn,
adversarial logits za, w = S[y] and d = zn - za:

    wMSE   = 0.5 * (sum_j w_j d_j^2 - (sum_j w_j d_j)^2)          no stop-gradient
    softCE = -sum_j softmax(zn).detach()_j * log_softmax(za)_j
    loss   = CE(zn, y) + beta * wMSE + alpha * softCE               (means over the batch)

From the paper: Adam 5e-5, batch 64, EMA momentum 0.98 (CIFAR-10) / 0.995 (CIFAR-100,
ImageNet), 1 epoch (CIFAR-10) / 2 (CIFAR-100, ImageNet; 10 images per class), 10 attack
steps maximising IKL. From the IKL authors' released models: alpha 3, beta 10, T 4 on
CIFAR-10; alpha 5, beta 12, T 4 on CIFAR-100. Not from the paper (ours):
- The backbone stays in eval mode with requires_grad False (BatchNorm statistics must not
  drift); the script asserts that only head.fc and head.mixer train and, after every epoch,
  that every base-model tensor, buffers included, is bitwise unchanged.
- Before training, one clean pass sets C_global to the exact class means.
- Class weights S (--class-weights). "ema" (default, the official code's rule as we read it
  with the paper's second momentum): S starts uniform (the official first epoch) and after
  every batch each present class c moves by S[c] <- lam2 * S[c] + (1 - lam2) * mean of
  softmax(zn / T) over the batch's images of class c, with lam2 = --momentum (the paper's
  "lambda1 = lambda2") and zn the clean logits of the model being trained (the real HPM
  logits, mode "ste", context "batch"), which is what the official code accumulates. Our
  reading: the paper's second momentum is an EMA of S over batches; with one epoch the
  official per-epoch refresh would leave S uniform throughout. "fixed" (ours, the first
  landing): S computed once in the clean pass, on the HPM logits right after C_global is set,
  and held for the run; a class absent from the training set gets a uniform row.
- Training logits, clean and adversarial, are the real model's: mode "ste", context
  "batch". The EMA (Eq. 14) sees clean features only, after each update.
- The attack (--attack-loss): "official" (default) maximises what the IKL code's attack
  maximises, softCE alone (alpha 1, beta 0) on CIFAR-10 and MNIST, softCE + wMSE (alpha 1,
  beta 1) on CIFAR-100 and ImageNet; "train" maximises the whole training loss. From
  x + 0.001 * N(0, 1), 10 steps of eps / 4 (signed for Linf; normalised gradient and
  projection on the ball for L2); the whole batch is perturbed jointly (context "batch").
- Augmentation (--augment): random crop (zero padding 4) and horizontal flip, as the IKL
  code's CIFAR scripts; on by default for CIFAR (official) and ImageNet (ours), off for MNIST
  (ours: a flipped digit is another digit).
- The mixer's start (--mixer-init; the paper is silent, and with Adam at 5e-5 for about a
  thousand steps it barely moves): "average" (default) W_m = [I/2; I/2], b_m = 0, i.e.
  (C_global + C_batch) / 2; "global" W_m = [I; 0], i.e. C_global alone; "default" PyTorch's
  nn.Linear initialisation.
- The attack differentiates through --attack-mode, default "ste": the real model, the one
  being trained, with straight-through (BPDA) gradients that differ from the gradient of
  its piecewise-constant forward pass. "soft" (surrogate 2) has exact gradients but attacks
  a smooth model that is not the one trained; "fc" (surrogate 1) ignores the l2 head and
  gives the FC layer's own adversarial examples. Adversarial training wants the examples
  that fool the trained model, so the default attacks it; compare with the surrogates.
- MNIST defaults (eps 0.3, the CIFAR-10 settings otherwise) and the ImageNet alpha/beta
  (the CIFAR-100 ones) are our choices; so are the L2 radii when --threat-model L2.
- The study's controls (--head): "ncm", HPM's l2 head on C_global alone (mixer [I; 0], the
  clean pass's class means, nothing trained); "dpnp", Adv-DPNP's unified prototypes (dpnp.py)
  trained head-only on its Eq. 7 with PGD on the head's cross-entropy (our choice of attack).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpm import attach
from hpmkit import dpnp
from hpmkit.loading import (DATASETS, DEFAULT_EPS, CLIError, check_device, check_eps, check_images,
                            check_labels, check_out, check_positive, eps_value, fingerprint, is_finished_head,
                            is_head_file, load_data, load_model, progress_bar, run_cli, save_head, to_float)

# Fine-tuning ------------------------------------------------------------------------------

# Every flag left unset takes its dataset's value (sources in the module docstring).
DEFAULTS = {
    "cifar10": dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, per_class=None, augment=True),
    "cifar100": dict(epochs=2, momentum=0.995, alpha=5.0, beta=12.0, T=4.0, per_class=None, augment=True),
    "imagenet": dict(epochs=2, momentum=0.995, alpha=5.0, beta=12.0, T=4.0, per_class=10, augment=True),
    "mnist": dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, per_class=None, augment=False),
}
# --head dpnp: (lambda_DPP, lambda_DNP, lambda_DFA), the Adv-DPNP paper's for CIFAR (MNIST and
# ImageNet take CIFAR-10's and CIFAR-100's: our choice).
DPNP_LAMBDAS = {"cifar10": dpnp.DEFAULTS["cifar10"], "mnist": dpnp.DEFAULTS["cifar10"],
                "cifar100": dpnp.DEFAULTS["cifar100"], "imagenet": dpnp.DEFAULTS["cifar100"]}
# --attack-loss official: (alpha, beta) of the IKL code's training attack.
OFFICIAL_ATTACK = {"cifar10": (1.0, 0.0), "mnist": (1.0, 0.0), "cifar100": (1.0, 1.0),
                   "imagenet": (1.0, 1.0)}


def weighted_mse(zn, za, w):
    """wMSE of IKL: 0.5 * (sum_j w_j d_j^2 - (sum_j w_j d_j)^2) with d = zn - za, per row.

    Written as half the w-weighted variance of d: the same value when every row of w sums
    to 1, without the cancellation of a difference of two large sums. No stop-gradient:
    both zn and za receive gradients (IKL's "broken asymmetry").
    """
    d = zn - za  # (B, K)
    d_mean = (w * d).sum(1, keepdim=True)  # (B, 1)
    return 0.5 * (w * (d - d_mean).pow(2)).sum(1).mean()


def soft_cross_entropy(zn, za):
    """softCE of IKL: cross-entropy of za against the clean prediction softmax(zn), held fixed."""
    return -(zn.detach().softmax(1) * za.log_softmax(1)).sum(1).mean()


def ikl_loss(zn, za, y, S, alpha, beta):
    """IKL training loss on clean logits zn and adversarial logits za (B, K), labels y (B,).

    S (K, K) holds the class-wise weights; row y is the weight vector of an image of class y.
    The temperature T enters only through S (the IKL code calls its loss with T = 1).
    """
    w = S[y]  # (B, K)
    return F.cross_entropy(zn, y) + beta * weighted_mse(zn, za, w) + alpha * soft_cross_entropy(zn, za)


@torch.no_grad()
def clean_pass(model, x, y, T, batch_size, device, show_progress=True):
    """Before training: set C_global to the exact class means of the clean features; return S.

    Sets model.head.prototypes and model.head.seen; returns the class means (K, D) and
    S (K, K), row c the mean of softmax(zn / T) over the images of class c, zn the HPM
    logits (mode "ste", context "batch") once C_global is set. The features are kept on
    the host between the two sweeps, since S needs the prototypes that the first sweep sets.
    """
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
    for i in starts:
        zn = head(Z[i:i + batch_size].to(device))  # (b, K)
        P_sum.index_add_(0, y[i:i + batch_size], (zn / T).softmax(1).double().cpu())
    uniform = torch.full_like(P_sum, 1 / K)  # a class never seen has no evidence: weigh all classes alike
    S = torch.where(count[:, None] > 0, P_sum / count.clamp_min(1)[:, None], uniform)
    return C_global.to(head.prototypes), S.to(head.prototypes)


def project(x_adv, x, eps, threat_model):
    """Back into the eps-ball around x (Linf or L2) and into the image box [0, 1]."""
    delta = x_adv - x
    if threat_model == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        norm = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1)
        delta = delta * (eps / norm.clamp_min(1e-12)).clamp(max=1)
    return (x + delta).clamp(0, 1)


def perturb(model, x, zn, y, S, args):
    """The training attack: args.steps ascent steps on IKL through the head in args.attack_mode.

    zn are the clean logits in the same mode, held fixed. The batch is perturbed jointly and
    classified together (context "batch"), so the batch prototypes see the adversarial batch.
    """
    return ascend(x, lambda x_adv: ikl_loss(zn, model(x_adv, mode=args.attack_mode), y, S,
                                            args.attack_alpha, args.attack_beta), args)


def ascend(x, loss_fn, args):
    """args.steps steps of args.step_size up loss_fn(x_adv), from x + 0.001 * N(0, 1) (IKL's
    start), inside the eps-ball and [0, 1]: signed for Linf, normalised gradient for L2."""
    x_adv = project(x + 0.001 * torch.randn_like(x), x, args.eps, args.threat_model)
    for _ in range(args.steps):
        x_adv.requires_grad_(True)
        loss = loss_fn(x_adv)
        grad, = torch.autograd.grad(loss, x_adv)  # the input's gradient only: no parameter .grad moves
        if args.threat_model == "Linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        x_adv = project(x_adv.detach() + args.step_size * step, x, args.eps, args.threat_model)
    return x_adv.detach()


@torch.no_grad()
def update_class_weights(S, zn, y, T, momentum):
    """--class-weights ema, in place: S[c] <- momentum * S[c] + (1 - momentum) * (mean of
    softmax(zn / T) over the images of class c), for the classes present in the batch."""
    K = S.shape[0]
    onehot = F.one_hot(y, K).to(S.dtype)  # (B, K)
    count = onehot.sum(dim=0)  # (K,)
    mean = onehot.t() @ (zn / T).softmax(dim=1).to(S.dtype) / count.clamp_min(1)[:, None]  # (K, K)
    present = (count > 0)[:, None]
    S.copy_(torch.where(present, momentum * S + (1 - momentum) * mean, S))


def random_crop_flip(x, generator, pad=4):
    """The IKL code's CIFAR augmentation on a uint8 batch (B, C, H, W): a random crop of the
    zero-padded image and a horizontal flip with probability 1/2, per image, vectorised."""
    B, _, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2 pad, W + 2 pad)
    top = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    flip = torch.rand(B, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(H))[:, :, None]  # (B, H, 1)
    cols = left[:, None] + torch.arange(W)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # (B, 1, W)
    return padded[torch.arange(B)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)


def init_mixer(head, how):
    """--mixer-init: "average" [I/2; I/2] (hpm.py's own start), "global" [I; 0] (C_global alone),
    "default" PyTorch's nn.Linear initialisation. As x @ W_m + b_m with W_m = mixer.weight.T."""
    D = head.fc.in_features
    with torch.no_grad():
        if how == "default":
            head.mixer.reset_parameters()
            return
        eye = torch.eye(D, dtype=head.mixer.weight.dtype, device=head.mixer.weight.device)
        halves = {"average": (eye / 2, eye / 2), "global": (eye, torch.zeros_like(eye))}[how]
        head.mixer.weight.copy_(torch.cat(halves, dim=1))
        head.mixer.bias.zero_()


def train_step(model, optimizer, x, y, S, args):
    """One batch: attack through the head, one IKL update of head.fc and head.mixer, then Eq. 14.

    The backbone is frozen, so each batch needs one feature pass per input (no gradients):
    the clean features serve the attack's targets, the update and the EMA. Returns the loss
    and the numbers of clean and adversarial images the head classifies correctly.
    """
    head = model.head
    with torch.no_grad():
        z_clean = model.features(x)  # (B, D)
        zn_attack = head(z_clean, mode=args.attack_mode)
    x_adv = perturb(model, x, zn_attack, y, S, args)
    with torch.no_grad():
        z_adv = model.features(x_adv)  # (B, D)
    zn, za = head(z_clean), head(z_adv)  # the real model: mode "ste", context "batch"
    loss = ikl_loss(zn, za, y, S, args.alpha, args.beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    head.update_prototypes(z_clean, y)  # clean features only: adversarial ones would drag the anchors
    if args.class_weights == "ema":
        update_class_weights(S, zn.detach(), y, args.T, args.momentum)
    return loss.item(), (zn.argmax(1) == y).sum().item(), (za.argmax(1) == y).sum().item()


def train_step_dpnp(model, optimizer, x, y, S, args):
    """--head dpnp, one batch: PGD on the DPNP head's cross-entropy (our choice of attack), then
    one step on Eq. 7 with Algorithm 1's dual branch (dpnp.adv_dpnp_loss). S is unused. With the
    backbone frozen only the prototypes learn, and the adversarial branch reaches them through
    the DFA term alone."""
    head = model.head
    x_adv = ascend(x, lambda x_adv: F.cross_entropy(model(x_adv), y), args)
    with torch.no_grad():
        z, z_adv = model.features(x), model.features(x_adv)  # (B, D) each
    loss = dpnp.adv_dpnp_loss(head, z, z_adv, y, *args.dpnp_lambdas)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        clean, adv = (head(z).argmax(1) == y).sum().item(), (head(z_adv).argmax(1) == y).sum().item()
    return loss.item(), clean, adv


def train_epoch(model, optimizer, x, y, S, args, epoch, generator):
    """One shuffled pass over the uint8 training set; returns the epoch's summary as a dict."""
    model.train()  # the head only: HPMClassifier.train keeps the backbone in eval mode
    assert not any(m.training for m in model.base_model.modules()), "the backbone left eval mode"
    if args.head == "dpnp":
        model.head.renormalize()  # Algorithm 1, line 4: back on the sphere at every epoch's start
    step = train_step_dpnp if args.head == "dpnp" else train_step
    order = torch.randperm(len(x), generator=generator)
    n = loss_sum = clean_correct = adv_correct = 0
    t0 = time.time()
    starts = range(0, len(x), args.batch_size)
    bar = progress_bar(len(starts), f"epoch {epoch}/{args.epochs}", not args.no_progress)
    for i in starts:
        idx = order[i:i + args.batch_size]
        xb = random_crop_flip(x[idx], generator) if args.augment else x[idx]
        xb, yb = to_float(xb, args.device), y[idx].to(args.device)
        loss, clean, adv = step(model, optimizer, xb, yb, S, args)
        n, loss_sum = n + len(idx), loss_sum + loss * len(idx)
        clean_correct, adv_correct = clean_correct + clean, adv_correct + adv
        bar.set_postfix_str(f"loss {loss_sum / n:.4f} clean {clean_correct / n:.1%} adv {adv_correct / n:.1%}")
        bar.update(1)
    bar.close()
    return {"epoch": epoch, "loss": loss_sum / n, "clean_acc": clean_correct / n,
            "adv_acc": adv_correct / n, "images": n, "seconds": time.time() - t0}


TRAINED = {"hpm": ("fc", "mixer"), "dpnp": ("prototypes",), "ncm": ()}  # what each head trains


def head_parameters(model, head="hpm"):
    """Freeze all but the head's trained parts (HPM: head.fc and head.mixer; DPNP: its
    prototypes), as MoCo's linear probe does; return those parameters.

    Set here rather than trusted from attach: the head's FC is a copy of a frozen layer. The
    assertion also catches an FC shared with the base model (it would train the backbone).
    """
    model.requires_grad_(False)
    expected = set()
    for part in TRAINED[head]:
        getattr(model.head, part).requires_grad_(True)
        module = getattr(model.head, part)
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


def check_finite(model, epoch, args):
    """A diverged run (its loss or its head not finite) stops before it saves that head; a
    finished head at --out is never replaced by it."""
    bad = [n for n, p in model.head.named_parameters() if not torch.isfinite(p).all()]
    if not math.isfinite(epoch["loss"]) or bad:
        if args.unfinished_out is not None and os.path.exists(args.unfinished_out):
            os.remove(args.unfinished_out)  # this run's earlier epochs: a finished head stays at --out
        raise CLIError(f"fine-tuning diverged in epoch {epoch['epoch']}: "
                       f"loss {epoch['loss']:g}" + (f", NaN/inf in {', '.join(bad)}" if bad else "")
                       + f"; its head was not saved (try a smaller --lr than {args.lr:g})")


def save_checkpoint(model, args, history, finished):
    """The head, atomically. An unfinished head never replaces a finished one at --out (unless
    --overwrite): it goes beside it, to args.unfinished_out."""
    path = args.out if finished or args.unfinished_out is None else args.unfinished_out
    save_head(path, model, head_type=args.head, model_name=args.model, dataset=args.dataset,
              threat_model=args.threat_model, batch_size=args.batch_size, attack_eps=args.eps,
              finished=finished, args=dict(vars(args)), history=history,
              base_fingerprint=getattr(args, "base_fingerprint", None))
    if finished and args.unfinished_out is not None and os.path.exists(args.unfinished_out):
        os.remove(args.unfinished_out)
    return path


def fill_defaults(args):
    """Flags left unset take the dataset's values; then the settings are checked."""
    if args.eps is None:
        args.eps = DEFAULT_EPS[args.threat_model][args.dataset]
    for k, v in DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.step_size is None:
        args.step_size = args.eps / 4  # 10 steps of eps / 4 can cross the ball and come back
    args.attack_alpha, args.attack_beta = (OFFICIAL_ATTACK[args.dataset] if args.attack_loss == "official"
                                           else (args.alpha, args.beta))
    args.dpnp_lambdas = DPNP_LAMBDAS[args.dataset]
    if args.lambda_dfa is not None:
        args.dpnp_lambdas = args.dpnp_lambdas[:2] + (args.lambda_dfa,)
    if os.path.exists(args.model):
        args.model = os.path.abspath(args.model)  # the checkpoint must find the file from anywhere
    if args.out is None:
        name = os.path.splitext(os.path.basename(args.model))[0]
        args.out = f"hpm_{args.dataset}_{name}.pt"
    check_positive(epochs=args.epochs, batch_size=args.batch_size, steps=args.steps,
                   per_class=args.per_class)
    check_eps(args.eps, args.threat_model)
    if not (0 <= args.momentum < 1 and args.lr > 0 and args.T > 0 and args.step_size > 0):  # (NaN fails too)
        raise CLIError("need 0 <= --momentum < 1, --lr > 0, --T > 0 and --step-size > 0")
    check_out(args.out, [args.model, args.data, args.data_dir], is_head_file, "head checkpoint")
    args.unfinished_out = None  # where unfinished heads go when --out holds a finished one
    if os.path.exists(args.out) and not args.overwrite and is_finished_head(args.out):
        stem, ext = os.path.splitext(args.out)
        args.unfinished_out = f"{stem}.unfinished{ext or '.pt'}"
    args.device = str(check_device(args.device))
    return args


def main(args):
    fill_defaults(args)
    torch.manual_seed(args.seed)
    base_model = load_model(args.model, args.dataset, args.threat_model, args.model_dir).to(args.device)
    try:
        model = build_model(base_model, args)
    except ValueError as e:
        raise CLIError(str(e))
    x, y = load_data(args.dataset, "train", args.data, args.data_dir, args.per_class)
    num_classes = model.base_model.get_submodule(model.fc_name).out_features
    check_labels(y, num_classes, args.data or f"the {args.dataset} training set")
    check_images(model.base_model, x, args.device, name=f"the model {args.model}")
    check_images(model, x, args.device, name=f"the model {args.model} with its head")
    base_state = {k: v.detach().cpu().clone() for k, v in model.base_model.state_dict().items()}
    if args.unfinished_out is not None:
        print(f"note: {args.out} holds a finished head; it is replaced only when this run finishes "
              f"(until then checkpoints go to {args.unfinished_out}; --overwrite to write there)")
    args.base_fingerprint = fingerprint(base_state)
    optimizer, S = start(model, x, y, args)
    train(model, optimizer, x, y, S, args, base_state)
    return model


def start(model, x, y, args):
    """What comes before the first epoch, per head: (the optimizer, or None for NCM, which trains
    nothing; the IKL class weights S, or None for DPNP)."""
    if args.head == "ncm":
        clean_pass(model, x, y, args.T, args.batch_size, args.device, not args.no_progress)
        print(f"NCM head on {args.model}: C_global = class means of {len(x)} images; l2 logits to "
              "C_global alone (nothing trained)")
        return None, None
    if args.head == "dpnp":
        lambdas = ", ".join(f"{n} {v:g}" for n, v in zip(("DPP", "DNP", "DFA"), args.dpnp_lambdas))
        print(f"DPNP head on {args.model}: {len(x)} {args.dataset} training images, {args.epochs} "
              f"epoch(s) of batch {args.batch_size}, Adam lr {args.lr:g}, alpha {args.dpnp_alpha:g}, "
              f"lambda {lambdas}; PGD on CE, {args.steps} steps of {args.step_size:.4g}")
        return torch.optim.Adam(head_parameters(model, "dpnp"), lr=args.lr), None
    optimizer = torch.optim.Adam(head_parameters(model), lr=args.lr)
    print(f"HPM head on {args.model}: {len(x)} {args.dataset} training images, {args.epochs} epoch(s) "
          f"of batch {args.batch_size}, Adam lr {args.lr:g}, EMA momentum {args.momentum}")
    print(f"IKL alpha {args.alpha:g} beta {args.beta:g} T {args.T:g}, class weights {args.class_weights}; "
          f"attack {args.threat_model} eps {args.eps:.4g}, {args.steps} steps of {args.step_size:.4g} "
          f"on IKL with alpha {args.attack_alpha:g} beta {args.attack_beta:g} ({args.attack_loss}) through "
          f"mode {args.attack_mode!r}; augment {args.augment}; mixer start {args.mixer_init!r}")
    _, S = clean_pass(model, x, y, args.T, args.batch_size, args.device, not args.no_progress)
    if args.class_weights == "ema":  # the official first epoch: uniform, then the EMA per batch
        S = torch.full_like(S, 1 / S.shape[0])
    absent = (~model.head.seen).nonzero().flatten().tolist()
    print(f"clean pass: C_global = class means of {len(x)} images" +
          (f"; classes {absent[:10]}{'...' if len(absent) > 10 else ''} absent (zero prototype, "
           "uniform IKL weights)" if absent else ""))
    return optimizer, S


def train(model, optimizer, x, y, S, args, base_state):
    """The epochs (none without an optimizer), the head saved after each (finished after the
    last) and the backbone checked bitwise unchanged; an interrupt saves the unfinished head."""
    epochs = 0 if optimizer is None else args.epochs
    history, generator = [], torch.Generator().manual_seed(args.seed)
    try:
        for epoch in range(1, epochs + 1):
            history.append(train_epoch(model, optimizer, x, y, S, args, epoch, generator))
            check_frozen(model, base_state)
            check_finite(model, history[-1], args)
            path = save_checkpoint(model, args, history, finished=epoch == epochs)
            h = history[-1]
            print(f"epoch {epoch}/{epochs}: clean acc {h['clean_acc']:.2%}  adv acc {h['adv_acc']:.2%} "
                  f"(against the training attack, not an evaluation)  loss {h['loss']:.4f}  "
                  f"({h['seconds']:.0f}s)  -> {path}")
    except KeyboardInterrupt:
        path = save_checkpoint(model, args, history, finished=False)
        print(f"\ninterrupted: saved the unfinished head ({len(history)} complete epoch(s)) to {path}",
              file=sys.stderr)
        raise
    if epochs == 0:
        check_frozen(model, base_state)
        print(f"-> {save_checkpoint(model, args, history, finished=True)}")
    return history


def build_model(base_model, args):
    """The frozen base model with the head of --head: HPM (with its mixer's start), DPNP, or NCM
    (HPM's l2 head on C_global alone: the mixer [I; 0], nothing trained)."""
    if args.head == "dpnp":
        return dpnp.attach(base_model, alpha=args.dpnp_alpha)
    model = attach(base_model, momentum=args.momentum)
    init_mixer(model.head, "global" if args.head == "ncm" else args.mixer_init)
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Head-only adversarial fine-tuning of HPM with the IKL loss (paper supp. 6.2). "
                    "Flags marked 'per dataset' default to the paper's setting for --dataset.")
    p.add_argument("--model", required=True,
                   help="RobustBench model name, or the path of a whole pickled nn.Module (inputs in "
                        "[0, 1]); a file is unpickled, which runs code: only name files you trust")
    p.add_argument("--dataset", default="cifar10", choices=list(DATASETS), help="training set (default cifar10)")
    p.add_argument("--threat-model", default="Linf", choices=["Linf", "L2"],
                   help="RobustBench threat model of --model and the attack's norm (default Linf)")
    p.add_argument("--data", default=None, metavar="FILE.npz",
                   help="local training set instead of the dataset's loader: x uint8 (N, C, H, W), y int (N,)")
    p.add_argument("--data-dir", default="./data",
                   help="where torchvision finds/downloads CIFAR and MNIST; ImageNet: an ImageFolder "
                        "at DATA_DIR/train (default ./data)")
    p.add_argument("--model-dir", default="./models", help="RobustBench weights cache (default ./models)")
    p.add_argument("--per-class", type=int, default=None,
                   help="use only the first N training images of each class (per dataset: 10 on ImageNet, "
                        "as in the paper; all elsewhere)")
    p.add_argument("--out", default=None, help="head checkpoint to write (default hpm_<dataset>_<model>.pt)")
    p.add_argument("--epochs", type=int, default=None,
                   help="per dataset: 1 on CIFAR-10, 2 on CIFAR-100 and ImageNet (paper); 1 on MNIST")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch and per C_batch (paper: 64)")
    p.add_argument("--lr", type=float, default=5e-5, help="Adam learning rate (paper: 5e-5)")
    p.add_argument("--momentum", type=float, default=None,
                   help="EMA momentum of C_global, Eq. 14; per dataset: 0.98 on CIFAR-10, 0.995 on "
                        "CIFAR-100 and ImageNet (paper); 0.98 on MNIST")
    p.add_argument("--alpha", type=float, default=None,
                   help="softCE weight of IKL; per dataset: 3 on CIFAR-10, 5 on CIFAR-100 (IKL's released "
                        "models); 5 on ImageNet and 3 on MNIST (our choices)")
    p.add_argument("--beta", type=float, default=None,
                   help="wMSE weight of IKL; per dataset: 10 on CIFAR-10, 12 on CIFAR-100 (IKL's released "
                        "models); 12 on ImageNet and 10 on MNIST (our choices)")
    p.add_argument("--T", type=float, default=None, help="temperature of the IKL class weights S (per dataset: 4)")
    p.add_argument("--eps", type=eps_value, default=None,
                   help="attack radius, a number or a fraction like 8/255; per dataset: Linf 8/255 on CIFAR, 4/255 on ImageNet (paper), 0.3 "
                        "on MNIST; L2 0.5 on CIFAR, 3 on ImageNet, 2 on MNIST (our choices)")
    p.add_argument("--steps", type=int, default=10, help="attack steps maximising IKL (paper: 10)")
    p.add_argument("--step-size", type=float, default=None, help="attack step size (default eps / 4)")
    p.add_argument("--attack-mode", default="ste", choices=["ste", "soft", "fc"],
                   help="head mode the attack differentiates through: 'ste' the real model with "
                        "straight-through gradients (default: the model being trained), 'soft' the "
                        "smooth surrogate, 'fc' the FC layer alone")
    p.add_argument("--head", choices=["hpm", "dpnp", "ncm"], default="hpm",
                   help="the head: 'hpm' (default); the study's controls 'dpnp' (Adv-DPNP's unified "
                        "prototypes, trained head-only on Eq. 7) and 'ncm' (l2 logits to C_global "
                        "alone, nothing trained)")
    p.add_argument("--dpnp-alpha", type=float, default=40.0,
                   help="--head dpnp: radius of the prototypes' sphere (default 40, the paper's)")
    p.add_argument("--lambda-dfa", type=float, default=None,
                   help="--head dpnp: weight of the DFA term (default per dataset: 2 on CIFAR-10 and "
                        "MNIST, 2.4 on CIFAR-100 and ImageNet); head-only, the adversarial branch "
                        "reaches the prototypes through this term alone")
    p.add_argument("--class-weights", choices=["ema", "fixed"], default="ema",
                   help="IKL class weights S: 'ema' (default) from uniform, an EMA over batches of the "
                        "clean softmax(logits / T) per class with --momentum (the official rule, our "
                        "reading of the paper's second momentum); 'fixed' computed once before training")
    p.add_argument("--attack-loss", choices=["official", "train"], default="official",
                   help="what the training attack maximises: 'official' (default) the IKL code's "
                        "attack loss (softCE alone on CIFAR-10 and MNIST; softCE + wMSE on CIFAR-100 "
                        "and ImageNet); 'train' the whole training loss")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random crop (padding 4) and horizontal flip; per dataset: on for CIFAR "
                        "(the IKL code) and ImageNet, off for MNIST")
    p.add_argument("--mixer-init", choices=["average", "global", "default"], default="average",
                   help="the mixer's start: 'average' (default) (C_global + C_batch) / 2; 'global' "
                        "C_global alone; 'default' PyTorch's nn.Linear initialisation")
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
