"""The fine-tuning study's controls (finetune.py --head): two other heads on the same frozen
backbone, trained by finetune.py's loop, written to the same head checkpoint.

- "ncm": HPM's l2 head on C_global alone (the mixer [I; 0]), C_global the class means of
  finetune.py's clean pass; nothing trained.
- "dpnp": Adv-DPNP's unified prototypes (dpnp.py) trained head-only on its Eq. 7 with
  Algorithm 1's dual branch, on PGD examples that maximise the head's cross-entropy (our choice
  of attack). With the backbone frozen only the prototypes learn, and the adversarial branch
  reaches them through the DFA term alone.
"""
import torch
import torch.nn.functional as F

from hpm import attach
from hpmkit import dpnp
from hpmkit.pgd import ascend

# --head dpnp: (lambda_DPP, lambda_DNP, lambda_DFA), the Adv-DPNP paper's for CIFAR (MNIST and own
# data take CIFAR-10's, ImageNet CIFAR-100's: our choice).
DPNP_LAMBDAS = {"cifar10": dpnp.DEFAULTS["cifar10"], "mnist": dpnp.DEFAULTS["cifar10"],
                "cifar100": dpnp.DEFAULTS["cifar100"], "imagenet": dpnp.DEFAULTS["cifar100"],
                "own": dpnp.DEFAULTS["cifar10"]}
TRAINED = {"dpnp": ("prototypes",), "ncm": ()}  # what each control's head trains


def dpnp_lambdas(dataset, lambda_dfa=None):
    """The dataset's (lambda_DPP, lambda_DNP, lambda_DFA), with --lambda-dfa if given."""
    lambdas = DPNP_LAMBDAS[dataset]
    return lambdas if lambda_dfa is None else lambdas[:2] + (lambda_dfa,)


def build(head, base_model, cfg):
    """The frozen base model with the control's head."""
    if head == "dpnp":
        return dpnp.attach(base_model, alpha=cfg.dpnp_alpha)
    model = attach(base_model, momentum=cfg.momentum)
    model.head.start_mixer("global")  # C_hybrid = C_global: the nearest class mean
    return model


def start(head, x, cfg, parameters):
    """Before the first epoch of the DPNP control: the optimizer of its prototypes (parameters: the
    head's trained parts, TRAINED[head], from finetune.py's head_parameters, which froze all else)."""
    lambdas = ", ".join(f"{n} {v:g}" for n, v in zip(("DPP", "DNP", "DFA"), cfg.dpnp_lambdas))
    print(f"DPNP head on {cfg.model}: {len(x)} {cfg.dataset} training images, {cfg.epochs} "
          f"epoch(s) of batch {cfg.batch_size}, Adam lr {cfg.lr:g}, alpha {cfg.dpnp_alpha:g}, "
          f"lambda {lambdas}; PGD on CE, {cfg.steps} steps of {cfg.step_size:.4g}")
    return torch.optim.Adam(parameters, lr=cfg.lr)


def before_epoch(head, model):
    """Algorithm 1, line 4 (DPNP): the prototypes back on their sphere at every epoch's start."""
    if head == "dpnp":
        model.head.renormalize()


def step(head):
    """The control's training step, as finetune.train_step's signature (None: NCM trains nothing)."""
    return {"dpnp": train_step_dpnp}.get(head)


def train_step_dpnp(model, optimizer, x, y, S, cfg):
    """One batch: PGD on the DPNP head's cross-entropy, then one step on Eq. 7 with Algorithm 1's
    dual branch (dpnp.adv_dpnp_loss). S is unused. Returns the loss and the numbers of clean and
    adversarial images the head classifies correctly."""
    head = model.head
    x_adv = ascend(x, lambda x_adv: F.cross_entropy(model(x_adv), y), cfg.eps, cfg.threat_model, cfg.steps,
                   cfg.step_size)
    with torch.no_grad():
        z, z_adv = model.features(x), model.features(x_adv)  # (B, D) each
    loss = dpnp.adv_dpnp_loss(head, z, z_adv, y, *cfg.dpnp_lambdas)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        clean, adv = (head(z).argmax(1) == y).sum().item(), (head(z_adv).argmax(1) == y).sum().item()
    return loss.item(), clean, adv
