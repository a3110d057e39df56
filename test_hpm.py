"""Tests of hpm.py, the head, equation by equation (Eq. 14-18) against loops in double precision, and
attach() on model-zoo architectures.

This file travels with hpm.py: it imports hpm, torch, pytest and the standard library only (the
model-zoo tests skip where robustbench and timm are not installed). The tests of the harness
(finetune.py, evaluate.py, hpmkit/, experiments/) are in tests/. Run: `pytest -q test_hpm.py tests`.
"""
import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hpm
from hpm import attach


ROOT = Path(__file__).resolve().parent
TOL = dict(rtol=1e-10, atol=1e-10)  # double precision comparisons


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and fair to other processes on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The head, equation by equation, against loops in double precision.


def make_head(K=4, D=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    head = hpm.HPMHead(nn.Linear(D, K)).to(dtype)
    with torch.no_grad():  # a mixer and prototypes away from their trivial initial values
        head.mixer.weight.add_(0.1 * torch.randn_like(head.mixer.weight))
        head.mixer.bias.copy_(0.1 * torch.randn_like(head.mixer.bias))
        head.prototypes.copy_(torch.randn(K, D, dtype=dtype))
        head.seen.fill_(True)
    return head


def reference_logits(head, z, mode):
    """Eq. 15-18 written out with explicit loops over classes and images, in double precision."""
    W, b = head.fc.weight.double(), head.fc.bias.double()
    z = z.double()
    L = z @ W.t() + b
    B, K = L.shape
    P_soft = torch.softmax(L, 1)
    if mode == "soft":
        P = P_soft
    else:  # forward value of the STE is the one-hot argmax
        P = torch.zeros_like(L)
        P[torch.arange(B), L.argmax(1)] = 1.0
        P = P_soft + (P - P_soft).detach()
    C_batch = torch.stack([sum(P[i, j] * z[i] for i in range(B)) / (sum(P[i, j] for i in range(B)) + head.eps)
                           for j in range(K)])
    Wm, bm = head.mixer.weight.double(), head.mixer.bias.double()
    C_hybrid = torch.cat([head.prototypes.double(), C_batch], 1) @ Wm.t() + bm
    return -torch.stack([torch.stack([(z[i] - C_hybrid[j]).pow(2).sum().sqrt() for j in range(K)])
                         for i in range(B)])


# --- Eq. 15: the straight-through assignment --------------------------------------------------

def test_ste_forward_is_one_hot_argmax():
    torch.manual_seed(0)
    L = torch.randn(7, 5, dtype=torch.float64)
    P = hpm.ste_assignment(L)
    expected = torch.zeros_like(L)
    expected[torch.arange(7), L.argmax(1)] = 1
    torch.testing.assert_close(P, expected, rtol=0, atol=1e-15)


def test_ste_gradient_is_softmax_gradient():
    torch.manual_seed(0)
    L = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(7, 5, dtype=torch.float64)
    (g_ste,) = torch.autograd.grad((hpm.ste_assignment(L) * v).sum(), L)
    (g_soft,) = torch.autograd.grad((torch.softmax(L, 1) * v).sum(), L)
    torch.testing.assert_close(g_ste, g_soft, **TOL)
    assert g_ste.abs().max() > 1e-3  # the gradient is there, not zero


# --- Eq. 16: batch prototypes -------------------------------------------------------------------

def test_batch_prototypes_match_per_class_loop():
    torch.manual_seed(0)
    B, K, D, eps = 9, 4, 3, 1e-6
    Z = torch.randn(B, D, dtype=torch.float64)
    P = torch.softmax(torch.randn(B, K, dtype=torch.float64), 1)
    expected = torch.zeros(K, D, dtype=torch.float64)
    for j in range(K):
        num, den = torch.zeros(D, dtype=torch.float64), 0.0
        for i in range(B):
            num += P[i, j] * Z[i]
            den += P[i, j]
        expected[j] = num / (den + eps)
    torch.testing.assert_close(hpm.batch_prototypes(P, Z, eps), expected, **TOL)


def test_batch_prototypes_of_absent_class_are_zero():
    torch.manual_seed(0)
    Z = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 2, 2, 2, 0])  # class 1 and 3 never assigned
    P = F.one_hot(y, 4).double()
    C = hpm.batch_prototypes(P, Z, 1e-6)
    assert torch.equal(C[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(C[3], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(C[2], Z[2:5].mean(0) * 3 / (3 + 1e-6), **TOL)


# --- Eq. 14: EMA dataset prototypes ------------------------------------------------------------

def test_ema_first_sight_copies_batch_mean():
    head = hpm.HPMHead(nn.Linear(3, 4)).double()
    z = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([1, 1, 3, 1, 3])
    head.update_prototypes(z, y)
    torch.testing.assert_close(head.prototypes[1], z[[0, 1, 3]].mean(0), **TOL)
    torch.testing.assert_close(head.prototypes[3], z[[2, 4]].mean(0), **TOL)
    assert head.seen.tolist() == [False, True, False, True]


def test_ema_moves_present_classes_by_momentum_rule():
    head = make_head(K=4, D=3)
    head.momentum = 0.9
    before = head.prototypes.clone()
    z = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 2, 0, 0, 2])
    head.update_prototypes(z, y)
    for j in (0, 2):
        expected = 0.9 * before[j] + 0.1 * z[y == j].mean(0)
        torch.testing.assert_close(head.prototypes[j], expected, **TOL)


def test_ema_leaves_absent_classes():
    head = make_head(K=4, D=3)
    before = head.prototypes.clone()
    head.update_prototypes(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 0, 2, 2]))
    assert torch.equal(head.prototypes[1], before[1])
    assert torch.equal(head.prototypes[3], before[3])
    assert not torch.equal(head.prototypes[0], before[0])


def test_ema_update_carries_no_gradient():
    head = make_head()
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    head.update_prototypes(z, torch.tensor([0, 1, 2, 3]))
    assert not head.prototypes.requires_grad and head.prototypes.grad_fn is None


@pytest.mark.parametrize("training", [True, False])
def test_forward_never_moves_prototypes(training):
    head = make_head()
    head.train(training)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for mode in ("ste", "soft", "fc"):
        for context in ("batch", "image"):
            head(z, mode=mode, context=context).sum().backward()
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]), k


# --- Eq. 17: the mixer ------------------------------------------------------------------------

def test_a_class_no_image_is_assigned_to_enters_the_mixer_with_a_zero_batch_prototype():
    """C_batch[c] = 0 for a class absent from the batch (Eq. 16's empty sum), and the mixer takes it
    as it is: C_hybrid[c] = [C_global[c], 0] W_m + b_m (half of C_global[c] with the average start)."""
    head = make_head(K=4, D=5, seed=4)
    torch.manual_seed(1)
    z = torch.randn(6, 5, dtype=torch.float64)
    L = head.fc(z)
    present = set(L.argmax(1).tolist())
    absent = [c for c in range(4) if c not in present]
    assert absent  # the draw leaves a class out
    C_hybrid = head.hybrid_prototypes(z, hpm.ste_assignment(L))[0]
    for c in absent:
        expected = head.mixer(torch.cat([head.prototypes[c], torch.zeros(5, dtype=torch.float64)]))
        torch.testing.assert_close(C_hybrid[c], expected, **TOL)
    fresh = hpm.HPMHead(nn.Linear(5, 4, dtype=torch.float64))
    fresh.prototypes.copy_(head.prototypes)
    C = fresh.hybrid_prototypes(z, hpm.ste_assignment(fresh.fc(z)))[0]
    empty = set(range(4)) - set(fresh.fc(z).argmax(1).tolist())
    assert empty
    for c in empty:
        torch.testing.assert_close(C[c], head.prototypes[c] / 2, **TOL)


def test_mixer_starts_as_average_of_global_and_batch():
    torch.manual_seed(0)
    head = hpm.HPMHead(nn.Linear(5, 4)).double()
    C_global, C_batch = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    C_hybrid = head.mixer(torch.cat([C_global, C_batch], 1))
    torch.testing.assert_close(C_hybrid, (C_global + C_batch) / 2, **TOL)


def test_mixer_layout_puts_global_first():
    head = hpm.HPMHead(nn.Linear(3, 2)).double()
    with torch.no_grad():  # W_m = [I; 0]: the mixer returns its first half, which must be C_global
        head.mixer.weight.copy_(torch.cat([torch.eye(3), torch.zeros(3, 3)], 1))
        head.prototypes.copy_(torch.randn(2, 3))
    z = torch.randn(4, 3, dtype=torch.float64)
    expected = -torch.cdist(z, head.prototypes, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(head(z), expected, **TOL)


# --- Eq. 18: hybrid l2 logits -----------------------------------------------------------------

def test_l2_logits_match_cdist():
    torch.manual_seed(0)
    Z, C = torch.randn(8, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    expected = -torch.cdist(Z, C, compute_mode="donot_use_mm_for_euclid_dist")
    torch.testing.assert_close(hpm.l2_logits(Z, C), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_hybrid_logits_and_gradients_match_reference(mode):
    head = make_head()
    z = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    out = head(z, mode=mode)
    ref = reference_logits(head, z, mode)
    torch.testing.assert_close(out, ref, **TOL)
    v = torch.randn_like(out)
    params = [z, head.fc.weight, head.mixer.weight, head.mixer.bias]
    grads = torch.autograd.grad((out * v).sum(), params)
    ref_grads = torch.autograd.grad((ref * v).sum(), params)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_l2_gradient_is_finite_at_zero_distance():
    C = torch.randn(3, 4, dtype=torch.float64)
    Z = C[[1]].clone().requires_grad_(True)  # exactly on prototype 1
    C = C.requires_grad_(True)
    logits = hpm.l2_logits(Z, C)
    assert logits[0, 1] == 0
    gZ, gC = torch.autograd.grad(logits.sum(), [Z, C])
    assert torch.isfinite(gZ).all() and torch.isfinite(gC).all()
    # Away from zero the gradient is the unit vector towards the prototype: check one entry.
    j = 0
    unit = (C[j] - Z[0]) / (C[j] - Z[0]).norm()
    (g_j,) = torch.autograd.grad(hpm.l2_logits(Z, C)[0, j], Z)
    torch.testing.assert_close(g_j[0], unit.detach(), **TOL)


def test_head_is_finite_when_feature_sits_on_hybrid_prototype():
    head = hpm.HPMHead(nn.Linear(3, 2)).double()
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]))
        head.fc.bias.zero_()
        head.mixer.weight.copy_(torch.cat([torch.eye(3), torch.zeros(3, 3)], 1))  # C_hybrid = C_global
    z = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    head.update_prototypes(z, torch.tensor([0, 1]))  # prototypes = the features themselves
    z = z.clone().requires_grad_(True)
    for mode in ("ste", "soft"):
        for context in ("batch", "image"):
            out = head(z, mode=mode, context=context)
            assert out[0, 0] == 0 and out[1, 1] == 0
            grads = torch.autograd.grad(out.sum(), [z, head.fc.weight, head.mixer.weight])
            assert all(torch.isfinite(g).all() for g in grads)


# --- Surrogates and contexts ------------------------------------------------------------------

def test_fc_mode_equals_fc_layer_bit_for_bit():
    torch.manual_seed(0)
    fc = nn.Linear(5, 4)
    head = hpm.HPMHead(fc)
    z = torch.randn(6, 5)
    assert torch.equal(head(z, mode="fc"), fc(z))
    assert head.fc is not fc  # a copy: training the head never touches the base layer


def test_soft_equals_ste_forward_when_softmax_is_one_hot():
    head = make_head()
    with torch.no_grad():
        head.fc.weight.mul_(1e4)  # saturated logits: softmax is one-hot to double precision
        head.fc.bias.zero_()
    z = torch.randn(8, 5, dtype=torch.float64)
    P_soft = torch.softmax(head.fc(z), 1)
    torch.testing.assert_close(P_soft, F.one_hot(P_soft.argmax(1), 4).double(), rtol=0, atol=1e-12)
    for context in ("batch", "image"):
        torch.testing.assert_close(head(z, "soft", context), head(z, "ste", context), **TOL)


def test_soft_differs_from_ste_when_softmax_is_not_one_hot():
    head = make_head()
    z = torch.randn(8, 5, dtype=torch.float64)
    assert (head(z, "soft") - head(z, "ste")).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["ste", "soft", "fc"])
def test_image_context_equals_each_row_alone(mode):
    head = make_head()
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    out = head(z, mode=mode, context="image")
    rows = torch.cat([head(z[i:i + 1], mode=mode, context="batch") for i in range(7)])
    torch.testing.assert_close(out, rows, **TOL)
    v = torch.randn_like(out)
    params = [z, head.fc.weight] + ([head.mixer.weight, head.mixer.bias] if mode != "fc" else [])
    for g, r in zip(torch.autograd.grad((out * v).sum(), params), torch.autograd.grad((rows * v).sum(), params)):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


def test_batch_context_depends_on_the_rest_of_the_batch():
    head = make_head()
    z = torch.randn(8, 5, dtype=torch.float64)
    alone = head(z[:4], "ste", "batch")
    together = head(z, "ste", "batch")[:4]
    assert (alone - together).abs().max() > 1e-6


def test_bad_mode_or_context_is_a_clear_error():
    head = make_head()
    z = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        head(z, mode="hard")
    with pytest.raises(ValueError, match="context"):
        head(z, context="dataset")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL), (torch.float32, dict(rtol=1e-5, atol=1e-5))])
@pytest.mark.parametrize("mode", ["ste", "soft"])
def test_grouped_batch_context_equals_separate_calls(mode, dtype, tol):
    """G fixed batches in one call (batch_size) == G separate calls, values and gradients."""
    head = make_head(dtype=dtype)
    torch.manual_seed(2)
    z = torch.randn(12, 5, dtype=dtype, requires_grad=True)
    grouped = head(z, mode=mode, context="batch", batch_size=4)  # 3 groups of 4
    (grouped * torch.arange(1.0, 5.0, dtype=dtype)).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    separate = torch.cat([head(z2[g:g + 4], mode=mode, context="batch") for g in range(0, 12, 4)])
    (separate * torch.arange(1.0, 5.0, dtype=dtype)).sum().backward()
    torch.testing.assert_close(grouped, separate, **tol)
    torch.testing.assert_close(z.grad, z2.grad, **tol)
    assert not torch.allclose(grouped, head(z, mode=mode, context="batch"))  # groups matter
    torch.testing.assert_close(head(z, mode=mode, context="batch", batch_size=12),
                               head(z, mode=mode, context="batch"), **tol)  # one group: the batch
    with pytest.raises(ValueError, match="does not divide"):
        head(z, context="batch", batch_size=5)


# --- State ----------------------------------------------------------------------------------

def test_state_dict_round_trip_keeps_prototypes_mixer_and_fc():
    head = make_head(seed=1)
    head.update_prototypes(torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 1, 3]))
    fresh = hpm.HPMHead(nn.Linear(5, 4)).double()
    fresh.load_state_dict(head.state_dict())
    for k, v in head.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert {"prototypes", "seen", "fc.weight", "mixer.weight"} <= set(head.state_dict())
    z = torch.randn(5, 5, dtype=torch.float64)
    assert torch.equal(fresh(z), head(z))


@pytest.mark.slow
def test_hpm_imports_torch_alone():
    tree = ast.parse((ROOT / "hpm.py").read_text())
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"torch", "copy"}, modules
    code = ("import sys, hpm; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('robustbench', 'autoattack', 'pyautoattack', 'torchvision', 'timm')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --- attach() on model-zoo architectures ------------------------------------------------------

class Nested(nn.Module):
    """A final linear layer that is nested, oddly named and registered after a decoy."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4, 6), nn.ReLU())
        self.tail = nn.ModuleDict({"readout": nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))})

    def forward(self, x):
        return self.tail["readout"](self.trunk(x))


def zoo_models():
    # The model zoos are test-only dependencies: where hpm.py travels without them, these tests skip.
    sys.modules.setdefault("autoattack", pytest.importorskip("pyautoattack"))  # robustbench imports it
    pytest.importorskip("robustbench")
    pytest.importorskip("timm")
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet
    from timm.models.convnext import ConvNeXt
    from timm.models.vision_transformer import VisionTransformer

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return {
        "WideResNet": (lambda: WideResNet(depth=10, widen_factor=1, num_classes=10), "fc", 32),
        "DMWideResNet": (lambda: DMWideResNet(num_classes=10, depth=10, width=1), "logits", 32),
        "ViT (normalized)": (lambda: normalize_model(VisionTransformer(
            img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=7), mean, std),
            "model.head", 32),
        "ConvNeXt (normalized)": (lambda: normalize_model(ConvNeXt(
            depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=5), mean, std), "model.head.fc", 64),
        "nested": (Nested, "tail.readout.1", 16),
    }


@pytest.mark.parametrize("name", ["WideResNet", "DMWideResNet", "ViT (normalized)", "ConvNeXt (normalized)",
                                  "nested"])
def test_attach_on_zoo_architectures(name):
    build, fc_name, size = zoo_models()[name]
    torch.manual_seed(0)
    base = build()
    # Random BatchNorm statistics, so that eval mode matters and state could visibly drift.
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    before = copy.deepcopy(base.state_dict())
    x = torch.rand(4, 3, size, size)
    base.eval()
    with torch.no_grad():
        expected = base(x)
    model = hpm.attach(base)
    model.train()  # the wrapper's train() must keep the backbone in eval mode
    assert model.fc_name == fc_name
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert torch.equal(model(x, mode="fc"), expected)
    z = model.features(x)
    assert z.shape == (4, model.head.fc.in_features)
    for mode in ("ste", "soft"):
        for context in ("batch", "image"):
            out = model(x, mode=mode, context=context)
            assert out.shape == expected.shape and torch.isfinite(out).all()
    # Gradients reach the input through the frozen backbone and the head's parameters.
    x_req = x.clone().requires_grad_(True)
    model(x_req).sum().backward()
    assert x_req.grad.abs().sum() > 0 and model.head.mixer.weight.grad is not None
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_attach_rejects_model_whose_last_linear_is_not_the_output():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return 2 * self.fc(x)

    model = hpm.attach(Scaled())
    with pytest.raises(ValueError, match="not the model's output"):
        model(torch.randn(2, 4))


def test_attach_says_to_wrap_a_model_that_returns_a_tuple():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(ValueError, match="returns a tuple, not a logits tensor; wrap it"):
        attach(Pair())(torch.randn(2, 4))


def test_attach_rejects_model_without_linear():
    with pytest.raises(ValueError, match="no nn.Linear"):
        hpm.attach(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten()))


def test_attach_leaves_exactly_fc_and_mixer_trainable():
    model = hpm.attach(Nested())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.fc.weight", "head.fc.bias", "head.mixer.weight", "head.mixer.bias"}


def test_each_mixer_start_is_its_matrix():
    """start_mixer (finetune.py's --mixer-init): "global" passes C_global alone, "average" the mean of
    both halves, "default" is PyTorch's own initialisation. (A new head's average start is
    test_mixer_starts_as_average_of_global_and_batch.)"""
    head = make_head(K=3, D=4)
    eye = torch.eye(4, dtype=torch.float64)
    for how, W in (("global", torch.cat([eye, 0 * eye], 1)), ("average", torch.cat([eye / 2, eye / 2], 1))):
        head.start_mixer(how)
        assert torch.equal(head.mixer.weight, W) and not head.mixer.bias.any(), how
    torch.manual_seed(5)
    head.start_mixer("default")
    torch.manual_seed(5)
    reference = nn.Linear(8, 4, dtype=torch.float64)  # PyTorch's own init, the same draws
    assert torch.equal(head.mixer.weight, reference.weight) and torch.equal(head.mixer.bias, reference.bias)
