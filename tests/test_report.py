"""What a run prints and writes beside its results (hpmkit/report.py, hpmkit/cli.py,
hpmkit/autoattack.py): AutoAttack's warnings summed, the version line, the cost estimate, a
progress line per job, and OUT.md and OUT.png, refused where a file of that name is not
evaluate.py's.
"""
import re
import subprocess
import sys
import types

import pytest
import torch
import torch.nn as nn

import evaluate
from hpmkit import autoattack, catalogue, engine, report
from hpmkit.catalogue import CATALOGUE, Setting

from conftest import (ROOT, quad_data, quad_linear, Quantize, fitted_hpm, write_setup, run_evaluate, read_results,
                      rows_of, evaluate_rows, masked_head_model, sweep, with_flag, run_script, refused)


@pytest.mark.slow
def test_a_redirected_log_stays_short_with_the_table_intact(tmp_path):
    """Output to a file: no progress-bar fragments, AutoAttack's per-batch warnings as one
    counted line per attack (the masked model makes DLR see zero gradients in every batch)."""
    x, y = quad_data(64)
    base, hpm_model = masked_head_model(x, y)
    paths = write_setup(tmp_path, base, n=64, head=hpm_model)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--head", paths["head"],
                               "--model", paths["model"], "--data", paths["data"], "--device", "cpu",
                               "--n-examples", "64",
                               "--eps", "0.45", "--steps", "4", "--queries", "5", "--out",
                               str(tmp_path / "r.json")], stdout=f, stderr=subprocess.STDOUT,
                              timeout=600, cwd=tmp_path)
    text = log.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert len(lines) < 100 and "\r" not in text
    assert sum("zero gradient at" in ln for ln in lines) <= len(catalogue.HPM_ATTACKS) * 2
    assert any(ln.startswith("worst case") for ln in lines) and lines[-1].startswith("results: ")
    results = read_results(tmp_path / "r.json")
    warned = results.row("hpm/image").warnings
    assert any(re.fullmatch(r"zero gradient at \d+ points in all, over \d+ APGD runs? that found any .*", w)
               for w in warned.values())


def test_alike_warnings_are_summed_and_no_placeholder_is_left():
    """AutoAttack's own messages (checks.py), fed as its APGD feeds them: the zero-gradient
    warnings of runs with 3, 1 and 5 such images become one entry, 9 points over 3 runs; a
    message without numbers is counted; no "N" stands in for a number."""
    from pyautoattack import checks as aa_checks
    counter = autoattack.WarningCounter()
    for k in (3, 1, 5):
        grad = torch.ones(8, 1, 2, 2)
        grad[:k] = 0
        aa_checks.check_zero_gradients(grad, logger=counter)
    aa_checks.check_zero_gradients(torch.ones(8, 1, 2, 2), logger=counter)  # none: no warning
    for _ in range(2):
        aa_checks.check_range_output(lambda x: torch.full((len(x), 4), 0.25), torch.zeros(2, 1), logger=counter)
    summary = counter.summary()
    assert summary.startswith("zero gradient at 9 points in all, over 3 APGD runs that found any")
    assert "it seems that the output is a probability distribution, please be sure that the logits are used " \
           "(2 warnings)" in summary
    assert not re.search(r"\bN\b", summary)


def test_a_runs_zero_gradient_warning_sums_the_images_of_every_batch():
    """Through evaluate: APGD-DLR on a quantised-input model (zero gradient everywhere) warns once per
    fixed batch, each time for every image it attacks (the correct ones); the printed line and the
    JSON's library_warnings hold the same text, with the images and batches counted independently."""
    x, y = quad_data(24)
    base = nn.Sequential(Quantize(10), *quad_linear())
    log = []
    res = evaluate_rows(evaluate.build_rows(base), x, y, ["apgd-dlr/fc"], batch_size=8, eps=0.1, steps=2,
                        log=log.append)
    with torch.no_grad():
        correct = int((base(x.float() / 255).argmax(1) == y).sum())
    text = res.row("base").warnings["apgd-dlr"]
    assert text.startswith(f"zero gradient at {correct} points in all, over 3 APGD runs")
    assert any(ln.endswith(f"AutoAttack warned: {text}") for ln in log)


def version_cfg(**changes):
    """What resolve_config makes of evaluate.py's defaults (version strong), with changes."""
    strong = evaluate.VERSIONS["strong"]
    cfg = dict(version="strong", attacks=list(strong["attacks"]), steps=strong["steps"], queries=5000, restarts=1,
               score_queries=strong["score_queries"])
    return types.SimpleNamespace(**{**cfg, **changes})


def test_the_version_line_names_exactly_the_flags_that_changed_the_version():
    rows = evaluate.build_rows(quad_linear(), fitted_hpm(quad_linear(), *quad_data(8)))
    default = evaluate.VERSIONS["strong"]
    lines = report.version_line(version_cfg(), default, rows)
    assert lines[0] == ("version strong: the paper's attacks plus APGD-T (fc and mix surrogates) and the adaptive "
                        "flip attack, 100 APGD steps, every query of a whole fixed batch scored on the real model, "
                        "and in the batch context a Square that queries whole fixed batches only and the batch as "
                        "the adversary's (joint, then target on every image left standing)")  # no flag named
    lines = report.version_line(version_cfg(steps=10), default, rows)
    assert lines[0].startswith("version strong, changed by --steps: 10 APGD steps, the version's 100;")
    assert "--attacks" not in lines[0] and "--queries" not in lines[0]
    lines = report.version_line(version_cfg(attacks=["apgd-ce/fc", "apgd-cw/mix"], queries=7), default, rows)
    assert lines[0].startswith("version strong, changed by --attacks, --queries: 1 of the version's 14 attacks "
                               "and apgd-cw/mix; 7 Square queries, the version's 5000;")
    # then each row with what it runs, as ModelUnderTest.attacks gives it
    assert lines[1:] == ["  base       apgd-ce, apgd-cw", "  hpm/batch  apgd-ce/fc, apgd-cw/mix",
                         "  hpm/image  apgd-ce/fc, apgd-cw/mix"]


def test_a_base_only_run_names_the_base_models_attacks_alone(tmp_path, capsys):
    """--model and --dataset without --head, only --steps changed: the header names --steps alone and
    the base model's four attacks, no HPM surrogate; the JSON's first notes are those lines."""
    paths = write_setup(tmp_path, quad_linear(), n=8)
    res = evaluate.main(evaluate.parse_args(["--model", paths["model"], "--dataset", "mnist", "--data", paths["data"],
                                             "--steps", "2", "--queries", "5000", "--device", "cpu", "--no-progress",
                                             "--n-examples", "8", "--eps", "0.05", "--out", str(tmp_path / "r.json")]))
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["version strong, changed by --steps: 2 APGD steps, the version's 100; every query of a "
                       "whole fixed batch scored on the real model", "  base  apgd-ce, apgd-dlr, apgd-t, square"]
    assert res.data["notes"][:2] == out[:2]


COST_ATTACKS = ["apgd-ce/mix", "apgd-dlr/fixed", "apgd-t/fc", "apgd-t/ste", "flip/mix", "square", "joint/soft",
                "target/mix", "own:apgd-ce/soft", "benign:spread/mix", "benign:square", "benign:victim/mix"]


def test_the_cost_estimate_is_exact_for_whole_batch_attacks_and_an_upper_bound_otherwise():
    """Each attack's modelled backbone passes per image (catalogue.Attack.cost) against what
    engine.BackboneCounter measured (the results' backbone_passes_per_image) in a run where some images
    fall and others stand (the quadrant toy at eps 0.4, 2 restarts, 4 classes: APGD-T's 3 targets):
    equal where it says exact (every APGD run on whole batches, flip, own), never below the measured
    where it says "at most" (Square, the batch adversary, spread, victim, AutoAttack's perturb)."""
    x, y = quad_data(16)
    base = quad_linear()
    rows = evaluate.build_rows(base, fitted_hpm(base, x, y), attackers=(3,), attacker_eps=0.4)
    kw = dict(eps=0.4, steps=2, queries=6, restarts=2, score_queries=True)
    res = evaluate_rows(rows, x, y, COST_ATTACKS, batch_size=8, **kw)
    setting = Setting("Linf", fixed_batch_square=True, **kw)
    exact = bound = 0
    for row in rows:
        rr = res.row(row.name)
        assert 0 < rr.worst_case < 1 or row.attackers, row.name  # neither all fooled nor all standing
        for attack in row.attacks(COST_ATTACKS):
            cost, measured = attack.cost(setting, 8, 4, row.whole_batch(attack)), rr.passes_per_image(attack.name)
            if cost.bound:
                assert cost.passes >= measured, (row.name, attack.name, cost, measured)
                bound += 1
            else:
                assert cost.passes == measured, (row.name, attack.name, cost, measured)
                exact += 1
    assert exact >= 10 and bound >= 10
    # target/mix: one copy of its batch per image standing, so fewer passes than the bound for all
    t = CATALOGUE["target/mix"].cost(setting, 8, 4)
    assert res.row("hpm/batch").passes_per_image("target/mix") < t.passes


def test_the_plan_prints_the_cost_per_row_and_a_progress_line_after_every_job():
    """In process: the estimate (per row, in all; "at most" where a bound is in it), then [k/N] for
    k = 1..N, N the jobs run (every row's clean pass and attacks), each with its time and the time left."""
    x, y = quad_data(16)
    base = quad_linear()
    rows = evaluate.build_rows(base, fitted_hpm(base, x, y), contexts=("batch",))
    log = []
    res = evaluate_rows(rows, x, y, ["apgd-ce/mix", "square"], batch_size=8, eps=0.36, steps=2, queries=4,
                        log=log.append)
    assert log[0].startswith("estimated cost in backbone passes per image, 16 images")
    # by hand: the base model's clean pass 1; APGD-CE by AutoAttack's perturb (a clean pass, a start and 2
    # steps on the images still correct, the final batch scored) at most 5; Square (4 queries, a pass
    # before and after them, the start, the scoring) at most 8. HPM: 1; APGD on whole batches 4; Square 8.
    assert re.fullmatch(r"  base +2 attacks \+ clean +at most 14", log[1]), log[1]
    assert re.fullmatch(r"  hpm/batch +2 attacks \+ clean +at most 13", log[2]), log[2]
    assert re.fullmatch(r"  in all +at most 27", log[3]), log[3]
    progress = [ln for ln in log if ln.startswith("[")]
    n = sum(1 + len(r.accuracies) for r in rows_of(res).values())
    assert n == 6 and [ln.split("]")[0] for ln in progress] == [f"[{k}/{n}" for k in range(1, n + 1)]
    assert all(re.search(r"\(\d+\.\d s; run \d+\.\d (s|min), about \d+\.\d (s|min|h) left\)$", ln)
               for ln in progress), progress
    # after the first job, the clean pass, the whole run's time in minutes at the clean pass's rate
    estimate = log[log.index(progress[0]) + 1]
    assert re.fullmatch(r"estimated time: (about \d+(\.\d)?|under 0\.1) min \(from the clean pass: [\d.]+ ms per "
                        r"image pass; rough: .*\)", estimate), estimate
    assert sum(ln.startswith("estimated time") for ln in log) == 1


def test_a_chunk_recorded_in_parts_is_done_only_as_far_as_its_parts_reach():
    """Under torchrun a chunk that ran out of GPU memory is recorded in parts, each a ledger entry
    from its first batch: a rerun continues such a chunk where its last recorded part ends."""
    entries = {"0": {"end": 2}, "2": {"end": 3}, "6": {"end": 8}}
    assert engine.chained(entries, 0, 4) == 3  # parts 0-1 and 2 done, batch 3 left
    assert engine.chained(entries, 4, 6) == 4  # nothing of this chunk done
    assert engine.chained(entries, 6, 8) == 8  # done whole


@pytest.mark.slow
def test_a_redirected_log_has_a_progress_line_for_every_job(tmp_path):
    """evaluate.py with stdout to a file (block-buffered unless flushed): the cost estimate after
    the header, then one [k/N] line per job in order, k = 1..N, N the clean passes and attacks the
    results hold, each with the run's elapsed time and the time left."""
    paths = write_setup(tmp_path, quad_linear(), n=16)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--head", paths["head"], "--model",
                               paths["model"], "--data", paths["data"], "--device", "cpu", "--n-examples", "16",
                               "--eps", "0.36", "--steps", "2", "--queries", "5", "--attacks",
                               "apgd-ce/mix,square,own:apgd-ce/fc", "--attackers", "2", "--out", str(tmp_path / "r.json")],
                              stdout=f, stderr=subprocess.STDOUT, timeout=300, cwd=tmp_path)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, lines
    progress = [ln for ln in lines if re.match(r"\[ *\d+/\d+\] ", ln)]
    jobs = sum(1 + len(r.accuracies) for r in rows_of(read_results(tmp_path / "r.json")).values())
    assert jobs == 11 and [re.match(r"\[ *(\d+)/(\d+)\]", ln).groups() for ln in progress] == [
        (str(k), str(jobs)) for k in range(1, jobs + 1)]
    assert all(re.search(r"; run \d+\.\d (s|min), about \d+\.\d (s|min|h) left\)$", ln) for ln in progress)
    first = lines.index(progress[0])
    assert any(ln.startswith("estimated cost in backbone passes per image") for ln in lines[:first])


def md_tables(text):
    """{title: (header, rows)} of the Markdown tables under bold titles."""
    out, title = {}, None
    for ln in text.splitlines():
        if ln.startswith("**"):
            title = ln.strip("*")
        elif ln.startswith("| ") and title:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip()[1:-1])]
            if title not in out:
                out[title] = (cells, [])
            else:
                out[title][1].append(cells)
    return out


def test_the_markdown_table_holds_the_jsons_numbers_and_the_plot_carries_the_marker(tmp_path):
    x, y = quad_data(16)
    paths = write_setup(tmp_path, quad_linear(), n=16)
    res = run_evaluate(paths, "--eps", "0.36", "--steps", "2", "--queries", "4", "--attacks",
                       "apgd-ce/mix,square,own:apgd-ce/fc", "--attackers", "2", "--out", str(tmp_path / "r.json"))
    text = (tmp_path / "r.md").read_text()
    assert text.splitlines()[0] == "<!-- written by evaluate.py beside r.json: evaluate.py replaces this file, " \
                                   "never one without this line -->"
    tables = md_tables(text)
    header, body = tables["every attack, accuracy (%)"]
    titles = {v: k for k, v in report.TITLES.items()}
    seen = 0
    for cells in body:
        for title, cell in zip(header[1:], cells[1:]):
            rr = res.row(titles[title])
            v = rr.worst_case if cells[0] == "worst case" else rr.accuracy(cells[0])
            assert cell == ("n/a" if v is None else f"{100 * v:.2f}"), (title, cells)
            seen += v is not None
    assert seen == 12  # clean, square and the worst case of 3 rows; apgd-ce (base), apgd-ce/mix (2 HPM rows)
    header, body = tables["accuracy (%); robust: the worst case over all attacks"]
    for cells in body:
        rr, base = res.row(titles[cells[0]]), res.row("base")
        assert cells[1] == f"{100 * rr.clean:.2f}" and cells[3] == f"{100 * rr.worst_case:.2f}"
        assert cells[4] == ("" if cells[0] == "base" else f"{100 * (rr.worst_case - base.worst_case):+.2f}")
    (header, body), = [tables[t] for t in tables if t.startswith("attacker slots")]
    rr = res.row("hpm/attackers-2")
    assert header == ["attack", "2 of 8: own", "benign"] and body[1][0] == "own:apgd-ce/fc"
    assert body[1][1:] == [f"{100 * rr.by_role('own:apgd-ce/fc', r):.2f}" for r in ("own", "benign")]
    png = (tmp_path / "r.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and b"Software\x00evaluate.py" in png and b"Source\x00r.json" in png


@pytest.mark.parametrize("name", ["r.md", "r.png"])
def test_a_file_not_evaluates_where_it_writes_beside_is_refused_and_its_own_replaced(tmp_path, capsys, name):
    ev, _ = sweep(tmp_path)
    (tmp_path / name).write_text("my notes\n")
    refused(tmp_path, capsys, "evaluate", ev, rf"{name} exists and is not the (table|plot) evaluate.py writes "
                                              r"beside .*r.json: it is never replaced")
    (tmp_path / name).unlink()
    assert run_script("evaluate", ev, capsys)[0] == 0
    mine = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(mine + b"\n")  # edited, the marker kept: still evaluate.py's
    assert run_script("evaluate", ev, capsys)[0] == 0
    assert (tmp_path / name).read_bytes() == mine  # written again from the results
    other = with_flag(ev, "--out", str(tmp_path / "r"))  # r.md and r.png, but written beside r.json, not r
    refused(tmp_path, capsys, "evaluate", other, r"r\.(md|png) exists and is not the (table|plot) evaluate.py writes")


def test_a_row_that_ran_no_attack_says_so_instead_of_a_robust_accuracy(tmp_path, capsys):
    """--attacks only the attacker rows': the base and HPM rows run none, so their robust column reads
    "no attack" in the printed table and in OUT.md (the JSON keeps its worst case, the clean one), and
    no table of every attack is shown for them (it would hold their clean accuracy and "no attack")."""
    paths = write_setup(tmp_path, quad_linear(), n=16)
    res = run_evaluate(paths, "--eps", "0.36", "--steps", "2", "--attacks", "own:apgd-ce/fc", "--attackers", "2",
                       "--contexts", "batch", "--out", str(tmp_path / "r.json"))
    assert res.row("base").worst_case == res.row("base").clean == 1.0
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"base +100\.0 +no attack", [ln for ln in out if ln.startswith("base ")][-1])
    assert re.fullmatch(r"HPM \(batch\) +100\.0 +\+0\.0 +no attack", [ln for ln in out if ln.startswith("HPM (batch)")][-1])
    assert "every attack, accuracy (%)" not in out
    assert [ln for ln in out if ln.startswith("worst case")] and not [  # (the attacker slots' table has one)
        ln for ln in out if ln.startswith("worst case") and "no attack" in ln]
    tables = md_tables((tmp_path / "r.md").read_text())
    assert "every attack, accuracy (%)" not in tables
    assert tables["accuracy (%); robust: the worst case over all attacks"][1] == [
        ["base", "100.00", "", "no attack", ""], ["HPM (batch)", "100.00", "+0.00", "no attack", ""]]
