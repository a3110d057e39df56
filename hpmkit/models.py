"""The base models: a RobustBench model by name, or a whole pickled nn.Module from a path the
user names; either takes images in [0, 1] and returns logits. Also the check that a model
takes the images, and the fingerprint that ties a head to the base model it was trained on."""
import difflib
import hashlib
import importlib
import os
import sys
import warnings

import torch

from hpmkit.cli import CLIError, first_line
from hpmkit.data import to_float


def alias_autoattack():
    """robustbench imports `autoattack`; PyPI ships AutoAttack as `pyautoattack`.

    Needed before robustbench is imported, and before unpickling a model whose classes come
    from robustbench (they import `autoattack` too).
    """
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


def fingerprint(state):
    """A short hash of a model's tensors (a state_dict): which base model a head was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
