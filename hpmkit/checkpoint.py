"""The head checkpoint, its one reader and its one writer, and where a fine-tuning writes it.

A checkpoint holds the head's state_dict and what evaluate.py needs to rebuild and evaluate it,
as named fields (readable with torch.load(..., weights_only=True): no code runs). `read_head` is
the only function that opens one. `HeadWriter` is the fine-tuning's file policy: an unfinished
head never replaces a finished one at --out; it goes beside it until the run finishes.
"""
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hpm import FrozenBackbone, attach, find_classifier
from hpmkit import controls
from hpmkit.cli import CLIError, first_line, is_number
from hpmkit.data import DATASETS, OWN, check_labels, to_float
from hpmkit.files import atomic_save, check_out, kind_of, remove_stale_tmp
from hpmkit.models import fingerprint, load_model

HEAD_FIELDS = {"head", "model", "dataset", "threat_model", "batch_size", "attack_eps", "finished"}
HEAD_ARGS = {"hpm": ("momentum", "eps"), "ncm": ("momentum", "eps"), "dpnp": ("alpha",)}  # to rebuild


@dataclass
class HeadRecord:
    """What a checkpoint says of its head besides the tensors. head_type: "hpm", "ncm" or "dpnp"
    (HEAD_ARGS); model: the base model as given (a RobustBench name, a file's absolute path, or a
    code spec /abs/FILE.py:NAME); args: every setting of the run; weights: the absolute path of a
    code spec's --weights; base_probe: probe(), since the base model's code decides its outputs as
    well as its weights."""
    head_type: str
    model: str
    dataset: str
    threat_model: str
    batch_size: int
    attack_eps: float
    args: dict
    base_fingerprint: str = None
    weights: str = None
    base_probe: dict = None


def save_head(path, model, record, history, finished):
    """The head's state_dict with its record and history, atomically."""
    base_fc = model.base_model.get_submodule(model.fc_name)
    atomic_save({
        "head": {k: v.cpu() for k, v in model.head.state_dict().items()}, "head_type": record.head_type,
        **{k: getattr(model.head, k) for k in HEAD_ARGS[record.head_type]},
        "model": record.model, "dataset": record.dataset, "threat_model": record.threat_model,
        "batch_size": record.batch_size, "attack_eps": record.attack_eps, "finished": finished,
        "num_classes": base_fc.out_features, "feature_dim": base_fc.in_features,
        "fc_name": model.fc_name, "args": record.args, "history": history,
        "base_fingerprint": record.base_fingerprint, "weights": record.weights, "base_probe": record.base_probe,
    }, path)


def load_checkpoint(path):
    """torch.load with weights_only=True (no code runs): the one place a head file is opened."""
    with warnings.catch_warnings():  # torch warns of a pickle protocol it did not write
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def read_head(path):
    """A head checkpoint written by finetune.py, checked, or one line saying why it is not one."""
    if not os.path.exists(path):
        raise CLIError(f"head checkpoint {path} does not exist")
    if not os.path.isfile(path):
        raise CLIError(f"--head {path} is {kind_of(os.stat(path).st_mode)}, not a head checkpoint")
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a pickled object (a model, say) that a head checkpoint never holds
            raise CLIError(f"{path} is not a head checkpoint: it holds pickled code objects "
                           f"({found.group(1)}); if it is a model file, pass it as --model")
        if "Weights only load failed" in str(e):  # (torch's advice to unpickle it anyway is not ours)
            raise CLIError(f"{path} is not a head checkpoint: a pickle that does not read as data alone; "
                           "a head is written by finetune.py")
        raise CLIError(f"{path} is not a readable head checkpoint ({first_line(e)}); it may be "
                       "truncated: write it again with finetune.py")
    if not isinstance(ckpt, dict):
        raise CLIError(f"{path} holds a {type(ckpt).__name__}, not a finetune.py head checkpoint")
    legacy = isinstance(ckpt.get("args"), dict)  # heads written before the named fields existed
    if legacy:
        ckpt.setdefault("batch_size", ckpt["args"].get("batch_size"))
        ckpt.setdefault("attack_eps", ckpt["args"].get("eps"))
    ckpt.setdefault("head_type", "hpm")  # heads written before the controls existed
    if not isinstance(ckpt["head_type"], str) or ckpt["head_type"] not in HEAD_ARGS:
        raise CLIError(f"{path}: unknown head type {shown(ckpt['head_type'])}")
    required = HEAD_FIELDS | set(HEAD_ARGS[ckpt["head_type"]])
    missing = required - set(ckpt) - ({"finished"} if legacy else set())
    if missing:
        raise CLIError(f"{path} is not a finetune.py head checkpoint (missing {sorted(missing)})")
    for field, (ok, what) in FIELD_RULES.items():
        if field in ckpt and not ok(ckpt[field]):
            raise CLIError(f"{path}: its {field} is {shown(ckpt[field])}, not {what}; the file was edited or "
                           "damaged: write it again with finetune.py")
    bad = [k for k, v in ckpt["head"].items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
    if bad:
        raise CLIError(f"{path}: the head holds NaN or inf values in {', '.join(bad)} (a diverged "
                       "or corrupted fine-tuning); train it again")
    return ckpt


# What each field of a head checkpoint holds: (test, in words), checked by read_head alone.
# (batch_size and attack_eps may be None in heads written before they were fields; weights is
# absent from heads written before code specs existed.)
FIELD_RULES = {
    "head": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items()),
             "the head's tensors by name"),
    "model": (lambda v: isinstance(v, str) and v != "", "a model name or file (or FILE.py:NAME)"),
    "weights": (lambda v: v is None or isinstance(v, str) and v != "", "the path of a state_dict"),
    "dataset": (lambda v: v in DATASETS or v == OWN, "one of " + ", ".join([*DATASETS, OWN])),
    "threat_model": (lambda v: v in ("Linf", "L2"), "Linf or L2"),
    "batch_size": (lambda v: v is None or isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   "a whole number >= 1"),
    "attack_eps": (lambda v: v is None or is_number(v) and v >= 0, "a number >= 0"),
    "finished": (lambda v: isinstance(v, bool), "true or false"),
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "eps": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "alpha": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(h, dict) for h in v), "a list of epochs"),
    "args": (lambda v: isinstance(v, dict), "a dict of settings"),
    "base_fingerprint": (lambda v: v is None or isinstance(v, str), "a fingerprint"),
    "base_probe": (lambda v: v is None or isinstance(v, dict) and isinstance(v.get("shape"), list) and len(v["shape"])
                   == 3 and all(isinstance(n, int) and 0 < n <= 4096 for n in v["shape"]) and torch.is_tensor(
                       v.get("logits")) and v["logits"].is_floating_point() and v["logits"].dim() == 2,
                   "the base model's logits on the probe images"),
}


def shown(v):
    """A field's value in a message: short, on one line."""
    text = repr(v) if isinstance(v, (str, int, float, bool, type(None))) else f"a {type(v).__name__}"
    return text if len(text) <= 40 else text[:37] + "..."


def is_head_file(path, finished=None):
    """True if PATH holds a head checkpoint (finished=True: one whose fine-tuning finished; False:
    one that did not). Only a regular file is opened."""
    try:
        if not os.path.isfile(path):
            return False
        ckpt = load_checkpoint(path)
    except Exception:
        return False
    if not isinstance(ckpt, dict) or "head" not in ckpt or "model" not in ckpt:
        return False
    return finished is None or ckpt.get("finished") is finished


def load_head_state(ckpt, hpm_model):
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


# The probe: images of the data's shape from a fixed seed, made again wherever a head is loaded.
PROBE_IMAGES, PROBE_SEED = 4, 0
# How far the base model's logits on the probe may move (of their scale, max |logit| + 1) before
# a warning: cuDNN's TF32 convolutions on a GPU move a deep network's by well under 1%; an edit of
# the model's code (an activation, a layer) moves them by its whole scale.
PROBE_TOL = 0.02


def probe(base, shape):
    """The record of the base model's outputs (logits) on the probe, images of shape (C, H, W)."""
    return {"shape": [int(n) for n in shape], "logits": probe_logits(base, shape)}


@torch.no_grad()
def probe_logits(base, shape):
    x = torch.rand((PROBE_IMAGES, *shape), generator=torch.Generator().manual_seed(PROBE_SEED))
    device = next(base.parameters(), torch.empty(0)).device
    return base(x.to(device)).detach().float().cpu()


def check_base(ckpt, base, model_name, weights=None):
    """The head was fine-tuned on this very base model (its fingerprint), else one line. With the
    same weights, the base model's code may have changed since (mynet.py edited): outputs on the
    probe other than those the head recorded get a warning, not a refusal (a deliberate edit is
    the user's to evaluate). Heads from before fingerprints or probes load (with a note)."""
    if ckpt.get("base_fingerprint") is None:
        print("note: the head checkpoint records no fingerprint of its base model (written before "
              "they existed): that it was trained on this model cannot be checked")
    elif fingerprint(base.state_dict()) != ckpt["base_fingerprint"]:
        given = f"{model_name} with weights {weights}" if weights else model_name
        raise CLIError(f"the head was fine-tuned on another base model than {given} (its weights "
                       f"differ; the checkpoint names {ckpt['model']!r}"
                       + (f" with weights {ckpt['weights']!r}" if ckpt.get("weights") else "")
                       + "): a head only fits the model it was trained on")
    if ckpt.get("base_probe") is None:
        return
    old = ckpt["base_probe"]["logits"]
    try:
        now = probe_logits(base, ckpt["base_probe"]["shape"])
        moved = float((now - old).abs().max()) if now.shape == old.shape else math.inf
        change = f"logits moved by up to {moved:.3g}" if now.shape == old.shape else "logits of another shape"
    except Exception as e:  # (a model that no longer takes those images; check_images says more)
        moved, change = math.inf, first_line(e)
    if not moved <= PROBE_TOL * (float(old.abs().max()) + 1):
        print(f"warning: the base model {model_name} no longer gives the outputs the head recorded at "
              f"fine-tuning ({change} on its probe images), though its weights are the same: its code "
              "changed since? The head was trained on the old model's features; fine-tune it again")


class Models(NamedTuple):
    """What evaluate.py attacks, frozen: the base model, its HPM or DPNP model (None: the base model
    alone, which needs no final nn.Linear: count_classes reads num_classes from its logits)."""
    base: torch.nn.Module
    hpm: torch.nn.Module = None
    dpnp: torch.nn.Module = None
    num_classes: int = None
    head_type: str = None


def attach_head(ckpt, base, model_name, weights=None):
    """The checkpoint's head (read_head) on the base model, checked to be the one it was trained on:
    an HPM model (also for "ncm": its mixer passes C_global alone) or a DPNP model."""
    try:
        if ckpt["head_type"] == "dpnp":
            model = load_head_state(ckpt, controls.attach_dpnp(base, alpha=ckpt["alpha"]))
        else:
            model = load_head_state(ckpt, attach(base, momentum=ckpt["momentum"], eps=ckpt["eps"]))
    except ValueError as e:  # attach: no final nn.Linear
        raise CLIError(str(e))
    check_base(ckpt, base, model_name, weights)
    return model


def load_head_file(path, base_model):
    """hpmkit.api.load_head: a head checkpoint of finetune.py on base_model, frozen, in eval mode."""
    model = attach_head(read_head(path), base_model, type(base_model).__name__)
    return model.eval().requires_grad_(False)


def load_models(cfg, ckpt, device):
    """evaluate.py's models, on device; cfg names the base model, ckpt (read_head) the head."""
    base = load_model(cfg.model, cfg.dataset, cfg.threat_model, cfg.model_dir, cfg.weights)
    if ckpt is None:
        return Models(base.to(device).eval().requires_grad_(False))
    head_model = attach_head(ckpt, base, cfg.model, cfg.weights).to(device)
    return with_head(base, head_model, ckpt["head_type"])


def with_head(base, head_model, head_type):
    """Models of a base model and its head's model, both frozen."""
    head_model.eval().requires_grad_(False)
    dpnp_model = head_model if head_type == "dpnp" else None
    return Models(base, None if dpnp_model else head_model, dpnp_model, find_classifier(base)[1].out_features,
                  head_type)


def object_models(base, head=None):
    """The Python API's models: a base model object and its head, given as the model hpm.attach (or
    dpnp.attach) made of it, or as a head checkpoint's path; frozen in place (evaluate_model gives
    them back as they were). A model with its head as the base model is refused: it would run as a
    per-image "base" row."""
    if not isinstance(base, torch.nn.Module):
        raise TypeError(f"the model must be an nn.Module (images in [0, 1] -> logits), got {type(base).__name__}")
    if isinstance(base, FrozenBackbone):
        raise CLIError(f"the model is a {type(base).__name__}, a base model with its head: pass the base model "
                       "and the head apart, evaluate(head_model.base_model, x, y, head=head_model)")
    base.eval().requires_grad_(False)
    if head is None:
        return Models(base)
    if isinstance(head, (str, os.PathLike)):
        ckpt = read_head(str(head))
        return with_head(base, attach_head(ckpt, base, type(base).__name__), ckpt["head_type"])
    if getattr(head, "base_model", None) is not base:
        raise CLIError("the head must be hpm.attach(model) (or controls.attach_dpnp(model)) of this very model, or a "
                         "head checkpoint's path")
    return with_head(base, head, "dpnp" if isinstance(head, controls.DPNPClassifier) else "hpm")


@torch.no_grad()
def count_classes(model, x, y, device, where):
    """The number of classes of a model without a head: the width of its logits on one image (a
    model check_images has passed), the labels y checked against it (where: the data, in words)."""
    num_classes = model(to_float(x[:1], device)).shape[-1]
    check_labels(y, num_classes, where)
    return num_classes


class HeadWriter:
    """Where a fine-tuning writes its head (model) with its record. An unfinished head never
    replaces a finished one at --out (unless overwrite): until the run finishes, its checkpoints go
    beside it, to OUT.unfinished.pt (OUT resolved), which must be free or an unfinished head
    already; the run removes that file only if it wrote it. probe: a batch of training images."""

    def __init__(self, out, model, record, probe, overwrite=False):
        self.out, self.model, self.record, self.probe = out, model, record, probe
        self.unfinished, self.wrote_unfinished = None, False
        if os.path.exists(out) and not overwrite and is_head_file(out, finished=True):
            stem, ext = os.path.splitext(os.path.realpath(out))
            self.unfinished = f"{stem}.unfinished{ext or '.pt'}"
            if os.path.lexists(self.unfinished) and not is_head_file(self.unfinished, finished=False):
                raise CLIError(f"{self.unfinished} exists and is not an unfinished head of finetune.py: while "
                               f"{out} holds a finished head this run writes its checkpoints there until it "
                               "finishes; move that file away or choose another --out")
            check_out(self.unfinished)  # (read-only, a name too long: here, before any training)
            remove_stale_tmp(self.unfinished)

    def save(self, history, finished):
        """The head, checked, atomically, where its state belongs; returns that path."""
        self.check(history)
        path = self.out if finished or self.unfinished is None else self.unfinished
        save_head(path, self.model, self.record, history, finished)
        self.wrote_unfinished |= path == self.unfinished
        if finished:
            self.discard()
        return path

    @torch.no_grad()
    def check(self, history):
        """A diverged run (the epoch's loss, the head's parameters or its logits on the probe not
        finite) stops before it saves that head; a finished head at --out stays, this run's
        unfinished one goes."""
        loss = history[-1]["loss"] if history else 0.0
        bad = [n for n, p in self.model.head.named_parameters() if not torch.isfinite(p).all()]
        logits = self.model(self.probe)
        if math.isfinite(loss) and not bad and torch.isfinite(logits).all():
            return
        self.discard()
        where = f"in epoch {history[-1]['epoch']}: loss {loss:g}" if history else "before training"
        raise CLIError(f"fine-tuning diverged {where}" + (f", NaN/inf in {', '.join(bad)}" if bad else "")
                       + ("" if bad or torch.isfinite(logits).all() else ", NaN/inf logits on a training batch")
                       + f"; its head was not saved (try a smaller --lr than {self.record.args.get('lr', 0):g})")

    def discard(self):
        """This run's unfinished head, if it wrote one: gone (a finished head stays at --out)."""
        if self.wrote_unfinished and os.path.exists(self.unfinished):
            os.remove(self.unfinished)
