"""The images: a torchvision dataset, an ImageNet folder, or a local `.npz`, as uint8
(N, C, H, W) (an .npz's float images in [0, 1]: float32) with int64 labels; the usual attack
budgets per dataset; the IKL code's CIFAR augmentation. A user's own data (--data FILE.npz
without --dataset) is the dataset "own": its image size comes from the file, its classes from the
model."""
import os

import numpy as np
import torch
import torch.nn.functional as F

from hpmkit.cli import CLIError, first_line

DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}  # the --dataset choices
OWN = "own"  # --data without --dataset: not a choice, the name the per-dataset tables give it
# The usual attack budgets: RobustBench for CIFAR and ImageNet, Madry et al. for MNIST; own data
# takes RobustBench's CIFAR budgets (most small-image models are CIFAR-like).
DEFAULT_EPS = {
    "Linf": {"cifar10": 8 / 255, "cifar100": 8 / 255, "imagenet": 4 / 255, "mnist": 0.3, OWN: 8 / 255},
    "L2": {"cifar10": 0.5, "cifar100": 0.5, "imagenet": 3.0, "mnist": 2.0, OWN: 0.5},
}
# Where each default budget comes from, as the scripts print it beside the value.
EPS_ORIGIN = {
    "Linf": {"cifar10": "8/255: the paper's for cifar10", "cifar100": "8/255: the paper's for cifar100",
             "imagenet": "4/255: the paper's for imagenet", "mnist": "Madry et al.'s for mnist",
             OWN: "8/255: own data's default, RobustBench's CIFAR budget"},
    "L2": {"cifar10": "RobustBench's for cifar10", "cifar100": "RobustBench's CIFAR budget, for cifar100",
           "imagenet": "our choice for imagenet", "mnist": "our choice for mnist",
           OWN: "own data's default, RobustBench's CIFAR budget"},
}


def eps_line(eps, given, threat_model, dataset):
    """The line that says the attack budget and where it comes from (given: set by --eps)."""
    why = "given as --eps" if given else f"{EPS_ORIGIN[threat_model][dataset]}; --eps to set"
    return f"eps {eps:.4g} ({why})"


def load_npz(path):
    """A local dataset: arrays x (images, in a form as_images takes) and y (integer labels (N,)), as
    an image tensor and int64 labels."""
    if not os.path.exists(path):
        raise CLIError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            found = sorted(f.files)
            if "x" in found and "y" in found:
                x, y = f["x"], f["y"]
    except Exception as e:  # a text file, a lone .npy array, a truncated archive, pickled objects
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # (numpy takes any file that is no array or zip for a pickle)
        if not zipped:
            raise CLIError(f"{path} is not an .npz archive of arrays x and y (no zip archive: text, or another "
                           "format); write it with numpy.savez(path, x=uint8 N x C x H x W, y=int N)")
        raise CLIError(f"{path} is not a readable .npz file ({first_line(e)}); write it with "
                       "numpy.savez(path, x=uint8 N x C x H x W, y=int N)")
    if "x" not in found or "y" not in found:
        raise CLIError(f"{path} must hold arrays 'x' and 'y', found {found or 'none'}")
    if x.dtype.kind not in "uif":  # (booleans, strings, objects)
        raise CLIError(f"{path}: x must be images, uint8 of shape (N, C, H, W) or float in [0, 1], got "
                       f"{x.dtype} {x.shape}")
    x = as_images(torch.from_numpy(x.copy()), path)
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise CLIError(f"{path}: y must be integers of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise CLIError(f"{path} holds no images")
    return x, torch.from_numpy(y.astype(np.int64))


def as_images(x, where):
    """Images as the pipeline takes them, from the forms people hold them in, else one CLIError
    saying the conversion. Accepted as they are: uint8 (N, C, H, W) (to_float divides by 255) and
    float in [0, 1] (kept as float32, not rounded to 256 levels: a value k/255 gives the same
    float32 as the uint8 k, so the same results); grey images (N, H, W) become one channel.
    Other forms are refused, each with its conversion."""
    shape = tuple(x.shape)
    if x.dim() == 3:
        x = x[:, None]  # grey images (N, H, W): one channel, as torchvision's MNIST is read
    if x.dim() != 4:
        raise CLIError(f"{where}: x must be images of shape (N, C, H, W), or (N, H, W) for grey ones; got "
                       f"{str(x.dtype).removeprefix('torch.')} {shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        raise CLIError(f"{where}: x has shape {shape}, channels last (N, H, W, C); the models take "
                       "(N, C, H, W): save x.transpose(0, 3, 1, 2)")
    if x.dtype == torch.uint8:
        return x
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if not x.is_floating_point():  # int32, int64, ...: pixel levels in a wider type
        fix = "x.astype(numpy.uint8)" if 0 <= lo and hi <= 255 else "give uint8 images (0-255)"
        raise CLIError(f"{where}: x is {str(x.dtype).removeprefix('torch.')} in [{lo:g}, {hi:g}]; images are "
                       f"uint8 (0-255) or float in [0, 1]: {fix}")
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise CLIError(f"{where}: x holds NaN or inf values")
    if lo < 0 or hi > 1:
        raise CLIError(f"{where}: x is float in [{lo:g}, {hi:g}], not [0, 1], the range the models take" + (
            ": pixel levels 0-255? divide by 255 (x / 255), or x.astype(numpy.uint8) if they are whole numbers"
            if 0 <= lo and hi <= 255 else " (normalised images?): they normalise inside; give the images "
            "before normalising"))
    return x.float()  # (float64 -> float32: what to_float would make of it anyway)


def load_data(dataset, split, data=None, data_dir="./data", per_class=None):
    """Images and int64 labels from --data FILE.npz, else the dataset's own loader (torchvision,
    which downloads where the internet is reachable; ImageNet from a local ImageFolder at
    DATA_DIR/{train,val})."""
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
    elif dataset == OWN:
        raise CLIError(f"own data has no loader: pass its {split} set as --data FILE.npz")
    else:
        raise CLIError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if per_class is not None:
        x, y = take_per_class(x, y, per_class)
    if len(y) == 0:
        raise CLIError(f"the {dataset} {split} set{' in ' + data if data else ''} is empty")
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
    return torch.stack([ds[i][0] for i in idx.tolist()]), targets[idx]


def check_labels(y, num_classes, where):
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise CLIError(f"{where}: labels must lie in [0, {num_classes}) for this model, "
                       f"found range [{int(y.min())}, {int(y.max())}]")


def to_float(x, device):
    """Images as float in [0, 1] on the device: uint8 ones divided by 255 (per batch, to keep host
    memory small); float ones (the Python API's) as they are."""
    if x.dtype != torch.uint8:
        return x.to(device).float()
    return x.to(device, non_blocking=True).float().div_(255)


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
