"""Projected gradient steps, the one implementation for training, attacks and experiments:
the eps-ball (L-inf or L2) around the clean images, the image box [0, 1], what counts as
inside the ball (one tolerance for every check), and the margin the attacks push below 0."""
import math

import torch


def _rows(t, like):
    """A per-image (B,) tensor shaped to broadcast against images `like` (B, C, H, W)."""
    return t.view(-1, *[1] * (like.dim() - 1))


def project(x_adv, x0, eps, norm):
    """Back into the eps-ball around x0 (norm "Linf" or "L2") and into the image box [0, 1]."""
    delta = x_adv - x0
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        size = _rows(delta.flatten(1).norm(dim=1), x0)  # (B, 1, 1, 1)
        delta = delta * (eps / size.clamp_min(1e-12)).clamp(max=1)
    return (x0 + delta).clamp(0, 1)


def ascent_step(x_adv, grad, x0, eps, norm, size, moving=None):
    """One ascent step of length `size` up `grad` (signed for L-inf, the normalised gradient for
    L2) on the images `moving` (B,) bool (None: all), projected back (`project`)."""
    grad = torch.nan_to_num(grad)
    if norm == "Linf":
        direction = grad.sign()
    else:
        direction = grad / _rows(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)
    step = size * direction
    if moving is not None:
        step = step * _rows(moving, grad)
    return project(x_adv + step, x0, eps, norm)


def ascend(x, loss_fn, eps, norm, steps, size):
    """`steps` ascent steps of `size` up loss_fn(x_adv) from x + 0.001 * N(0, 1) (IKL's start),
    inside the eps-ball around x and [0, 1]: PGD as the training attacks run it."""
    x_adv = project(x + 0.001 * torch.randn_like(x), x, eps, norm)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(x_adv), x_adv)  # the input's gradient only: no parameter .grad moves
        x_adv = ascent_step(x_adv.detach(), grad, x, eps, norm, size)
    return x_adv.detach()


def inside(x, x0, eps, norm):
    """(B,) bool: image i of x lies in the eps-ball around x0[i] and in [0, 1], finite. The one
    tolerance, for rounding: a relative 1e-5 of eps and 1e-7 absolute."""
    delta = (x - x0).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(dim=1)
    flat = x.flatten(1)
    return ((size <= eps * (1 + 1e-5) + 1e-7) & (flat.amin(1) >= 0) & (flat.amax(1) <= 1)
            & torch.isfinite(flat).all(1))


def margins(logits, y):
    """logit of the true class minus the largest other (B,); below 0: misclassified."""
    other = logits.scatter(1, y[:, None], -math.inf).amax(dim=1)
    margin = logits.gather(1, y[:, None]).squeeze(1) - other
    return torch.where(torch.isfinite(logits).all(dim=1), margin, torch.full_like(margin, -math.inf))


def cw_loss(logits, y):
    """The margin loss of Carlini and Wagner, max_{j != y} z_j - z_y, per image (B,): the DLR loss
    without its scale normaliser (the l2 logits of HPM have another scale than FC logits)."""
    return -margins(logits, y)
