"""The Python API, for a notebook: evaluate a model object on tensors, load a head file onto a model.

    import hpmkit.api as api
    hpm_model = api.load_head("head.pt", base)             # the fine-tuned head on its base model
    results = api.evaluate(base, x, y, head=hpm_model, eps=8 / 255, version="paper")
    results["hpm"]["batch"]["worst_case"], results["base"]["attacks"]

`evaluate` runs evaluate.py's protocol (evaluate.py's evaluate_model, loaded where the project is
installed: hpmkit/commands.py) and returns what its results file would hold.
"""
from hpmkit.checkpoint import load_head_file
from hpmkit.commands import load


def evaluate(model, x, y, head=None, **flags):
    """The base model `model` (images in [0, 1] -> logits) and, if given, its head (the model
    hpm.attach(model) made, trained; a DPNP model; or a head checkpoint's path), evaluated as
    evaluate.py does on images x (N, C, H, W; float in [0, 1] or uint8) with labels y (N,): the
    results as a dict (the results file's layout, accuracies as fractions: 0.672 where the
    printed tables say 67.2%). flags: evaluate.py's
    flags by name (eps, version, batch_size, attacks, steps, queries, contexts, attackers, checks,
    seed, device, chunk, out, ...); every image of x is evaluated unless n_examples says less, and
    nothing is written unless out names a file. The models are frozen in place, as hpm.attach does."""
    return load("evaluate.py").evaluate_model(model, x, y, head, **flags)


def load_head(path, base_model):
    """The head checkpoint at `path` (written by finetune.py) on base_model: the HPM model (or the
    DPNP control's), frozen, in eval mode; an error if the head was fine-tuned on another model."""
    return load_head_file(path, base_model)
