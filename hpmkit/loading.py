"""What finetune.py and evaluate.py share: models, datasets, the head checkpoint, the console.

- Models: a RobustBench model by name, or a whole pickled nn.Module from a path (`load_model`).
- Data: a torchvision dataset, an ImageNet folder, or a local `.npz` (`load_data`), as uint8.
- The head checkpoint: `save_head` (finetune.py writes it) and `read_head` / `load_head`
  (evaluate.py reads it) side by side, so the fields they agree on are in one place.
- Bad input: `CLIError`, printed by `run_cli` as one line (exit status 2, no traceback).
- Files are written atomically (`atomic_write`): a run that dies never leaves half a file.

Neither script imports the other; both import this module.
"""
import difflib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from fractions import Fraction

import numpy as np
import torch

from hpm import attach, find_classifier
from hpmkit import dpnp

DATASETS = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "mnist": 10}
# The usual attack budgets: RobustBench for CIFAR and ImageNet, Madry et al. for MNIST.
DEFAULT_EPS = {
    "Linf": {"cifar10": 8 / 255, "cifar100": 8 / 255, "imagenet": 4 / 255, "mnist": 0.3},
    "L2": {"cifar10": 0.5, "cifar100": 0.5, "imagenet": 3.0, "mnist": 2.0},
}


class CLIError(Exception):
    """Bad input from the user: printed as one line, without a traceback."""


def run_cli(main, parse_args, argv=None, interrupted=None):
    """The scripts' `__main__`: CLIError -> one line on stderr and exit status 2; Ctrl-C -> 130."""
    try:
        main(parse_args(argv))
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(f"\n{interrupted}", file=sys.stderr)
        return 130
    return 0


# Flags -----------------------------------------------------------------------------------------

def eps_value(text):
    """argparse type of --eps: a number or a fraction such as 8/255 (non-negative)."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number or a fraction like 8/255: {text!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number >= 0: {text!r}")
    return value


eps_value.__name__ = "eps"  # argparse names the type in its error message


def check_eps(eps, threat_model):
    """An L-inf budget above 1 cannot be meant: inputs lie in [0, 1] (pixels are 8/255, not 8)."""
    if threat_model == "Linf" and eps > 1:
        raise CLIError(f"--eps {eps:g} is above 1, but inputs lie in [0, 1]; for a budget in "
                       f"pixel levels write it as a fraction, e.g. --eps {eps:g}/255")


def check_positive(**values):
    """Each named count (batch size, steps, queries, epochs, ...) must be at least 1."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


# Files -------------------------------------------------------------------------------------

def atomic_write(path, write):
    """write(file object) into a temporary file of its own beside PATH (two runs on one PATH never
    share one), then rename it over PATH: never half a file at PATH."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_device(name):
    """torch.device(name), refused in one line where it is unknown or not available here."""
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}, but no CUDA GPU is available; pass --device cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError, NotImplementedError) as e:
        raise CLIError(f"--device {name} is not available here ({first_line(e)}); use --device cpu"
                       + (" or cuda" if torch.cuda.is_available() else ""))
    if device.type == "meta":
        raise CLIError("--device meta holds no data; use --device cpu" + (" or cuda" if torch.cuda.is_available() else ""))
    return device


class OutLock:
    """Context manager: PATH.lock names the process that writes PATH; a second run on the same
    PATH stops at once, in one line (a lock left by a process that died is taken over)."""

    def __init__(self, path):
        self.path, self.lock = path, path + ".lock"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.lock)), exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(self.lock) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)  # alive?
            except (OSError, ValueError):
                os.remove(self.lock)  # stale: its process is gone
                return self.__enter__()
            raise CLIError(f"another run (process {pid}) is writing {self.path}; wait for it to end or "
                           f"choose another --out (if no such run exists, remove {self.lock})")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        if os.path.exists(self.lock):
            os.remove(self.lock)


def check_out(path, inputs=(), replaceable=None, what="file"):
    """--out can be written, checked before any work: not a folder, not under a regular file, in
    a folder this user may write in, never one of the run's inputs (files or folders), and, if
    it exists, a file the script may replace (replaceable(path) True: a `what` of its own)."""
    if os.path.isdir(path):
        raise CLIError(f"--out {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise CLIError(f"--out {path} lies under {folder}, which is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: no permission to write in {folder}")
    if not os.path.exists(path):
        return
    for given in inputs:
        if given and os.path.exists(given) and os.path.samefile(given, path):
            raise CLIError(f"--out {path} is an input of this run ({given}); choose another --out")
    if replaceable is not None and not replaceable(path):
        raise CLIError(f"--out {path} exists and is not a {what}; it is never replaced: choose another --out")


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    atomic_write(path, lambda f: f.write((dumps(obj) + "\n").encode()))


# Models ------------------------------------------------------------------------------------

def alias_autoattack():
    """robustbench imports `autoattack`; PyPI ships AutoAttack as `pyautoattack`.

    Needed before robustbench is imported, and before unpickling a model whose classes come
    from robustbench (they import `autoattack` too).
    """
    import importlib

    if "autoattack" in sys.modules:
        return
    try:
        import autoattack  # noqa: F401  (the upstream package, if installed)
    except ImportError:
        sys.modules["autoattack"] = importlib.import_module("pyautoattack")
        for sub in ("state", "autopgd_base", "square", "other_utils", "checks"):
            try:
                sys.modules[f"autoattack.{sub}"] = importlib.import_module(f"pyautoattack.{sub}")
            except ImportError:
                pass


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_model_file(path):
    """A whole pickled nn.Module saved with torch.save(model, path). Unpickling runs code: only
    ever from a path the user named."""
    alias_autoattack()
    try:
        with warnings.catch_warnings():  # robustbench's imports warn about pkg_resources
            warnings.simplefilter("ignore")
            net = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise CLIError(f"model file {path} refers to module {e.name!r}, which Python cannot import "
                       f"here: a pickled nn.Module stores its class by name, not its code; run from "
                       f"the folder that holds {e.name.split('.')[0]}.py (or add it to PYTHONPATH), "
                       "or re-save the model from a class that is importable here")
    except Exception as e:  # truncated, not a torch file, a class that changed since it was saved
        raise CLIError(f"could not load model file {path} ({first_line(e)}); it must hold a whole "
                       "nn.Module saved with torch.save(model, path)")
    if isinstance(net, dict) and "head" in net and "model" in net:
        raise CLIError(f"{path} is a head checkpoint of finetune.py, not a model: pass it as --head")
    if not isinstance(net, torch.nn.Module):
        raise CLIError(f"{path} holds a {type(net).__name__}, not a whole pickled nn.Module "
                       "(save it with torch.save(model, path))")
    return net.eval()


def load_model(model, dataset, threat_model="Linf", model_dir="./models"):
    """A RobustBench model by name, or a whole pickled nn.Module from a path the user names.

    Either way the model takes images in [0, 1] and returns logits; it comes back in eval mode.
    """
    if os.path.exists(model):
        return load_model_file(model)
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = rb_load_model(model_name=model, model_dir=model_dir, dataset=dataset,
                                threat_model=threat_model)
    except Exception as e:  # network errors come in many types; the first line says enough
        raise CLIError(f"could not load RobustBench model {model!r} into {model_dir} "
                       f"({first_line(e)}); without a network, download it once elsewhere and "
                       "pass --model PATH (torch.save(model, path))")
    return net.eval()


# Data --------------------------------------------------------------------------------------

def load_npz(path):
    """A local dataset: x uint8 (N, C, H, W), y integer (N,). Returns uint8 and int64 tensors."""
    if not os.path.exists(path):
        raise CLIError(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise CLIError(f"{path} is a single array, not an .npz archive with arrays 'x' and 'y'")
            if "x" not in f or "y" not in f:
                raise CLIError(f"{path} must hold arrays 'x' and 'y', found {sorted(f.files) or 'none'}")
            x, y = f["x"], f["y"]
    except CLIError:
        raise
    except Exception as e:  # a text file, a truncated archive, pickled objects
        raise CLIError(f"{path} is not a readable .npz file ({first_line(e)}); write it with "
                       "numpy.savez(path, x=uint8 N x C x H x W, y=int N)")
    if x.dtype != np.uint8 or x.ndim != 4:
        raise CLIError(f"{path}: x must be uint8 of shape (N, C, H, W), got {x.dtype} {x.shape}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        raise CLIError(f"{path}: x has shape {x.shape}, channels last (N, H, W, C); the models take "
                       "(N, C, H, W): save x.transpose(0, 3, 1, 2)")
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (x.shape[0],):
        raise CLIError(f"{path}: y must be integers of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
    if len(y) == 0:
        raise CLIError(f"{path} holds no images")
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
    xs = [ds[i][0] for i in idx.tolist()]
    return torch.stack(xs), targets[idx]


def check_labels(y, num_classes, where):
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise CLIError(f"{where}: labels must lie in [0, {num_classes}) for this model, "
                       f"found range [{int(y.min())}, {int(y.max())}]")


def to_float(x_uint8, device):
    """uint8 images -> float in [0, 1] on the device (per batch, to keep host memory small)."""
    return x_uint8.to(device, non_blocking=True).float().div_(255)


def check_images(model, x, device, name="the model"):
    """One forward of `model` (x -> logits) on two images, before anything is written: a shape
    the model cannot take, or NaN/inf logits, fail here in one line."""
    try:
        with torch.no_grad():
            logits = model(to_float(x[:2], device))
    except (RuntimeError, ValueError) as e:
        if str(e).startswith("attach:"):  # hpm: the final nn.Linear does not make the logits
            raise CLIError(str(e))
        raise CLIError(f"{name} cannot classify images of shape {tuple(x.shape[1:])} (C, H, W): "
                       f"{str(e).splitlines()[0]}")
    if not torch.is_tensor(logits):
        raise CLIError(f"{name} returns a {type(logits).__name__}, not a logits tensor: wrap it in a "
                       "module whose forward returns the logits alone, save that, and pass it")
    if not torch.isfinite(logits).all():
        raise CLIError(f"{name} returns NaN or inf logits on clean images; check the model file "
                       "and that inputs are meant to lie in [0, 1]")


# The head checkpoint ---------------------------------------------------------------------------

HEAD_FIELDS = {"head", "model", "dataset", "threat_model", "batch_size", "attack_eps", "finished"}
HEAD_ARGS = {"hpm": ("momentum", "eps"), "ncm": ("momentum", "eps"), "dpnp": ("alpha",)}  # to rebuild


def fingerprint(state):
    """A short hash of a model's tensors (a state_dict): which base model a head was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_head(path, model, *, head_type="hpm", model_name, dataset, threat_model, batch_size,
              attack_eps, finished, args, history, base_fingerprint=None):
    """The head's state_dict and what evaluate.py needs to rebuild and evaluate it, as named
    fields (readable with torch.load(..., weights_only=True)); written atomically. head_type:
    "hpm", or a control of the study, "ncm" (an HPM head on C_global alone) or "dpnp".
    base_fingerprint: fingerprint() of the frozen base model, checked when the head is loaded."""
    base_fc = model.base_model.get_submodule(model.fc_name)
    atomic_save({
        "head": {k: v.cpu() for k, v in model.head.state_dict().items()}, "head_type": head_type,
        **{k: getattr(model.head, k) for k in HEAD_ARGS[head_type]},
        "model": model_name, "dataset": dataset, "threat_model": threat_model,
        "batch_size": batch_size, "attack_eps": attack_eps, "finished": finished,
        "num_classes": base_fc.out_features, "feature_dim": base_fc.in_features,
        "fc_name": model.fc_name, "args": args, "history": history, "base_fingerprint": base_fingerprint,
    }, path)


def read_head(path):
    """A head checkpoint written by finetune.py, read with weights_only=True (no code runs)."""
    if not os.path.exists(path):
        raise CLIError(f"head checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a pickled object (a model, say) that a head checkpoint never holds
            raise CLIError(f"{path} is not a head checkpoint: it holds pickled code objects "
                           f"({found.group(1)}); if it is a model file, pass it as --model")
        raise CLIError(f"{path} is not a readable head checkpoint ({first_line(e)}); it may be "
                       "truncated: write it again with finetune.py")
    if not isinstance(ckpt, dict):
        raise CLIError(f"{path} holds a {type(ckpt).__name__}, not a finetune.py head checkpoint")
    legacy = isinstance(ckpt.get("args"), dict)  # heads written before the named fields existed
    if legacy:
        ckpt.setdefault("batch_size", ckpt["args"].get("batch_size"))
        ckpt.setdefault("attack_eps", ckpt["args"].get("eps"))
    ckpt.setdefault("head_type", "hpm")  # heads written before the controls existed
    if ckpt["head_type"] not in HEAD_ARGS:
        raise CLIError(f"{path}: unknown head type {ckpt['head_type']!r}")
    required = HEAD_FIELDS | set(HEAD_ARGS[ckpt["head_type"]])
    missing = required - set(ckpt) - ({"finished"} if legacy else set())
    if missing:
        raise CLIError(f"{path} is not a finetune.py head checkpoint (missing {sorted(missing)})")
    bad = [k for k, v in ckpt["head"].items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise CLIError(f"{path}: the head holds NaN or inf values in {', '.join(bad)} (a diverged "
                       "or corrupted fine-tuning); train it again")
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
    for k in HEAD_ARGS[ckpt.get("head_type", "hpm")]:
        setattr(head, k, ckpt[k])
    return hpm_model


def check_base(ckpt, base, model_name):
    """The head was fine-tuned on this very base model (its fingerprint), else one line; a head
    saved before fingerprints existed loads with a one-line note."""
    if ckpt.get("base_fingerprint") is None:
        print("note: the head checkpoint records no fingerprint of its base model (written before "
              "they existed): that it was trained on this model cannot be checked")
    elif fingerprint(base.state_dict()) != ckpt["base_fingerprint"]:
        raise CLIError(f"the head was fine-tuned on another base model than {model_name} (its weights "
                       f"differ; the checkpoint names {ckpt['model']!r}): a head only fits the model it "
                       "was trained on")


def is_head_file(path):
    """True if PATH holds a head checkpoint (finished or not): what finetune.py may replace."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and "head" in ckpt and "model" in ckpt


def is_finished_head(path):
    """True if PATH holds a head checkpoint whose fine-tuning finished (nothing to lose otherwise)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(ckpt, dict) and ckpt.get("finished") is True


# The console -------------------------------------------------------------------------------

def progress_bar(total, desc, enabled=True, every=60.0):
    """A tqdm bar on a terminal; in a redirected log no bar (thousands of fragments), only a
    line every `every` seconds; `enabled=False`: nothing."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
    return LogProgress(total, desc, every if enabled else math.inf)


class LogProgress:
    """The part of tqdm's interface the scripts use, as a compact line per `every` seconds."""

    def __init__(self, total, desc, every):
        self.total, self.desc, self.every, self.n, self.postfix = total, desc, every, 0, ""
        self.last = time.time()

    def update(self, n=1):
        self.n += n
        if time.time() - self.last >= self.every:
            self.last = time.time()
            print(f"  {self.desc}: {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


class WarningCounter:
    """A logger for AutoAttack's checks: counts each warning instead of printing it per batch."""

    def __init__(self):
        self.counts = {}

    def warning(self, msg):
        key = re.sub(r"\d+", "N", str(msg).split("!")[0])  # "there are N points with zero gradient"
        self.counts[key] = self.counts.get(key, 0) + 1

    def summary(self):
        return "; ".join(f"{k} ({n} times)" for k, n in self.counts.items())


def dumps(obj, indent=0):
    """Indented JSON; a list of numbers or short strings stays on one line (per-image lists)."""
    pad = " " * indent
    if isinstance(obj, dict) and obj:
        items = [f"{pad}  {json.dumps(str(k))}: {dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) or
                                              (isinstance(v, str) and len(v) > 40) for v in obj):
        items = [f"{pad}  {dumps(v, indent + 2)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def load_models(cfg, ckpt, device):
    """evaluate.py's models: (base model, HPM model or None, DPNP model or None, number of
    classes), frozen, on device; cfg names the base model, ckpt (read_head) the head."""
    base = load_model(cfg["model"], cfg["dataset"], cfg["threat_model"], cfg["model_dir"])
    hpm_model = dpnp_model = None
    try:
        num_classes = find_classifier(base)[1].out_features
        if ckpt is not None and ckpt["head_type"] == "dpnp":
            dpnp_model = load_head(ckpt, dpnp.attach(base, alpha=ckpt["alpha"]))
        elif ckpt is not None:  # "hpm", or "ncm" (an HPM head whose mixer passes C_global alone)
            hpm_model = load_head(ckpt, attach(base, momentum=ckpt["momentum"], eps=ckpt["eps"]))
    except ValueError as e:  # attach: no final nn.Linear
        raise CLIError(str(e))
    if ckpt is not None:
        check_base(ckpt, base, cfg["model"])
    base, hpm_model, dpnp_model = (m if m is None else m.to(device).eval().requires_grad_(False)
                                   for m in (base, hpm_model, dpnp_model))
    return base, hpm_model, dpnp_model, num_classes
