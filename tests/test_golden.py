"""The layout, read from the code (what imports what; the results file spelled in its owner alone), and
the golden file that proves a restructuring changed no result.
"""
import ast
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
from hpmkit import checkpoint, cli, models, results
from hpmkit import data as data_module

from conftest import ROOT


def imported_modules(path, depth=1):
    """The module names a file imports (their first `depth` dotted parts), read from its syntax tree."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {".".join(a.name.split(".")[:depth]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(".".join(node.module.split(".")[:depth]))
            if node.module == "hpmkit":  # from hpmkit import loading
                names |= {f"hpmkit.{a.name}" for a in node.names}
    return names


SCRIPTS = ("evaluate", "finetune", "run_mnist", "run_study", "run_dpnp_mnist", "run_theory", "bench")
EXPERIMENTS = ("run_mnist", "run_study", "run_dpnp_mnist", "run_theory", "bench")


def test_no_experiment_imports_another_and_no_file_imports_itself():
    for name in EXPERIMENTS:
        imported = imported_modules(ROOT / "experiments" / f"{name}.py", 2)
        assert not {f"experiments.{other}" for other in EXPERIMENTS} & imported, name
        assert "experiments.common" in imported or name == "bench", name
    for path in [*ROOT.glob("*.py"), *(ROOT / "hpmkit").glob("*.py"), *(ROOT / "experiments").glob("*.py"),
                 *(ROOT / "tests").glob("*.py")]:
        own = {path.stem, f"{path.parent.name}.{path.stem}"}
        assert not own & imported_modules(path, 2), path


def test_scripts_do_not_import_each_other_and_share_only_the_head_and_hpmkit():
    ev, ft = imported_modules(ROOT / "evaluate.py", 2), imported_modules(ROOT / "finetune.py", 2)
    assert "finetune" not in ev and "evaluate" not in ft
    shared = {m for m in ev & ft if m == "hpm" or m.startswith("hpmkit")}
    assert {"hpmkit.cli", "hpmkit.data", "hpmkit.models", "hpmkit.checkpoint"} <= shared
    assert (ev & ft) - shared <= {"argparse", "dataclasses", "os", "sys", "time", "torch", "torch.nn",
                                  "torch.nn.functional"}
    owners = {"load_model": models, "load_data": data_module, "read_head": checkpoint, "CLIError": cli}
    for name, owner in owners.items():
        for script in (finetune, evaluate):
            assert not hasattr(script, name) or getattr(script, name) is getattr(owner, name), (script, name)


CODE = [ROOT / "evaluate.py", ROOT / "finetune.py", ROOT / "hpm.py", *sorted((ROOT / "hpmkit").glob("*.py"))]


def test_the_results_layout_is_spelled_in_its_owner_alone():
    """hpmkit/results.py reads and writes the results file; nothing else names its bookkeeping keys
    or subscripts a row by the file's nesting (["hpm"], ["correct"])."""
    files = CODE + sorted((ROOT / "experiments").glob("*.py")) + [ROOT / "test_hpm.py"]
    files += sorted((ROOT / "tests").glob("*.py"))
    assert ROOT / "tests" / "conftest.py" in files
    found = []
    for path in files:
        if path.name == "results.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in results.BOOKKEEPING:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
            if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                    and node.slice.value in ("hpm", "correct")):
                found.append(f"{path.name}:{node.lineno} [{node.slice.value!r}]")
    assert not found, found


def test_no_supporting_module_imports_a_script():
    for path in sorted((ROOT / "hpmkit").glob("*.py")):
        imported = {m.split(".")[0] for m in imported_modules(path)}
        assert not imported & set(SCRIPTS), (path.name, imported & set(SCRIPTS))
        assert imported <= {"hpm", "hpmkit", "torch", "pyautoattack", "numpy", "scipy", "robustbench",
                            "torchvision", "tqdm", "autoattack",
                            "matplotlib"} | set(sys.stdlib_module_names), path.name  # (report.py's plot)


def load_make_golden():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "testdata" / "golden" / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_golden_file_every_per_image_result_and_head_tensor_unchanged(tmp_path):
    """testdata/golden/golden.pt was written by make_golden.py from the code before the settings,
    the attack catalogue and the results' owner moved (issue 28): the same command lines must
    give every tensor of each fine-tuned head (HPM, HPM in L2 with the non-default choices, NCM,
    Adv-DPNP) and every per-image result of every evaluation (both versions, every attack of
    the catalogue with restarts and the checks, L2, the controls), exactly."""
    golden = torch.load(ROOT / "testdata" / "golden" / "golden.pt", weights_only=True)
    if golden["torch"] != str(torch.__version__):
        pytest.skip(f"golden file from torch {golden['torch']}, this is {torch.__version__}: "
                    "float results may differ across versions; rerun make_golden.py on the older commit")
    make_golden = load_make_golden()
    now = make_golden.compute(str(tmp_path), heads=make_golden.head_files())
    assert golden["head"].keys() == now["head"].keys()
    for head, tensors in golden["head"].items():
        assert tensors.keys() == now["head"][head].keys(), head
        for name, tensor in tensors.items():
            assert torch.equal(tensor, now["head"][head][name]), (head, name)
    assert golden["eval"].keys() == now["eval"].keys()
    for evaluation, rows in golden["eval"].items():
        assert rows.keys() == now["eval"][evaluation].keys(), evaluation
        for row, record in rows.items():
            new = dict(now["eval"][evaluation][row])
            if "checks" in record:  # checks added since (context sensitivity) are not compared
                new["checks"] = {k: v for k, v in new["checks"].items() if k in record["checks"]}
            assert record == new, (evaluation, row)
    every = golden["eval"]["all"]["hpm/batch"]
    assert len(every["attacks"]) == 28 and "runs" in every["checks"]
    assert {"joint/soft", "target/mix"} <= set(golden["eval"]["strong"]["hpm/batch"]["attacks"])
    kofb = golden["eval"]["attackers"]["hpm/attackers-4"]  # K of B, with a short last batch
    assert len(kofb["attacker_slots"]) == 60 and {"benign:victim/mix", "benign:square"} <= set(kofb["attacks"])
