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
- Before training, one clean pass sets C_global to the exact class means, then sets S:
  row c is the mean of softmax(zn / T) over the clean images of class c, where zn are the
  HPM logits (mode "ste", context "batch", in the clean pass's batches) right after C_global
  is set. S is fixed for the run (the IKL code refreshes it every epoch of a 200-epoch run).
  A class absent from the training set keeps a zero prototype and gets a uniform row.
- Training logits, clean and adversarial, are the real model's: mode "ste", context
  "batch". The EMA (Eq. 14) sees clean features only, after each update.
- The attack maximises the whole IKL loss with the training alpha and beta (the IKL code
  uses alpha 1, beta 0 on CIFAR-10 and alpha 1, beta 1 on CIFAR-100 for its attack), from
  x + 0.001 * N(0, 1), 10 steps of eps / 4 (signed for Linf; normalised gradient and
  projection on the ball for L2); the whole batch is perturbed jointly (context "batch").
- The attack differentiates through --attack-mode, default "ste": the real model, the one
  being trained, with straight-through (BPDA) gradients that differ from the gradient of
  its piecewise-constant forward pass. "soft" (surrogate 2) has exact gradients but attacks
  a smooth model that is not the one trained; "fc" (surrogate 1) ignores the l2 head and
  gives the FC layer's own adversarial examples. Adversarial training wants the examples
  that fool the trained model, so the default attacks it; compare with the surrogates.
- MNIST defaults (eps 0.3, the CIFAR-10 settings otherwise) and the ImageNet alpha/beta
  (the CIFAR-100 ones) are our choices; so are the L2 radii when --threat-model L2.
"""
import argparse
import difflib
import os
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hpm import attach

# Shared by finetune.py and evaluate.py ----------------------------------------------------

DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}


class CLIError(Exception):
    """Bad input from the user: printed as one line, without a traceback."""


def alias_autoattack():
    """robustbench imports `autoattack`; PyPI ships AutoAttack as `pyautoattack`."""
    import importlib

    if "autoattack" not in sys.modules:
        try:
            import autoattack  # noqa: F401  (the upstream package, if installed)
        except ImportError:
            pyautoattack = importlib.import_module("pyautoattack")
            sys.modules["autoattack"] = pyautoattack
            for sub in ("state", "autopgd_base", "square", "other_utils", "checks"):
                try:
                    sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
                except ImportError:
                    pass


def load_model(model, dataset, threat_model="Linf", model_dir="./models"):
    """A RobustBench model by name, or a whole pickled nn.Module from a path the user names.

    Either way the model takes images in [0, 1] and returns logits; it comes back in eval mode.
    """
    if os.path.exists(model):
        # A pickled module runs code on load: only ever from a path the user gave explicitly.
        try:
            net = torch.load(model, map_location="cpu", weights_only=False)
        except Exception as e:  # not a pickle, or a class this Python cannot import
            raise CLIError(f"could not load model file {model} ({type(e).__name__}: {e}); "
                           "it must hold a whole pickled nn.Module, saved with torch.save(model, path)")
        if not isinstance(net, torch.nn.Module):
            raise CLIError(f"{model} holds a {type(net).__name__}, not a whole pickled nn.Module "
                           "(save it with torch.save(model, path))")
        return net.eval()
    if model.endswith((".pt", ".pth", ".ckpt")) or os.sep in model:
        raise CLIError(f"model file {model} does not exist")
    alias_autoattack()
    with warnings.catch_warnings():  # robustbench's imports warn about pkg_resources and torch.jit
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model as rb_load_model

    try:
        names = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)].keys()
    except (ValueError, KeyError):
        raise CLIError(f"RobustBench has no models for dataset {dataset!r} and threat model "
                       f"{threat_model!r}; pass --model PATH to a pickled nn.Module instead")
    if model not in names:
        close = difflib.get_close_matches(model, list(names), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown RobustBench model {model!r} for {dataset} {threat_model}{hint}")
    try:
        net = rb_load_model(model_name=model, model_dir=model_dir, dataset=dataset,
                            threat_model=threat_model)
    except Exception as e:  # network errors come in many types; the message says enough
        raise CLIError(f"could not load RobustBench model {model!r} into {model_dir} "
                       f"({type(e).__name__}: {e}); check the network or pass --model PATH")
    return net.eval()


def load_npz(path):
    """A local dataset: x uint8 (N, C, H, W), y integer (N,). Returns uint8 and int64 tensors."""
    if not os.path.exists(path):
        raise CLIError(f"data file {path} does not exist")
    with np.load(path) as f:
        if "x" not in f or "y" not in f:
            raise CLIError(f"{path} must hold arrays 'x' and 'y', found {sorted(f.files)}")
        x, y = f["x"], f["y"]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise CLIError(f"{path}: x must be uint8 of shape (N, C, H, W), got {x.dtype} {x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise CLIError(f"{path}: y must be integers of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def load_data(dataset, split, data=None, data_dir="./data", per_class=None):
    """Images as uint8 (N, C, H, W) and labels int64 (N,): from --data FILE.npz, else the
    dataset's own loader (torchvision; downloads CIFAR where the internet is reachable;
    ImageNet from a local ImageFolder at DATA_DIR/{train,val}, resized 256, cropped 224).
    """
    if data is not None:
        x, y = load_npz(data)
    elif dataset in ("cifar10", "cifar100", "mnist"):
        import torchvision.datasets as tvd

        cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST}[dataset]
        try:
            ds = cls(data_dir, train=(split == "train"), download=True)
        except Exception as e:
            raise CLIError(f"{dataset} {split} set not found in {data_dir} and could not be "
                           f"downloaded ({type(e).__name__}); put it there, set --data-dir, or "
                           "pass --data FILE.npz (x: uint8 N x C x H x W, y: int N)")
        x = torch.as_tensor(np.asarray(ds.data))
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    elif dataset == "imagenet":
        x, y = load_imagenet(os.path.join(data_dir, split), per_class)
        per_class = None  # already applied while reading
    else:
        raise CLIError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if per_class is not None:
        x, y = take_per_class(x, y, per_class)
    return x.contiguous(), y


def take_per_class(x, y, per_class):
    """The first `per_class` images of every class, in their original order."""
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in y.unique()]).sort().values
    return x[keep], y[keep]


def load_imagenet(folder, per_class):
    """ImageNet from an ImageFolder (one folder per synset, in sorted order), as uint8 224x224."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    if not os.path.isdir(folder):
        raise CLIError(f"ImageNet folder {folder} not found; ImageNet cannot be downloaded "
                       "automatically: put the ImageFolder (one folder per class) there, set "
                       "--data-dir, or pass --data FILE.npz")
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    ds = tvd.ImageFolder(folder, transform=transform)
    targets = torch.tensor(ds.targets)
    idx = torch.arange(len(targets))
    if per_class is not None:
        idx = torch.cat([idx[targets == c][:per_class] for c in targets.unique()])
    xs = [ds[i][0] for i in idx.tolist()]
    return torch.stack(xs), targets[idx]


def check_labels(y, num_classes, where):
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise CLIError(f"{where}: labels must lie in [0, {num_classes}) for this model, "
                       f"found range [{int(y.min())}, {int(y.max())}]")


def to_float(x_uint8, device):
    """uint8 images -> float in [0, 1] on the device (per batch, to keep host memory small)."""
    return x_uint8.to(device, non_blocking=True).float().div_(255)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a run that dies never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path):
    """A head checkpoint written by finetune.py, read with weights_only=True (no code runs)."""
    if not os.path.exists(path):
        raise CLIError(f"head checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CLIError(f"{path} is not a head checkpoint readable with weights_only=True ({e})")
    missing = {"head", "model", "dataset", "momentum", "eps"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise CLIError(f"{path} is not a finetune.py head checkpoint (missing {sorted(missing)})")
    return ckpt


def load_head(ckpt, hpm_model):
    """Load a checkpoint's head state into an attached model, or say clearly why it does not fit."""
    state, head = ckpt["head"], hpm_model.head
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = [f"{k}: checkpoint {found.get(k)} vs model {expected.get(k)}"
                for k in sorted(set(expected) | set(found)) if found.get(k) != expected.get(k)]
        raise CLIError(f"the head checkpoint does not fit this model ({'; '.join(diff[:3])}); "
                       f"it was trained for {ckpt['model']!r} on {ckpt['dataset']}")
    head.load_state_dict(state)
    head.momentum, head.eps = ckpt["momentum"], ckpt["eps"]
    return hpm_model


# Fine-tuning ------------------------------------------------------------------------------

# Every flag left unset takes its dataset's value (sources in the module docstring).
DEFAULTS = {
    "cifar10": dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, eps=8 / 255, per_class=None),
    "cifar100": dict(epochs=2, momentum=0.995, alpha=5.0, beta=12.0, T=4.0, eps=8 / 255, per_class=None),
    "imagenet": dict(epochs=2, momentum=0.995, alpha=5.0, beta=12.0, T=4.0, eps=4 / 255, per_class=10),
    "mnist": dict(epochs=1, momentum=0.98, alpha=3.0, beta=10.0, T=4.0, eps=0.3, per_class=None),
}
EPS_L2 = {"cifar10": 0.5, "cifar100": 0.5, "imagenet": 3.0, "mnist": 2.0}  # the usual L2 radii


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
def clean_pass(model, x, y, T, batch_size, device):
    """Before training: set C_global to the exact class means of the clean features; return S.

    Sets model.head.prototypes and model.head.seen; returns the class means (K, D) and
    S (K, K), row c the mean of softmax(zn / T) over the images of class c, zn the HPM
    logits (mode "ste", context "batch") once C_global is set. The features are kept on
    the host between the two sweeps, since S needs the prototypes that the first sweep sets.
    """
    head = model.head
    K = head.fc.out_features
    starts = range(0, len(x), batch_size)
    Z = torch.cat([model.features(to_float(x[i:i + batch_size], device)).cpu()
                   for i in tqdm(starts, desc="clean pass", leave=False)])  # (N, D)
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
    x_adv = project(x + 0.001 * torch.randn_like(x), x, args.eps, args.threat_model)  # IKL's start
    for _ in range(args.steps):
        x_adv.requires_grad_(True)
        za = model(x_adv, mode=args.attack_mode)  # (B, K)
        loss = ikl_loss(zn, za, y, S, args.alpha, args.beta)
        grad, = torch.autograd.grad(loss, x_adv)  # the input's gradient only: no parameter .grad moves
        if args.threat_model == "Linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        x_adv = project(x_adv.detach() + args.step_size * step, x, args.eps, args.threat_model)
    return x_adv.detach()


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
    return loss.item(), (zn.argmax(1) == y).sum().item(), (za.argmax(1) == y).sum().item()


def train_epoch(model, optimizer, x, y, S, args, epoch, generator):
    """One shuffled pass over the uint8 training set; returns the epoch's summary as a dict."""
    model.train()  # the head only: HPMClassifier.train keeps the backbone in eval mode
    assert not any(m.training for m in model.base_model.modules()), "the backbone left eval mode"
    order = torch.randperm(len(x), generator=generator)
    n = loss_sum = clean_correct = adv_correct = 0
    t0 = time.time()
    bar = tqdm(range(0, len(x), args.batch_size), desc=f"epoch {epoch}/{args.epochs}", leave=False)
    for i in bar:
        idx = order[i:i + args.batch_size]
        xb, yb = to_float(x[idx], args.device), y[idx].to(args.device)
        loss, clean, adv = train_step(model, optimizer, xb, yb, S, args)
        n, loss_sum = n + len(idx), loss_sum + loss * len(idx)
        clean_correct, adv_correct = clean_correct + clean, adv_correct + adv
        bar.set_postfix_str(f"loss {loss_sum / n:.4f} clean {clean_correct / n:.1%} adv {adv_correct / n:.1%}")
    return {"epoch": epoch, "loss": loss_sum / n, "clean_acc": clean_correct / n,
            "adv_acc": adv_correct / n, "images": n, "seconds": time.time() - t0}


def head_parameters(model):
    """Freeze all but head.fc and head.mixer, as MoCo's linear probe does; return those parameters.

    Set here rather than trusted from attach: the head's FC is a copy of a frozen layer. The
    assertion also catches an FC shared with the base model (it would train the backbone).
    """
    model.requires_grad_(False)
    model.head.fc.requires_grad_(True)
    model.head.mixer.requires_grad_(True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = ({f"head.fc.{name}" for name, _ in model.head.fc.named_parameters()}
                | {f"head.mixer.{name}" for name, _ in model.head.mixer.named_parameters()})
    assert trainable == expected, f"trainable set {sorted(trainable)} is not head.fc + head.mixer"
    return [p for p in model.parameters() if p.requires_grad]


def check_input(model, x):
    """One forward on two images, so that a shape the model cannot take fails in one line."""
    try:
        with torch.no_grad():
            model.features(to_float(x[:2], model.head.fc.weight.device))
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"the model fails on images of shape {tuple(x.shape[1:])} (C, H, W): "
                       f"{str(e).splitlines()[0]}")


def check_frozen(model, base_state):
    """MoCo's sanity check: every base-model tensor, buffers included, is bitwise unchanged."""
    state = model.base_model.state_dict()
    assert state.keys() == base_state.keys(), "the base model's state_dict changed its keys"
    for k, v in state.items():
        assert torch.equal(v.cpu(), base_state[k]), f"base-model tensor {k} changed during fine-tuning"


def save_checkpoint(model, args, history, finished):
    """The head's state_dict and everything needed to rebuild it (weights_only-loadable)."""
    atomic_save({
        "head": {k: v.cpu() for k, v in model.head.state_dict().items()},
        "model": args.model, "dataset": args.dataset, "threat_model": args.threat_model,
        "momentum": model.head.momentum, "eps": model.head.eps, "attack_eps": args.eps,
        "num_classes": model.head.fc.out_features, "feature_dim": model.head.fc.in_features,
        "fc_name": model.fc_name, "args": dict(vars(args)), "history": history, "finished": finished,
    }, args.out)


def fill_defaults(args):
    """Flags left unset take the dataset's values; then the settings are checked."""
    if args.eps is None and args.threat_model == "L2":
        args.eps = EPS_L2[args.dataset]
    for k, v in DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.step_size is None:
        args.step_size = args.eps / 4  # 10 steps of eps / 4 can cross the ball and come back
    if os.path.exists(args.model):
        args.model = os.path.abspath(args.model)  # the checkpoint must find the file from anywhere
    if args.out is None:
        name = os.path.splitext(os.path.basename(args.model))[0]
        args.out = f"hpm_{args.dataset}_{name}.pt"
    if args.epochs < 1 or args.batch_size < 1 or args.steps < 0:
        raise CLIError("--epochs and --batch-size must be at least 1, --steps at least 0")
    if not (0 <= args.momentum < 1) or args.eps < 0 or args.lr <= 0 or args.T <= 0:
        raise CLIError("need 0 <= --momentum < 1, --eps >= 0, --lr > 0 and --T > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def main(args):
    fill_defaults(args)
    torch.manual_seed(args.seed)
    base_model = load_model(args.model, args.dataset, args.threat_model, args.model_dir).to(args.device)
    try:
        model = attach(base_model, momentum=args.momentum)
    except ValueError as e:
        raise CLIError(str(e))
    x, y = load_data(args.dataset, "train", args.data, args.data_dir, args.per_class)
    if len(x) == 0:
        raise CLIError(f"the {args.dataset} training set{' in ' + args.data if args.data else ''} is empty")
    check_labels(y, model.head.fc.out_features, args.data or f"the {args.dataset} training set")
    check_input(model, x)

    optimizer = torch.optim.Adam(head_parameters(model), lr=args.lr)
    base_state = {k: v.detach().cpu().clone() for k, v in model.base_model.state_dict().items()}

    print(f"HPM head on {args.model}: {len(x)} {args.dataset} training images, {args.epochs} epoch(s) "
          f"of batch {args.batch_size}, Adam lr {args.lr:g}, EMA momentum {args.momentum}")
    print(f"IKL alpha {args.alpha:g} beta {args.beta:g} T {args.T:g}; attack {args.threat_model} eps "
          f"{args.eps:.4g}, {args.steps} steps of {args.step_size:.4g} through mode {args.attack_mode!r}")
    _, S = clean_pass(model, x, y, args.T, args.batch_size, args.device)
    absent = (~model.head.seen).nonzero().flatten().tolist()
    print(f"clean pass: C_global = class means of {len(x)} images" +
          (f"; classes {absent[:10]}{'...' if len(absent) > 10 else ''} absent (zero prototype, "
           "uniform IKL weights)" if absent else ""))

    history, generator = [], torch.Generator().manual_seed(args.seed)
    try:
        for epoch in range(1, args.epochs + 1):
            history.append(train_epoch(model, optimizer, x, y, S, args, epoch, generator))
            check_frozen(model, base_state)
            save_checkpoint(model, args, history, finished=epoch == args.epochs)
            h = history[-1]
            print(f"epoch {epoch}/{args.epochs}: clean acc {h['clean_acc']:.2%}  adv acc {h['adv_acc']:.2%}  "
                  f"loss {h['loss']:.4f}  ({h['seconds']:.0f}s)  -> {args.out}")
    except KeyboardInterrupt:
        save_checkpoint(model, args, history, finished=False)
        print(f"\ninterrupted: saved the head as it stands ({len(history)} complete epoch(s)) to {args.out}",
              file=sys.stderr)
        raise
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
    p.add_argument("--eps", type=float, default=None,
                   help="attack radius; per dataset: Linf 8/255 on CIFAR, 4/255 on ImageNet (paper), 0.3 "
                        "on MNIST; L2 0.5 on CIFAR, 3 on ImageNet, 2 on MNIST (our choices)")
    p.add_argument("--steps", type=int, default=10, help="attack steps maximising IKL (paper: 10)")
    p.add_argument("--step-size", type=float, default=None, help="attack step size (default eps / 4)")
    p.add_argument("--attack-mode", default="ste", choices=["ste", "soft", "fc"],
                   help="head mode the attack differentiates through: 'ste' the real model with "
                        "straight-through gradients (default: the model being trained), 'soft' the "
                        "smooth surrogate, 'fc' the FC layer alone")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffling and the attack's random start")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda if available, else cpu)")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
