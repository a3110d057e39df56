"""The Python API, for a notebook: evaluate a model object on tensors, load a head file onto a model.

    import hpmkit.api as api
    hpm_model = api.load_head("head.pt", base)             # the fine-tuned head on its base model
    results = api.evaluate(base, x, y, head=hpm_model, eps=8 / 255, version="paper")
    results["hpm"]["batch"]["worst_case"], results["base"]["attacks"]

`evaluate` is evaluate.py's evaluate_model (loaded where the project is installed: hpmkit/cli.py);
each Python value is read as the command line reads its flag (object_config).
"""
import argparse
import numbers
import os

import torch

from hpmkit.checkpoint import load_head_file
from hpmkit.cli import CLIError, load_script
from hpmkit.config import EvalConfig, resolve_settings, select_subset
from hpmkit.data import OWN, as_images, check_labels
from hpmkit.files import check_out
from hpmkit.models import fingerprint
from hpmkit.results import Results


def evaluate(model, x, y, head=None, **flags):
    """The base model `model` (images in [0, 1] -> logits) and, if given, its head (the model
    hpm.attach(model) made, trained; a DPNP model; or a head checkpoint's path), evaluated as
    evaluate.py does on images x (N, C, H, W; float in [0, 1] or uint8; grey ones may be (N, H, W))
    with labels y (N,): the results as a dict (the results file's layout, accuracies as fractions:
    0.672 where the printed tables say 67.2%). flags: evaluate.py's flags by name (eps, version,
    batch_size, attacks, steps, queries, contexts, attackers, checks, seed, device, chunk, out, ...),
    as the command line takes them or as Python values (attackers=[1, 8], contexts=["batch"],
    eps=8 / 255); every image of x is evaluated unless n_examples says less, and
    nothing is written unless out names a file. Bad input is one hpmkit.cli.CLIError (a ValueError)
    with the line the command line prints, before any work. The models are frozen for the run and
    given back as they came (training flags, requires_grad, device)."""
    return load_script("evaluate.py").evaluate_model(model, x, y, head, **flags)


def load_head(path, base_model):
    """The head checkpoint at `path` (written by finetune.py) on base_model: the HPM model (or the
    DPNP control's), frozen, in eval mode; an error if the head was fine-tuned on another model."""
    return load_head_file(path, base_model)


# The settings of a call: evaluate.py's flags by name, read as the command line reads them ----------

def object_config(flags, parser, versions, models, x, y):
    """(config.EvalConfig, (x, y, indices, len(x))): flags by name over the defaults of parser
    (evaluate.py's), checked as resolve_config checks them, the objects identified by their contents
    (fingerprints) for a results file to resume; n_examples defaults to all of x."""
    args = parser.parse_args([])
    objects = {"head", "model", "data", "weights", "data_dir", "model_dir", "per_class"}  # (files, or given)
    unknown = sorted(set(flags) - set(vars(args)) | set(flags) & objects)
    if unknown:
        names = ", ".join(sorted(set(vars(args)) - objects))
        raise TypeError(f"unknown settings {', '.join(unknown)}: the model, its head and the images are "
                        f"arguments; the settings are evaluate.py's flags by name ({names})")
    actions = {a.dest: a for a in parser._actions}
    s = {**vars(args), **{k: flag_value(actions[k], v) for k, v in flags.items()}}  # as they are resolved
    x, y = checked_tensors(x, y)
    if models.num_classes is not None:  # (a base model alone: run() reads its classes from its logits)
        check_labels(y, models.num_classes, "y")
    s.update(model=f"{type(models.base).__name__} (a Python object)", weights=None, head=None, data=None,
             dataset=s["dataset"] or OWN, per_class=None)
    resolve_settings(s, versions, None if models.head_type is None else {"head_type": models.head_type})
    head = models.hpm or models.dpnp
    idx = select_subset(len(y), len(y) if s["n_examples"] is None else s["n_examples"], s["subset_seed"])
    s.update(model_sha256=fingerprint(models.base.state_dict()), weights_sha256=None,
             head_sha256=None if head is None else fingerprint(head.head.state_dict()),
             data_sha256=fingerprint({"x": x, "y": y}), n_examples=len(idx))
    if s["out"]:
        check_out(s["out"], [], lambda path: Results.read(path) is not None, "results file of evaluate.py")
    return EvalConfig(**s), (x[idx], y[idx], idx, len(y))


def flag_value(action, value):
    """A Python value for a flag (its argparse action) as the command line would read it, or the line
    the command line prints: text through the flag's type; a list (attackers=[1, 8], contexts=["batch"])
    or a number for a text flag as its comma list; a whole number for a count, a number for a float;
    True or False for an on/off flag; a choice from its choices."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # --checks, --overwrite, ...
        if not isinstance(value, bool):
            raise CLIError(f"argument {flag}: is on or off, True or False; got {value!r}")
        return value
    if value is None:
        return None
    if action.type is None:  # a text flag
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, (numbers.Integral, os.PathLike, torch.device)) and not isinstance(value, bool):
            value = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
        if not isinstance(value, str):
            raise CLIError(f"argument {flag}: takes text (or a list), got a {type(value).__name__}")
    elif isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise CLIError(f"argument {flag}: takes a number, got {value!r}")
    elif action.type is int and not isinstance(value, (str, numbers.Integral)):
        raise CLIError(f"argument {flag}: invalid int value: {str(value)!r}")  # (argparse's words for '2.5')
    else:
        value = typed(action, value if isinstance(value, str) else repr(int(value) if action.type is int
                                                                        else float(value)))
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"argument {flag}: invalid choice: {value!r} (choose from "
                       f"{', '.join(repr(c) for c in action.choices)})")
    return value


def typed(action, text):
    """text through the flag's argparse type, or argparse's words for what is wrong."""
    try:
        return action.type(text)
    except argparse.ArgumentTypeError as e:
        raise CLIError(f"argument {action.option_strings[0]}: {e}")
    except ValueError:
        raise CLIError(f"argument {action.option_strings[0]}: invalid {action.type.__name__} value: {text!r}")


def checked_tensors(x, y):
    """Images (data.as_images: uint8 (N, C, H, W), float in [0, 1], or grey (N, H, W)) and integer
    labels (N,) on the CPU, else one CLIError (a ValueError) saying what they are and the conversion."""
    x, y = as_images(torch.as_tensor(x).detach().cpu(), "the images"), torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or tuple(y.shape) != (len(x),) or len(x) == 0:
        raise CLIError(f"y must be integer labels of shape ({len(x)},); got {y.dtype} {tuple(y.shape)}")
    return x, y.detach().cpu().long()
