"""Hybrid Prototype Mixing (HPM): an l2 re-classifier head for a pretrained classifier.

From "Sensitivity as a Double-Edged Sword: A Trade-off Between Discriminability and
Adversarial Robustness", section 3.6. A frozen backbone phi maps images X to features
Z (B, D); the base model's last nn.Linear is the FC classifier W^c (K classes).

    L        = fc(Z)                                          Eq. 1
    P_ste    = softmax(L) + stopgrad(onehot(argmax L) - softmax(L))   Eq. 15
    C_batch  = P^T Z / (column sums of P + eps)               Eq. 16
    C_global <- lam * C_global + (1 - lam) * C_gt_batch       Eq. 14 (EMA, a buffer)
    C_hybrid = [C_global, C_batch] W_m + b_m                  Eq. 17 (the mixer)
    L_hybrid[i, j] = -|| Z_i - C_hybrid[j] ||_2               Eq. 18

The same head also gives the two surrogates of the Mixed Surrogate Attack (section 3.7):
mode "fc" is Surrogate 1 (the FC oracle, fc(Z)); mode "soft" is Surrogate 2 (softmax
instead of STE in the forward pass). Mode "ste" is the real model.

Choices that are ours, not the paper's:
- EMA updates touch only the classes present in the batch; a class seen for the first
  time is set to its batch mean; updates are a separate no-grad method, so `forward`
  never changes state (an attack may call the model any number of times).
- The mixer starts as the plain average: W_m = [I/2; I/2], b_m = 0.
- Context "image" classifies every row as if it were alone in its batch (a per-image
  model, free of batch composition), computed for the whole batch at once.
- Context "batch" with `group_size=b` treats the rows as G groups, consecutive fixed batches of
  b rows, each with its own C_batch, in one call (to fill a GPU with many fixed batches).
- The l2 distance has gradient 0 (a subgradient) where it is exactly zero.
- A class no image of the batch is assigned to has C_batch[c] = 0 (Eq. 16's empty sum), and it
  enters the mixer as it is: C_hybrid[c] = [C_global[c], 0] W_m + b_m, half of C_global[c] with
  the average start. With more classes than a batch holds most classes are absent, and one image
  assigned to such a class defines its batch prototype.

This file imports torch only: copy it into any project.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


def ste_assignment(L, P_soft=None):
    """Eq. 15: one-hot argmax in the forward pass, softmax gradient in the backward pass
    (P_soft: softmax(L) if already computed)."""
    P_soft = L.softmax(dim=-1) if P_soft is None else P_soft
    P_hard = F.one_hot(L.argmax(dim=-1), L.shape[-1]).to(P_soft.dtype)
    return P_soft + (P_hard - P_soft).detach()


def batch_prototypes(P, Z, eps):
    """Eq. 16: soft/hard class means of Z (..., B, D) under assignment P (..., B, K); absent
    classes -> 0. Leading dimensions are independent batches (groups)."""
    return P.transpose(-1, -2) @ Z / (P.sum(dim=-2)[..., None] + eps)  # (..., K, D)


def safe_sqrt(x):
    """sqrt with gradient 0 at x == 0 (where the true derivative is infinite)."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def l2_logits(Z, C):
    """Eq. 18: logits[i, j] = -||Z_i - C_j||_2 for Z (..., B, D) and C (..., K, D), via one
    matmul instead of a (B, K, D) tensor."""
    d2 = Z.pow(2).sum(-1, keepdim=True) - 2 * Z @ C.transpose(-1, -2) + C.pow(2).sum(-1)[..., None, :]
    return -safe_sqrt(d2.clamp_min(0))  # (..., B, K)


class HPMHead(nn.Module):
    """The HPM head on features Z (B, D): FC classifier, EMA prototypes, mixer, l2 logits."""

    def __init__(self, fc, momentum=0.98, eps=1e-6):
        super().__init__()
        K, D = fc.out_features, fc.in_features
        # A trainable copy: fine-tuning it never touches the (possibly frozen) base model's layer.
        self.fc = copy.deepcopy(fc).requires_grad_(True)
        self.mixer = nn.Linear(2 * D, D)  # Eq. 17 as x @ W_m + b_m, W_m = mixer.weight.T
        self.start_mixer("average")
        self.mixer.to(fc.weight.device, fc.weight.dtype)
        self.momentum, self.eps = momentum, eps
        self.register_buffer("prototypes", torch.zeros(K, D, device=fc.weight.device, dtype=fc.weight.dtype))
        self.register_buffer("seen", torch.zeros(K, dtype=torch.bool, device=fc.weight.device))

    @torch.no_grad()
    def start_mixer(self, how="average"):
        """The mixer's start (ours: the paper is silent): "average" W_m = [I/2; I/2], b_m = 0, so
        C_hybrid = (C_global + C_batch) / 2; "global" [I; 0], C_global alone; "default" PyTorch's
        nn.Linear initialisation."""
        if how == "default":
            self.mixer.reset_parameters()
            return
        w = self.mixer.weight
        eye = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        halves = {"average": (eye / 2, eye / 2), "global": (eye, torch.zeros_like(eye))}[how]
        w.copy_(torch.cat(halves, dim=1))
        self.mixer.bias.zero_()

    def forward(self, z, mode="ste", context="batch", group_size=None):
        """Logits (B, K) of features z (B, D). mode: "ste", "soft" or "fc", or a tuple of them for
        their logits stacked (M, B, K), from one pass that shares the kernels of the modes.
        group_size: in context "batch", the rows are groups, consecutive fixed batches of this
        size, each with its own C_batch (default: one batch)."""
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
        if not set(modes) <= {"ste", "soft", "fc"}:
            raise ValueError(f"mode must be 'ste', 'soft' or 'fc', got {mode!r}")
        if context not in ("batch", "image"):
            raise ValueError(f"context must be 'batch' or 'image', got {context!r}")
        L = self.fc(z)  # Eq. 1, (B, K)
        logits = {"fc": L}
        hybrid = [m for m in modes if m != "fc"]
        if hybrid:
            P_soft = L.softmax(dim=-1)
            P = torch.stack([P_soft if m == "soft" else ste_assignment(L, P_soft)
                             for m in hybrid])  # (M, B, K)
            H = self._batch_logits(z, P, group_size) if context == "batch" else self._image_logits(z, P)
            logits.update(zip(hybrid, H))
        return logits[mode] if isinstance(mode, str) else torch.stack([logits[m] for m in modes])

    def hybrid_prototypes(self, z, P, group_size=None):
        """Eq. 16-17: C_hybrid (..., G, K, D) of features z (B, D) under assignments P (..., B, K),
        the rows taken as G groups, consecutive fixed batches of group_size rows (default: one)."""
        B, K = P.shape[-2:]
        b = group_size or B
        if b < 1 or B % b:
            raise ValueError(f"group_size {group_size} does not divide the {B} rows")
        z, P = z.view(-1, b, z.shape[1]), P.view(*P.shape[:-2], -1, b, K)  # (G, b, D), (..., G, b, K)
        C_batch = batch_prototypes(P, z, self.eps)  # Eq. 16
        C_global = self.prototypes.expand_as(C_batch)
        return self.mixer(torch.cat([C_global, C_batch], dim=-1))  # Eq. 17

    def _batch_logits(self, z, P, group_size):
        # P (M, B, K): each of the G fixed batches, z (G, b, D), against its C_hybrid (M, G, K, D)
        C_hybrid = self.hybrid_prototypes(z, P, group_size)
        return l2_logits(z.view(C_hybrid.shape[-3], -1, z.shape[1]), C_hybrid).view(P.shape)

    def _image_logits(self, z, P):
        # P (M, B, K): one assignment per mode. Alone in its batch, row i has C_batch[j] = a_ij z_i
        # with a_ij = P_ij / (P_ij + eps) (Eq. 16 with B = 1), so its hybrid prototypes are
        # C_hybrid_i[j] = C_g[j] + a_ij * u_i with C_g = C_global W_g + b_m and u_i = z_i W_b (the
        # mixer split into its two halves).
        # ||z_i - C_g[j] - a_ij u_i||^2 expands into (B, K) matmuls: no (B, K, D) tensor, no loop.
        D = z.shape[1]
        W_g, W_b = self.mixer.weight[:, :D], self.mixer.weight[:, D:]
        C_g = F.linear(self.prototypes, W_g, self.mixer.bias)  # (K, D)
        u = F.linear(z, W_b)  # (B, D)
        a = P / (P + self.eps)  # (M, B, K)
        d2_zC = z.pow(2).sum(1, keepdim=True) - 2 * z @ C_g.t() + C_g.pow(2).sum(1)  # ||z_i - C_g[j]||^2
        zu = (z * u).sum(1, keepdim=True)  # (B, 1)
        uC = u @ C_g.t()  # (B, K)
        uu = u.pow(2).sum(1, keepdim=True)  # (B, 1)
        d2 = d2_zC - 2 * a * (zu - uC) + a.pow(2) * uu
        return -safe_sqrt(d2.clamp_min(0))  # (M, B, K)

    @torch.no_grad()
    def update_prototypes(self, z, y):
        """Eq. 14 on clean features z (B, D) with labels y (B,): only classes present move."""
        onehot = F.one_hot(y, self.prototypes.shape[0]).to(z.dtype)  # (B, K)
        count = onehot.sum(dim=0)  # (K,)
        present = count > 0
        C_gt_batch = onehot.t() @ z / count.clamp_min(1)[:, None]  # (K, D)
        lam = self.momentum * self.seen.to(z.dtype)[:, None]  # 0 on first sight: copy the batch mean
        updated = lam * self.prototypes + (1 - lam) * C_gt_batch
        self.prototypes.copy_(torch.where(present[:, None], updated, self.prototypes))
        self.seen |= present


def find_classifier(model):
    """The base model's final nn.Linear: (its dotted name, the layer). Last registered wins."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("attach: the model has no nn.Linear; HPM needs logits from a final linear layer")
    return linears[-1]


class FrozenBackbone(nn.Module):
    """A frozen base model and the features that enter its final nn.Linear (a head goes on top)."""

    def __init__(self, base_model):
        super().__init__()
        self.base_model = base_model.eval().requires_grad_(False)  # head-only: the backbone is frozen
        self.fc_name = find_classifier(base_model)[0]
        self._checked = False

    def train(self, mode=True):
        # The backbone stays in eval mode: BatchNorm statistics and dropout must not change.
        super().train(mode)
        self.base_model.eval()
        return self

    def features(self, x):
        """Z (B, D): the input of the base model's final nn.Linear, from one base-model pass."""
        captured = {}

        def hook(module, inputs, output):
            captured["z"], captured["L"] = inputs[0], output

        handle = self.base_model.get_submodule(self.fc_name).register_forward_hook(hook)
        try:
            logits = self.base_model(x)
        finally:
            handle.remove()
        if not torch.is_tensor(logits):
            raise ValueError(f"attach: the model returns a {type(logits).__name__}, not a logits tensor; "
                             "wrap it in a module whose forward returns the logits alone")
        if "z" not in captured or captured["z"].dim() != 2:
            raise ValueError(
                f"attach: layer {self.fc_name!r} was not called once on (B, D) features; "
                "HPM needs a model whose logits come from a final nn.Linear")
        if not self._checked:  # once: the chosen layer must produce the logits themselves
            if not (captured["L"] is logits or torch.equal(captured["L"], logits)):
                raise ValueError(
                    f"attach: the output of {self.fc_name!r} (the last registered nn.Linear) is not "
                    "the model's output; HPM needs a model whose logits come from that layer")
            self._checked = True
        return captured["z"]


class HPMClassifier(FrozenBackbone):
    """A frozen base model with the HPM head on the features that enter its final nn.Linear."""

    def __init__(self, base_model, momentum=0.98, eps=1e-6):
        super().__init__(base_model)
        self.head = HPMHead(self.base_model.get_submodule(self.fc_name), momentum=momentum, eps=eps)

    def forward(self, x, mode="ste", context="batch"):
        return self.head(self.features(x), mode=mode, context=context)


def attach(base_model, momentum=0.98, eps=1e-6):
    """Plug an HPM head onto any classifier whose logits come from a final nn.Linear.

    The base model is frozen in place (requires_grad False, eval mode); its tensors are never
    changed. The head holds its own trainable copy of the FC layer, so mode "fc" returns
    exactly the base logits until the head is fine-tuned.
    """
    return HPMClassifier(base_model, momentum=momentum, eps=eps)
