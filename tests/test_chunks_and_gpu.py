"""Many fixed batches at once give what one batch at a time gives (hpmkit/chunks.py, the share of
each process under torchrun), chunks that do not fit in memory and the compiled head (hpmkit/engine.py, hpmkit/models.py).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn

import evaluate
from hpmkit import attacks, chunks, cli, engine, models
from hpmkit.catalogue import Setting
from hpmkit.chunks import Chunk

from conftest import (TOL, K, quad_data, quad_linear, fitted_hpm, write_setup, run_evaluate, rows_of, evaluate_rows,
                      TinyCNN, make_head)


# Many fixed batches at once (--chunk) ----------------------------------------------------------

def chunk_setup(n=44):
    """A per-image CNN that classifies most quad images right (labels = its predictions, four
    flipped so the standard path has images to skip), and an HPM head on it."""
    torch.manual_seed(0)
    base = TinyCNN().eval()
    x, _ = quad_data(n, seed=2)
    with torch.no_grad():
        y = base(x.float() / 255).argmax(1)
    y[[1, 9, 22, 40]] = (y[[1, 9, 22, 40]] + 1) % K
    return base, fitted_hpm(base, x, y), x, y


def test_chunks_are_whole_fixed_batches_and_a_short_last_batch_stands_alone():
    batches = chunks.make_batches(44, 8)  # 5 batches of 8, one of 4
    assert chunks.make_chunks(batches, 0, 24) == [(0, 3), (3, 5), (5, 6)]
    assert chunks.make_chunks(batches, 1, 24) == [(1, 4), (4, 5), (5, 6)]  # resumed mid-way
    assert chunks.make_chunks(batches, 0, 5) == [(i, i + 1) for i in range(6)]  # never part of a batch
    assert chunks.make_chunks(batches, 0, None) == [(i, i + 1) for i in range(6)]


@pytest.mark.slow
@pytest.mark.parametrize("version", ["strong", "paper"])
def test_grouped_evaluation_equals_sequential_on_per_image_rows(version):
    """Chunks of three fixed batches give every per-image row exactly the sequential per-image
    results (AutoAttack's standard path, transfer attacks, APGD-T, Square, restarts), because each
    batch of a chunk gets the random numbers it gets alone; and the batch context as well here."""
    base, model, x, y = chunk_setup()
    attacks = list(evaluate.VERSIONS[version]["attacks"]) + ["apgd-cw/fc"]
    kw = dict(attacks=attacks, eps=0.3, steps=6, queries=60, batch_size=8, seed=5, progress=False,
              log=lambda *a: None, score_queries=version == "strong", restarts=2)
    sequential = evaluate_rows(evaluate.build_rows(base, model), x, y, **kw)
    grouped = evaluate_rows(evaluate.build_rows(base, model), x, y, chunk=24, **kw)
    broken = 0
    for name in ("base", "hpm/image", "hpm/batch"):
        s, g = sequential.row(name), grouped.row(name)
        assert s.per_image == g.per_image, name
        broken += sum(s.clean > a for a in s.accuracies.values())
    assert broken >= 10  # the attacks break images: the equality is not that of untouched images


def test_grouped_batch_context_rescores_to_its_numbers_and_stays_in_the_ball(tmp_path):
    """Each kept final batch of a chunked batch-context attack, re-scored alone as its fixed batch,
    gives the recorded final-batch numbers; the reported ones are never above them."""
    base, model, x, y = chunk_setup()
    rows = evaluate.build_rows(base, model, contexts=["batch"])[1:]
    res = evaluate_rows(rows, x, y, attacks=["apgd-ce/mix", "apgd-t/fc", "flip/mix", "square"],
                            eps=0.3, steps=6, queries=60, batch_size=8, seed=5, progress=False,
                            log=lambda *a: None, score_queries=True, chunk=24, save_adv=str(tmp_path)
                            ).row("hpm/batch")
    xf = x.float() / 255
    for attack in ("apgd-ce/mix", "apgd-t/fc", "flip/mix", "square"):
        saved = torch.load(engine.adv_path(str(tmp_path), "hpm/batch", attack), weights_only=True)
        x_adv = saved["x_adv"]
        assert (x_adv - xf).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        rescored = []
        for a, b in chunks.make_batches(len(y), 8):
            with torch.no_grad():
                rescored += (model(x_adv[a:b], context="batch").argmax(1) == y[a:b]).int().tolist()
        assert rescored == res.final_correct(attack), attack
        assert all(r <= f for r, f in zip(res.correct(attack), rescored))


def test_fixed_batch_square_on_a_chunk_queries_whole_chunks_and_equals_each_batch_alone():
    x, y = quad_data(32)
    model = fitted_hpm(quad_linear(), x, y).double()
    xf, queried = x.double() / 255, []
    grouped = evaluate.Surrogate(model, "ste", "batch", batch_size=8,
                                 scorer=lambda q, logits: queried.append(q.shape))
    setting = Setting("Linf", 0.45, queries=40)
    chunk = attacks.square_fixed_batch(grouped, Chunk(xf, y, [8] * 4), setting)
    target = evaluate.Surrogate(model, "ste", "batch")
    assert len(queried) >= 2 and all(q == xf.shape for q in queried)
    alone = torch.cat([attacks.square_fixed_batch(target, Chunk(xf[a:a + 8], y[a:a + 8], [8]), setting)
                       for a in range(0, 32, 8)])
    assert (chunk - xf).abs().max() <= 0.45 + 1e-9 and chunk.min() >= 0 and chunk.max() <= 1
    assert torch.equal(chunk, alone)
    assert not torch.equal(chunk, xf)


# torchrun: each process a near-equal share of the chunks --------------------------------------


def test_under_torchrun_every_process_gets_a_near_equal_share_of_whole_batches():
    """balanced_chunks: consecutive whole fixed batches, none above --chunk, shared out so that no
    process does more than its share rounded up plus one batch per extra round (before: 2,500
    CIFAR images in chunks of 1024 on 4 GPUs gave 16, 16, 7 and 1 batches, the 1 of 4 images)."""
    cases = [(39, 4, 16, 4), (39, 4, 16, 8), (100, 0, 16, 4), (5, 0, 16, 4), (7, 4, 1, 3), (64, 0, 16, 2),
             (6, 0, 2, 2), (3, 4, 16, 8)]
    for n_full, short, per, world in cases:
        batches = chunks.make_batches(n_full * 64 + short, 64)
        cut = chunks.balanced_chunks(batches, per * 64, world)
        assert [a for a, _ in cut] == [0] + [b for _, b in cut[:-1]] and cut[-1][1] == len(batches)
        assert all(b - a <= per for a, b in cut)
        if short:
            assert cut[-1] == (n_full, n_full + 1)  # the short batch alone
        full = [b - a for a, b in cut if b <= n_full]
        load = [sum(full[r::world]) for r in range(world)]
        rounds = math.ceil(n_full / (per * world))
        assert max(load) <= math.ceil(n_full / world) + rounds - 1, (n_full, per, world, load)
        assert min(load) >= n_full // world - rounds + 1 or n_full < world, (n_full, per, world, load)
    batches = chunks.make_batches(2500, 64)
    old = [sum(b - a for a, b in chunks.make_chunks(batches, 0, 1024)[r::4]) for r in range(4)]
    new = [sum(b - a for a, b in chunks.balanced_chunks(batches, 1024, 4)[r::4]) for r in range(4)]
    assert old == [16, 16, 7, 1] and new == [11, 10, 10, 9]  # batches per GPU (the 11th: 4 images)
    batches = chunks.make_batches(48, 8)  # the torchrun test below: 6 batches, --chunk 16, 2 processes
    assert [sum(b - a for a, b in chunks.balanced_chunks(batches, 16, 2)[r::2]) for r in range(2)] == [3, 3]


# Chunks that do not fit in memory, and the compiled head ----------------------------------------


class SmallMemory(nn.Module):
    """A model that runs out of "GPU memory" on more than `most` images at once."""

    def __init__(self, model, most):
        super().__init__()
        self.model, self.most, self.refused = model, most, 0

    def forward(self, x):
        if len(x) > self.most:
            self.refused += 1
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated: {len(x)} images)")
        return self.model(x)


@pytest.mark.slow
def test_a_chunk_that_runs_out_of_memory_runs_in_parts_to_the_same_results():
    """Chunks of 3 batches on a model that holds 2 (16 images): each row halves its chunks once,
    says so, and gives what one batch at a time gives, in both contexts, for every attack."""
    base, _, x, y = chunk_setup()
    small = SmallMemory(base, most=len(x))
    model = fitted_hpm(small, x, y)  # (the clean class means from all images at once)
    small = model.base_model
    small.most = 16
    lines = []
    kw = dict(attacks=["apgd-ce/mix", "apgd-t/fc", "flip/mix", "square"], eps=0.3, steps=6, queries=60,
              batch_size=8, seed=5, progress=False, log=lines.append, score_queries=True)
    sequential = evaluate_rows(evaluate.build_rows(base, fitted_hpm(base, x, y)), x, y, **kw)
    small.refused = 0
    parted = evaluate_rows(evaluate.build_rows(small, model), x, y, chunk=24, **kw)
    for name in ("base", "hpm/image", "hpm/batch"):
        s, p = sequential.row(name), parted.row(name)
        assert s.per_image == p.per_image, name
        assert s.finals == p.finals, name
    notes = [line for line in lines if "ran out of GPU memory" in line]
    assert len(notes) == 3 and all("on 24 images at once; chunks of at most 8" in n for n in notes)
    assert small.refused == 3  # once per row: the size that fits is kept
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a single batch that does not fit is an error
        evaluate_rows(evaluate.build_rows(SmallMemory(base, most=4), None), x, y, chunk=24, **kw)


@pytest.mark.slow
def test_compiled_head_equals_the_eager_head_in_every_form_an_evaluation_calls():
    """--compile: the head through torch.compile gives the eager head's logits and gradients for
    every mode at once (the fused tuple), both contexts, grouped, and under no_grad; in float64, to
    the double-precision tolerance, with no graph break."""
    eager = make_head(K=4, D=5, seed=3)
    eager.update_prototypes(torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % 4)
    compiled = models.compile_head(copy.deepcopy(eager))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints stay loadable
    counters = torch._dynamo.utils.counters
    counters.clear()
    torch.manual_seed(4)
    z0 = torch.randn(12, 5, dtype=torch.float64)
    w = torch.randn(12, 4, dtype=torch.float64)
    # (each form compiles twice, with and without gradients, for many seconds on a CPU: the two forms
    # that hold every mode and both contexts; the evaluation below compiles the forms it calls)
    forms = [(("fc", "soft", "ste"), "batch", 4, 12), (("fc", "soft", "ste"), "image", None, 8)]
    for mode, context, group, n in forms:
        outs = []
        for head in (eager, compiled):
            z = z0[:n].clone().requires_grad_(True)
            out = head(z, mode=mode, context=context, batch_size=group)
            (grad,) = torch.autograd.grad((out * w[:n]).sum(), z)
            with torch.no_grad():
                plain = head(z0[:n], mode=mode, context=context, batch_size=group)
            outs.append((out.detach(), grad, plain))
        for a, b in zip(*outs):
            torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"{mode} {context} {group} {n}: {m}")
    assert counters["stats"]["unique_graphs"] >= len(forms) and not counters["graph_break"]  # all compiled


@pytest.mark.slow
def test_compile_flag_gives_the_eager_evaluation_per_image(tmp_path, capsys):
    """evaluate.py --compile (the HPM head compiled) writes the same per-image results as without,
    on an HPM model the attacks break, in both contexts and with the strong version's attacks."""
    paths = write_setup(tmp_path, quad_linear(), n=24)
    argv = ["--eps", "0.42", "--steps", "5", "--queries", "30", "--attacks", "apgd-ce/mix,flip/mix"]
    eager = run_evaluate(paths, *argv, "--out", str(tmp_path / "eager.json"))
    compiled = run_evaluate(paths, *argv, "--compile", "--out", str(tmp_path / "compiled.json"))
    assert "torch.compile" in capsys.readouterr().out
    assert compiled.config["compile"] is True
    rows_e, rows_c = rows_of(eager), rows_of(compiled)
    assert {n: r.per_image for n, r in rows_e.items()} == {n: r.per_image for n, r in rows_c.items()}
    hpm_rows = [r for name, r in rows_e.items() if name.startswith("hpm")]
    assert len(hpm_rows) == 2 and all(r.worst_case <= r.clean - 4 / 24 for r in hpm_rows)  # broken images


def test_a_machine_that_cannot_compile_gets_one_line_before_any_file(tmp_path, capsys, monkeypatch):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\n(a second line)")

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_module(self, backend=no_compiler))
    paths = write_setup(tmp_path, quad_linear(), n=8)
    out = tmp_path / "r.json"
    argv = ["--head", paths["head"], "--model", paths["model"], "--data", paths["data"], "--steps", "1",
            "--attacks", "apgd-ce/fc", "--compile", "--out", str(out), "--device", "cpu", "--no-progress"]
    try:
        status = cli.run_cli(evaluate.main, evaluate.parse_args, argv)
    finally:
        torch._dynamo.reset()  # forget the failed compile: later tests compile the head again
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "torch.compile fails on this machine (RuntimeError: no C++ compiler found)" in err
    assert not out.exists()
