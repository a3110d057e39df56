"""Benchmark: the cost of HPM and of its evaluation, as ratios measured in one run.

    python -m experiments.bench          # CPU: a small RobustBench WideResNet (WRN-16-4)
    python -m experiments.bench --depth 28 --width 10 --device cuda   # WRN-28-10, also images/s

Every figure is a ratio of two paired measurements taken alternately in the same process
(median over --repeats pairs, after warm-up), so a shared, noisy machine affects both sides
alike. Each is printed with its goal and written to bench.json: name -> {value, goal, ok}.
Models are built offline from robustbench's own architecture classes (random weights: the
cost of a forward pass does not depend on the weights). Not a test: it does not run in CI.

The figures of evaluate.py's chunks (--chunk) are single timed runs, not paired medians (each
function's docstring says what it compares). The head's aten ops are a count that does not
depend on the machine. The --compile figures time the head after its first call (it compiles).
"""
import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

import evaluate
import finetune
import hpm
from hpmkit import autoattack, config, models
from hpmkit.attacks import run_attack
from hpmkit.catalogue import ATTACKER_ATTACKS, CATALOGUE, Setting
from hpmkit.chunks import Chunk, FixedBatches
from hpmkit.engine import Runner
from hpmkit.pgd import project

autoattack.alias_autoattack()  # robustbench, whose WideResNet build_wrn takes, imports `autoattack`


def build_wrn(depth, width, num_classes=10):
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    return WideResNet(depth=depth, widen_factor=width, num_classes=num_classes).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_once(f, device):
    sync(device)
    t0 = time.perf_counter()
    f()
    sync(device)
    return time.perf_counter() - t0


def paired_ratio(f_num, f_den, device, repeats):
    """Median over `repeats` of time(f_num) / time(f_den), the two run back to back after a warm-up."""
    f_num(), f_den()
    ratios = []
    for i in range(repeats):  # alternate the order so neither side always runs on a warm cache
        if i % 2:
            d, n = timed_once(f_den, device), timed_once(f_num, device)
        else:
            n, d = timed_once(f_num, device), timed_once(f_den, device)
        ratios.append(n / d)
    return statistics.median(ratios)


def best_throughput(make_step, sizes, device, repeats):
    """{b: images/s of make_step(b)() on b images} for each batch size b, median of `repeats` after
    a warm-up call."""
    rates = {}
    for b in sizes:
        step = make_step(b)
        step()
        rates[b] = b / statistics.median(timed_once(step, device) for _ in range(repeats))
    return rates


# The figures ---------------------------------------------------------------------------------

def hpm_forward_backward(base, model, x, y, device, repeats):
    """HPM model forward + backward (to the input, as an attack does) / the base model's."""
    x = x.clone().requires_grad_(True)

    def step(m):
        torch.autograd.grad(F.cross_entropy(m(x), y), x)
    return paired_ratio(lambda: step(model), lambda: step(base), device, repeats)


def head_compiled_vs_eager(model, x, y, device, repeats, calls=50):
    """The head alone, forward + backward to its features, through torch.compile (evaluate.py
    --compile) / eager: what compiling saves of the head's own cost (at batch 64 mostly the launch
    and dispatch of its many small ops, the part that showed on an H100)."""
    with torch.no_grad():
        z0 = model.features(x)
    compiled = models.compile_head(copy.deepcopy(model.head))

    def steps(head):
        for _ in range(calls):
            z = z0.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(head(z), y), z)
    return paired_ratio(lambda: steps(compiled), lambda: steps(model.head), device, repeats)


def apgd(target, x, y, steps, sizes=None, whole_batch=True):
    """evaluate.py's APGD-CE at L-inf 8/255 on x, one chunk of fixed batches of these sizes."""
    return run_attack(CATALOGUE["apgd-ce"], target, Chunk(x, y, sizes or [len(y)]),
                      Setting("Linf", 8 / 255, steps=steps), whole_batch=whole_batch)


def apgd_step_msa_vs_base(base, model, x, y, device, repeats, steps):
    """One APGD-CE step against the MSA mixture (one backbone pass) / one against the base model."""
    mix = evaluate.Surrogate(model, "mix", "batch")
    return paired_ratio(lambda: apgd(mix, x, y, steps), lambda: apgd(base, x, y, steps), device, repeats)


def finetune_step_vs_unfrozen(base, x, y, device, repeats, steps):
    """One fine-tuning step (10-step attack + update) / the same step with the backbone unfrozen.

    The baseline is what a plain adversarial-training loop does with an unfrozen backbone: its
    attack calls loss.backward() (weight gradients at every step, as in the IKL/TRADES code)
    and the update backpropagates through the backbone for the clean and adversarial batch.
    """
    args = argparse.Namespace(steps=steps, eps=8 / 255, step_size=2 / 255, threat_model="Linf",
                              attack_mode="ste", alpha=3.0, beta=10.0, attack_alpha=3.0, attack_beta=10.0,
                              class_weights="fixed", T=4.0, momentum=0.98)
    K = base.fc.out_features if hasattr(base, "fc") else 10
    S = torch.full((K, K), 1.0 / K, device=device)

    frozen = hpm.attach(copy.deepcopy(base)).to(device)
    opt_frozen = torch.optim.Adam(finetune.head_parameters(frozen), lr=5e-5)

    unfrozen = hpm.attach(copy.deepcopy(base)).to(device)
    unfrozen.base_model.requires_grad_(True)  # the backbone takes weight gradients
    opt_unfrozen = torch.optim.Adam(unfrozen.head.parameters(), lr=5e-5)

    def unfrozen_step():
        z_clean = unfrozen.features(x)  # with gradients: the backbone is trainable here
        zn_attack = unfrozen.head(z_clean).detach()
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(args.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = finetune.ikl_loss(zn_attack, unfrozen(x_adv), y, S, args.alpha, args.beta)
            loss.backward()  # fills the backbone's .grad too, as a loop that does not freeze it
            x_adv = project(x_adv + args.step_size * x_adv.grad.sign(), x, args.eps, "Linf")
        za = unfrozen(x_adv.detach())
        opt_unfrozen.zero_grad(set_to_none=True)
        unfrozen.base_model.zero_grad(set_to_none=True)
        finetune.ikl_loss(unfrozen.head(z_clean), za, y, S, args.alpha, args.beta).backward()
        opt_unfrozen.step()
        unfrozen.head.update_prototypes(z_clean.detach(), y)

    return paired_ratio(lambda: finetune.train_step(frozen, opt_frozen, x, y, S, args),
                        unfrozen_step, device, repeats)


def image_context_vs_loop(model, x, device, repeats):
    """The head in context "image" over a batch / the head on each image alone, in a loop."""
    with torch.no_grad():
        z = model.features(x)
    z.requires_grad_(True)
    head = model.head

    def looped():
        torch.autograd.grad(sum(head(z[i:i + 1], "ste", "batch").sum() for i in range(len(z))), z)
    return paired_ratio(lambda: torch.autograd.grad(head(z, "ste", "image").sum(), z), looped, device, repeats)


def evaluate_vs_autoattack(base, x, y, device, repeats, steps):
    """evaluate.py's attack on a batch / AutoAttack's APGDAttack called directly on the same batch."""
    target = evaluate.build_rows(base)[0].real()

    def direct():
        autoattack.APGDAttack(base, n_iter=steps, norm="Linf", eps=8 / 255, seed=0, loss="ce",
                              device=x.device).perturb(x, y)
    return paired_ratio(lambda: apgd(target, x, y, steps, whole_batch=False), direct, device, repeats)


def peak_memory_ratio(args):
    """Peak memory of evaluate's MSA attack on a batch / the base model's APGD alone (subprocesses)."""
    peaks = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `experiments` imports
    for which in ("msa", "base"):
        cmd = [sys.executable, "-m", "experiments.bench", "--_memory-probe", which, "--depth", str(args.depth),
               "--width", str(args.width), "--batch", str(args.batch), "--device", args.device,
               "--apgd-steps", str(args.apgd_steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root).stdout
        peaks[which] = float(out.strip().splitlines()[-1])
    return peaks["msa"] / peaks["base"], peaks


def memory_probe(args):
    """Run one attack and print its peak memory above what was in use before it (bytes).

    CUDA: the allocator's peak. CPU: the profiler's allocation events, summed in time order
    (the process's peak RSS would hide the attack under the import of torch itself).
    """
    device = torch.device(args.device)
    base, model, x, y = setup(args, device)
    target = evaluate.Surrogate(model, "mix", "batch") if args._memory_probe == "msa" else base
    attack = lambda: apgd(target, x, y, args.apgd_steps)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        attack()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            attack()
        # Each op's own allocations net of its own frees, and the frees between ops ("[memory]").
        deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
        peak = max([0, *accumulate(delta for _, delta in deltas)])  # the most ever live at once
    print(peak)


def evaluate_throughput(model, x, y, steps):
    """Images per second of evaluate.py's APGD-CE on the MSA mixture (GPU figure, no goal)."""
    mix = evaluate.Surrogate(model, "mix", "batch")
    return len(x) / timed_once(lambda: apgd(mix, x, y, steps), x.device)


# Many fixed batches at once (evaluate.py --chunk) ------------------------------------------

def attack_phase_throughput(model, x, y, batch, steps, device):
    """Image-steps/s of APGD-CE on the MSA mixture over one chunk of fixed batches (grouped)."""
    mix = evaluate.Surrogate(model, "mix", "batch", batch_size=batch)
    sizes = [batch] * (len(x) // batch)
    run = lambda: apgd(mix, x, y, steps, sizes)  # noqa: E731
    run()  # warm-up
    return len(x) * steps / timed_once(run, device)


def protocol_grouped_vs_sequential(base, model, x, y, batch, chunk, steps, queries, device):
    """The default protocol (version strong's attacks, every row) on one subset: images/s with
    chunks of `chunk` images / images/s one fixed batch at a time."""
    setting = Setting("Linf", 8 / 255, steps=steps, queries=queries, score_queries=True, fixed_batch_square=True)
    data, attacks, times = FixedBatches(x, y, batch, device), evaluate.VERSIONS["strong"]["attacks"], {}
    for form, c in (("sequential", None), ("grouped", chunk)) * 2:
        runner = Runner(device=device, chunk=c, progress=False, log=lambda *a: None)
        t = timed_once(lambda: evaluate.evaluate(evaluate.build_rows(base, model), attacks, data, setting, runner),
                       device)
        times[form] = min(times.get(form, math.inf), t)
    return times["sequential"] / times["grouped"], {k: len(x) / v for k, v in times.items()}


def attacker_rows_cost(base, model, x, y, batch, steps, queries, device):
    """K of B (evaluate.py --attackers): backbone passes (forward + backward) per image of each
    attack of the attacker rows, K = 1 and K = B / 8, attacker budget 1 (any image), from one
    evaluation of x in fixed batches of `batch`: {row: {attack: passes per image}}."""
    Ks = sorted({1, max(1, batch // 8)})
    rows = evaluate.build_rows(base, model, contexts=(), attackers=Ks, attacker_eps=1.0)[1:]
    setting = Setting("Linf", 8 / 255, steps=steps, queries=queries, score_queries=True, fixed_batch_square=True)
    res = evaluate.evaluate(rows, list(ATTACKER_ATTACKS), FixedBatches(x, y, batch, device), setting,
                            Runner(device=device, progress=False, log=lambda *a: None))
    return {r.name: {a: res.row(r.name).passes_per_image(a) for a in ATTACKER_ATTACKS} for r in rows}


def square_chunk_vs_per_batch(base, x, y, batch, queries, device, repeats):
    """AutoAttack's Square on a per-image model: images/s of the chunked form (square_chunk, one
    loop over all batches) / AutoAttack's perturb on each fixed batch in turn (the form before).
    Also the limit of any Square making the same queries: the time before / the time the model
    alone needs for the images it was queried on, at its best forward throughput at any batch
    size (no reordering of the queries can beat that)."""
    queried, adv = [0], {}

    def square(model):
        return autoattack.SquareAttack(model, norm="Linf", n_queries=queries, eps=8 / 255, p_init=0.8, seed=0,
                                       verbose=False, device=x.device)

    def counted(xq):  # the images the model is queried on, in the form before
        queried[0] += len(xq)
        return base(xq)

    def new():
        adv["new"] = autoattack.square_chunk(square(base), x, y, [batch] * (len(x) // batch))

    def before():
        queried[0] = 0
        adv["before"] = torch.cat([square(counted).perturb(x[a:a + batch], y[a:a + batch])
                                   for a in range(0, len(x), batch)])
    t_new = min(timed_once(new, device) for _ in range(2))
    t_before = min(timed_once(before, device) for _ in range(2))
    same = torch.equal(adv["new"], adv["before"])
    with torch.no_grad():
        best = best_throughput(lambda b: partial(base, x[:b]), sorted({batch, 2 * batch, 4 * batch, len(x)}),
                               device, repeats)
    limit = t_before / (queried[0] / max(best.values()))
    return t_before / t_new, same, limit


def top_level_op(e):
    """An aten op called from Python or from autograd, not from inside another aten op."""
    return e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))


def head_ops(model, x, y):
    """aten ops the HPM head launches for one forward+backward of the MSA mixture: fused (one
    pass over the three modes) / the three modes called one by one (as before)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        z0 = model.features(x)
    head, modes = model.head, ("fc", "soft", "ste")
    mixtures = {"fused": lambda z: head(z, mode=modes).log_softmax(dim=2).mean(dim=0),
                "separate": lambda z: torch.stack([head(z, mode=m).log_softmax(dim=1) for m in modes]).mean(dim=0)}

    def fwd_bwd(mixture):
        z = z0.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(mixture(z), y), z)

    counts = {}
    for name, mixture in mixtures.items():
        fwd_bwd(mixture)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fwd_bwd(mixture)
        counts[name] = sum(1 for e in prof.events() if top_level_op(e))
    return counts["fused"] / counts["separate"], counts


def small_cnn():
    """A small CIFAR CNN (the kind of model whose Square is bound by Python, not arithmetic)."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 8 * 8, 10))


def setup(args, device):
    torch.manual_seed(0)
    base = build_wrn(args.depth, args.width).to(device)
    model = hpm.attach(base).to(device)
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    with torch.no_grad():  # prototypes from one clean batch, as the fine-tuning's clean pass would
        model.head.update_prototypes(model.features(x), base(x).argmax(1))
    return base, model, x, y


def main(args):
    if args._memory_probe:
        return memory_probe(args)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    base, model, x, y = setup(args, device)
    print(f"WRN-{args.depth}-{args.width}, batch {args.batch}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} paired runs")
    figures = {}

    def report(name, value, goal, extra="", at_least=False):
        ok = bool(value >= goal if at_least else value <= goal)
        figures[name] = {"value": round(value, 4), "goal": f"{'>=' if at_least else '<='} {goal}", "ok": ok}
        print(f"{name:52s} {value:7.3f}   goal {'>=' if at_least else '<='} {goal:<5}  "
              f"{'ok' if ok else 'MISSED'} {extra}")

    r, steps, queries = args.repeats, args.apgd_steps, args.protocol_queries
    xw = x.clone().requires_grad_(True)
    for _ in range(5):  # warm the allocator and the caches before the first figure
        torch.autograd.grad(F.cross_entropy(model(xw), y), xw)
        torch.autograd.grad(F.cross_entropy(base(xw), y), xw)
    report("hpm_fwd_bwd / base_fwd_bwd", hpm_forward_backward(base, model, x, y, device, r), 1.05)
    compiled = copy.deepcopy(model)
    models.compile_head(compiled.head)
    report("hpm_fwd_bwd (head compiled) / base_fwd_bwd", hpm_forward_backward(base, compiled, x, y, device, r),
           1.05, "(evaluate.py --compile)")
    report("head_fwd_bwd compiled / eager (head alone)", head_compiled_vs_eager(model, x, y, device, r), 1.0,
           "(below 1: compiling helps)")
    report("apgd_step_msa_mix / apgd_step_base", apgd_step_msa_vs_base(base, model, x, y, device, r, steps), 1.10)
    report("finetune_step / step_with_backbone_grads",
           finetune_step_vs_unfrozen(base, x, y, device, r, args.attack_steps), 0.80)
    report("head_image_context / 64_single_calls", image_context_vs_loop(model, x, device, r), 0.10)
    report("evaluate_apgd / autoattack_apgd", evaluate_vs_autoattack(base, x, y, device, r, steps), 1.05)
    fused, ops = head_ops(model, x, y)
    report("head_ops_msa_fused / head_ops_three_calls", fused, 0.6,
           f"({ops['fused']} vs {ops['separate']} aten ops per forward+backward)")

    # Many fixed batches at once (evaluate.py --chunk)
    chunk = args.chunk or config.DEFAULT_CHUNK.get(device.type, config.DEFAULT_CHUNK["cpu"])
    xc = torch.rand(max(chunk, 4 * args.batch), 3, 32, 32, device=device)
    with torch.no_grad():
        yc = base(xc).argmax(1)  # every image correct: every image attacked
    sizes = sorted({max(1, args.batch // 2), args.batch, 2 * args.batch, 4 * args.batch, chunk})

    def fwd_bwd(b):  # the backbone's forward+backward (to the input): its best is an attack's physical limit
        xb = xc[:b].clone().requires_grad_(True)
        return lambda: torch.autograd.grad(F.cross_entropy(base(xb), yc[:b]), xb)
    per_size = best_throughput(fwd_bwd, sizes, device, r)
    best = max(per_size.values())
    steps_s = attack_phase_throughput(model, xc[:chunk], yc[:chunk], args.batch, steps, device)
    report("attack_image_steps_per_s / backbone_best_fwd_bwd", steps_s / best, 0.8,
           f"(chunk {chunk}: {steps_s:.0f} vs {best:.0f} images/s; backbone " +
           ", ".join(f"batch {b}: {v:.0f}" for b, v in per_size.items()) + ")", at_least=True)
    pb = args.protocol_batch or (64 if device.type == "cuda" else 8)
    n = pb * args.protocol_batches
    xp, yp = xc[:n], yc[:n]
    ratio, ips = protocol_grouped_vs_sequential(base, model, xp, yp, pb, n, steps, queries, device)
    report("protocol_grouped / protocol_sequential (images/s)", ratio, 1.0,
           f"({ips['grouped']:.2f} vs {ips['sequential']:.2f} images/s; {n} images in batches of {pb}, "
           f"strong attacks, {steps} steps, {queries} queries)", at_least=True)
    torch.manual_seed(0)
    cnn = small_cnn().to(device).eval().requires_grad_(False)
    n_sq = max(chunk, 4 * args.batch)  # chunked: at least 4 fixed batches at once
    xs = torch.rand(n_sq, 3, 32, 32, device=device)
    with torch.no_grad():
        ys = cnn(xs).argmax(1)
    sq, same, limit = square_chunk_vs_per_batch(cnn, xs, ys, args.batch, args.square_queries, device, r)
    report("square_per_image_chunk / per_batch (images/s)", sq, 10.0 if device.type == "cuda" else 3.0,
           f"(small CNN, {n_sq} images, batches of {args.batch}, {args.square_queries} queries; "
           f"identical adversarial images: {same}; the limit of any Square making these queries "
           f"on this machine: {limit:.2f}x)", at_least=True)
    figures["square_limit_same_queries"] = {"value": round(limit, 4), "goal": "none (the bound on the figure above)",
                                            "ok": True}

    note = f"{n} images in batches of {pb}, {steps} steps, {queries} queries, attacker budget 1"
    for name, per_attack in attacker_rows_cost(base, model, xp, yp, pb, steps, queries, device).items():
        figures[f"passes_per_image {name}"] = {"value": per_attack, "goal": None, "ok": True, "note": note}
        print(f"{name} backbone passes per image (fwd+bwd), {steps} steps: " +
              ", ".join(f"{a} {v:g}" for a, v in per_attack.items()) + f"; total {sum(per_attack.values()):g}")
    ratio, peaks = peak_memory_ratio(args)
    report("peak_mem_msa_attack / peak_mem_base_apgd", ratio, 1.2,
           f"({peaks['msa'] / 2**20:.0f} MiB vs {peaks['base'] / 2**20:.0f} MiB)")
    if device.type == "cuda":
        ips = evaluate_throughput(model, x, y, steps)
        figures["evaluate_images_per_second"] = {"value": round(ips, 2), "goal": None, "ok": True,
                                                 "note": f"APGD-CE on the MSA mixture, {steps} steps"}
        print(f"evaluate.py images/s (APGD-CE/mix, {steps} steps): {ips:.1f}")
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"wrote {args.out}")
    return figures


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16, help="WideResNet depth (28 for WRN-28-10 on a GPU)")
    p.add_argument("--width", type=int, default=4, help="WideResNet widen factor (10 for WRN-28-10)")
    p.add_argument("--batch", type=int, default=64, help="batch size (the fine-tuning and evaluation batch)")
    p.add_argument("--repeats", type=int, default=3, help="paired timing runs per figure (median)")
    p.add_argument("--apgd-steps", type=int, default=5, help="APGD iterations per timed attack")
    p.add_argument("--attack-steps", type=int, default=10, help="attack steps per fine-tuning step (paper: 10)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--chunk", type=int, default=0, help="images per chunk of the attack figure (0: "
                   "evaluate.py's default for the device)")
    p.add_argument("--protocol-batch", type=int, default=0, help="fixed batch size of the whole-protocol "
                   "figure (0: 64 on a GPU, 8 on the CPU)")
    p.add_argument("--protocol-batches", type=int, default=4, help="fixed batches in the whole-protocol "
                   "figure (one chunk)")
    p.add_argument("--protocol-queries", type=int, default=50, help="Square queries in the whole-protocol figure")
    p.add_argument("--square-queries", type=int, default=300, help="queries of the Square figure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="experiments/bench.json", help="where the figures are written")
    p.add_argument("--_memory-probe", dest="_memory_probe", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
