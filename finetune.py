"""Head-only adversarial fine-tuning of HPM with the IKL loss (paper supplementary 6.2).

    python finetune.py --model Cui2023Decoupled_WRN-28-10 --dataset cifar10 --out head.pt
    python finetune.py --model mnist_cnn.pt --data mnist_train.npz --dataset mnist --out head.pt

(Work in progress: the loading code below is shared with evaluate.py.)
"""
import difflib
import os
import sys

import numpy as np
import torch

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
        net = torch.load(model, map_location="cpu", weights_only=False)
        if not isinstance(net, torch.nn.Module):
            raise CLIError(f"{model} holds a {type(net).__name__}, not a whole pickled nn.Module "
                           "(save it with torch.save(model, path))")
        return net.eval()
    if model.endswith((".pt", ".pth", ".ckpt")) or os.sep in model:
        raise CLIError(f"model file {model} does not exist")
    alias_autoattack()
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
