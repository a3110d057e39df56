"""The head checkpoint, its one reader and its one writer, and where a fine-tuning writes it.

A checkpoint holds the head's state_dict and what evaluate.py needs to rebuild and evaluate it,
as named fields (readable with torch.load(..., weights_only=True): no code runs). `read_head` is
the only function that opens one. `HeadWriter` is the fine-tuning's file policy: an unfinished
head never replaces a finished one at --out; it goes beside it until the run finishes.
"""
import os
import re
from dataclasses import dataclass

import torch

from hpm import attach, find_classifier
from hpmkit import dpnp
from hpmkit.cli import CLIError, first_line
from hpmkit.files import atomic_save
from hpmkit.models import fingerprint, load_model

HEAD_FIELDS = {"head", "model", "dataset", "threat_model", "batch_size", "attack_eps", "finished"}
HEAD_ARGS = {"hpm": ("momentum", "eps"), "ncm": ("momentum", "eps"), "dpnp": ("alpha",)}  # to rebuild


@dataclass
class HeadRecord:
    """What a checkpoint says of its head besides the tensors. head_type: "hpm", or a control of
    the study, "ncm" (an HPM head on C_global alone) or "dpnp"; base_fingerprint: fingerprint()
    of the frozen base model, checked when the head is loaded; args: every setting of the run."""
    head_type: str
    model: str
    dataset: str
    threat_model: str
    batch_size: int
    attack_eps: float
    args: dict
    base_fingerprint: str = None


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
        "base_fingerprint": record.base_fingerprint,
    }, path)


def load_checkpoint(path):
    """torch.load with weights_only=True (no code runs): the one place a head file is opened."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_head(path):
    """A head checkpoint written by finetune.py, checked, or one line saying why it is not one."""
    if not os.path.exists(path):
        raise CLIError(f"head checkpoint {path} does not exist")
    try:
        ckpt = load_checkpoint(path)
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


def is_head_file(path, finished=False):
    """True if PATH holds a head checkpoint (finished=True: one whose fine-tuning finished)."""
    try:
        ckpt = load_checkpoint(path)
    except Exception:
        return False
    if not isinstance(ckpt, dict):
        return False
    return ckpt.get("finished") is True if finished else "head" in ckpt and "model" in ckpt


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


class HeadWriter:
    """Where and how a fine-tuning writes its head (model) with its record. An unfinished head
    never replaces a finished one at --out (unless overwrite): until the run finishes its
    checkpoints go beside it, to OUT.unfinished.pt, which the finished head then replaces."""

    def __init__(self, out, model, record, overwrite=False):
        self.out, self.model, self.record, self.unfinished = out, model, record, None
        if os.path.exists(out) and not overwrite and is_head_file(out, finished=True):
            stem, ext = os.path.splitext(out)
            self.unfinished = f"{stem}.unfinished{ext or '.pt'}"

    def save(self, history, finished):
        """The head, atomically, where its state belongs; returns that path."""
        path = self.out if finished or self.unfinished is None else self.unfinished
        save_head(path, self.model, self.record, history, finished)
        if finished:
            self.discard()
        return path

    def discard(self):
        """This run's unfinished head, if any: gone (a finished head stays at --out)."""
        if self.unfinished is not None and os.path.exists(self.unfinished):
            os.remove(self.unfinished)
