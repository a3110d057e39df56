"""The fine-tuning study's controls (finetune.py --head), two other heads on the same frozen
backbone, trained by finetune.py's loop and written to the same head checkpoint:

- "ncm": HPM's l2 head on C_global alone (the mixer [I; 0]), C_global the class means of
  finetune.py's clean pass; nothing trained.
- "dpnp": Adv-DPNP's unified prototypes ("Adversarially Robust Learning with Deep
  Positive-Negative Prototypes", arXiv 2504.03782, section 3) trained head-only on its Eq. 7 with
  Algorithm 1's dual branch, on PGD examples that maximise the head's cross-entropy (our choice
  of attack). With the backbone frozen only the prototypes learn, and the adversarial branch
  reaches them through the DFA term alone.

Features z = f(x) (B, D); M classes; each class j has one learnable vector c_j, both its
prototype and its classifier weight, kept on the sphere of radius alpha:

    p_j(x)  = softmax_j(c_j . z / alpha)                                     Eq. 1
    L_DPP   = CE(p(x), y) + lambda_DPP / 2 * ||z - c_y||^2                    Eq. 3
    c_j^neg = c_k with k = argmin_{k != j} ||c_k - c_j||                      Eq. 4
    L_DNP   = -1/M * sum_j ||c_j - c_j^neg||_{1/2}^{1/2}                       Eq. 5
    L_DFA   = KL(p(x) || p(x_adv))                                            Eq. 6
    L       = lambda_DNP L_DNP + 1/(2N) sum_i [DPP(x_i) + DPP(x_adv_i) + lambda_DFA DFA_i]   Eq. 7

with ||v||_{1/2}^{1/2} = sum_d |v_d|^{1/2}; the prototypes go back on the sphere at the start of
every epoch (Algorithm 1, line 4).

The dual branch. The paper's text (3.2) says the prototypes learn from clean data only; its
Algorithm 1 (line 21) updates them with lambda_DNP L_DNP, the clean DPP terms and the DFA term,
which depends on the adversarial outputs, and never with the adversarial DPP term. We follow
Algorithm 1: in `adv_dpnp_loss` the adversarial DPP term sees the prototypes detached.

Ours, not the paper's: the head starts from the base model's FC weights, scaled onto the sphere
(a head-only start; the paper trains everything from scratch), and has no bias (Eq. 1 has none).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpm
from hpmkit.pgd import ascend


# (lambda_DPP, lambda_DNP, lambda_DFA): the paper's (section 4.1; alpha 40) for CIFAR-10 (and SVHN) and CIFAR-100;
# MNIST and own data take CIFAR-10's, ImageNet CIFAR-100's (our choice).
CIFAR10, CIFAR100 = (0.1, 0.1, 2.0), (0.3, 3.0, 2.4)
DPNP_LAMBDAS = {"cifar10": CIFAR10, "mnist": CIFAR10, "own": CIFAR10, "cifar100": CIFAR100, "imagenet": CIFAR100}


class DPNPHead(nn.Module):
    """Unified prototypes C (M, D) on the sphere of radius alpha; logits c_j . z / alpha (Eq. 1)."""

    def __init__(self, fc, alpha=40.0):
        super().__init__()
        self.alpha = alpha
        with torch.no_grad():  # start: the base classifier's directions, on the sphere
            C = alpha * F.normalize(fc.weight.detach().clone(), dim=1)
        self.prototypes = nn.Parameter(C)  # (M, D)

    def forward(self, z):
        return z @ self.prototypes.t() / self.alpha  # Eq. 1 before the softmax, (B, M)

    @torch.no_grad()
    def renormalize(self):
        """Algorithm 1, line 4: every prototype back on the sphere of radius alpha."""
        self.prototypes.mul_(self.alpha / self.prototypes.norm(dim=1, keepdim=True))


def dpp_loss(logits, z, prototypes, y, lambda_dpp):
    """Eq. 3 averaged over the batch: CE plus lambda_DPP / 2 * ||z - c_y||^2."""
    return F.cross_entropy(logits, y) + lambda_dpp / 2 * (z - prototypes[y]).pow(2).sum(1).mean()


def dnp_loss(prototypes):
    """Eq. 4-5: minus the mean l_{1/2} 'norm' (sum of |.|^{1/2}) to each nearest rival prototype."""
    M = prototypes.shape[0]
    with torch.no_grad():  # Eq. 4 picks the rival; the loss then differentiates the distance
        dist = torch.cdist(prototypes, prototypes) + torch.diag(torch.full((M,), float("inf"),
                                                                             device=prototypes.device))
        rival = dist.argmin(dim=1)  # (M,)
    diff = (prototypes - prototypes[rival]).abs()  # (M, D)
    return -hpm.safe_sqrt(diff).sum(1).mean()


def dfa_loss(logits_clean, logits_adv):
    """Eq. 6 averaged over the batch: KL(p(x) || p(x_adv)), as TRADES."""
    return F.kl_div(logits_adv.log_softmax(1), logits_clean.log_softmax(1), log_target=True,
                    reduction="batchmean")


def adv_dpnp_loss(head, z, z_adv, y, lambda_dpp=0.1, lambda_dnp=0.1, lambda_dfa=2.0):
    """Eq. 7 with Algorithm 1's dual branch: the adversarial DPP term does not move the prototypes."""
    C = head.prototypes
    logits, logits_adv = head(z), head(z_adv)
    clean_dpp = dpp_loss(logits, z, C, y, lambda_dpp)
    adv_dpp = dpp_loss(z_adv @ C.detach().t() / head.alpha, z_adv, C.detach(), y, lambda_dpp)
    return lambda_dnp * dnp_loss(C) + (clean_dpp + adv_dpp + lambda_dfa * dfa_loss(logits, logits_adv)) / 2


class DPNPClassifier(hpm.FrozenBackbone):
    """A frozen base model with a DPNP head on the features that enter its final nn.Linear (the
    frozen-backbone machinery is HPM's: eval mode kept, features from one forward hook)."""

    def __init__(self, base_model, alpha=40.0):
        super().__init__(base_model)
        self.head = DPNPHead(self.base_model.get_submodule(self.fc_name), alpha=alpha)

    def forward(self, x):
        return self.head(self.features(x))


attach_dpnp = DPNPClassifier  # (hpm.attach's counterpart)


# The controls in finetune.py's loop --------------------------------------------------------------

def dpnp_lambdas(dataset, lambda_dfa=None):
    """The dataset's (lambda_DPP, lambda_DNP, lambda_DFA), with --lambda-dfa if given."""
    lambdas = DPNP_LAMBDAS[dataset]
    return lambdas if lambda_dfa is None else lambdas[:2] + (lambda_dfa,)


def start(x, cfg, parameters):
    """Before the first epoch of the DPNP control: the optimizer of its prototypes (parameters, from
    finetune.py's head_parameters, which froze all else)."""
    lambdas = ", ".join(f"{n} {v:g}" for n, v in zip(("DPP", "DNP", "DFA"), cfg.dpnp_lambdas))
    print(f"DPNP head on {cfg.model}: {len(x)} {cfg.dataset} training images, {cfg.epochs} "
          f"epoch(s) of batch {cfg.batch_size}, Adam lr {cfg.lr:g}, alpha {cfg.dpnp_alpha:g}, "
          f"lambda {lambdas}; PGD on CE, {cfg.steps} steps of {cfg.step_size:.4g}")
    return torch.optim.Adam(parameters, lr=cfg.lr)


def train_step_dpnp(model, optimizer, x, y, S, cfg):
    """finetune.train_step for the DPNP head (S unused): PGD on its cross-entropy, then one step on
    Eq. 7 with Algorithm 1's dual branch (adv_dpnp_loss)."""
    head = model.head
    x_adv = ascend(x, lambda x_adv: F.cross_entropy(model(x_adv), y), cfg.eps, cfg.threat_model, cfg.steps,
                   cfg.step_size)
    with torch.no_grad():
        z, z_adv = model.features(x), model.features(x_adv)  # (B, D) each
    loss = adv_dpnp_loss(head, z, z_adv, y, *cfg.dpnp_lambdas)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        clean, adv = (head(z).argmax(1) == y).sum().item(), (head(z_adv).argmax(1) == y).sum().item()
    return loss.item(), clean, adv
