"""The experiments: the paper's sensitivity analysis (experiments/theory.py, Eq. 3-13) against
independent computations; the MNIST miniature end to end, reduced (--quick), every stage leaving its
artefacts with numbers that agree; the study; Adv-DPNP's run; the theory run; the figures.
"""
import gzip
import json
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
from experiments import common, run_dpnp_mnist, run_mnist, run_study, run_theory
from hpmkit import catalogue
from hpmkit.checkpoint import read_head

from conftest import ROOT, read_results


# The paper's sensitivity analysis (Eq. 3-13), each function against an independent computation --

def test_eq3_equals_its_definition_and_its_angle_form():
    from experiments import theory

    rng = np.random.default_rng(0)
    for _ in range(200):
        z, w, eps = rng.standard_normal((3, 12))
        by_definition = abs((z + eps) @ w - z @ w) / abs(z @ w)
        cos_c = z @ w / (np.linalg.norm(z) * np.linalg.norm(w))
        cos_g = eps @ w / (np.linalg.norm(eps) * np.linalg.norm(w))
        assert theory.sensitivity_fc(z, w, eps) == pytest.approx(by_definition, rel=1e-12)
        assert theory.sensitivity_fc_from_angles(np.linalg.norm(z), np.linalg.norm(eps), cos_c, cos_g) == \
            pytest.approx(by_definition, rel=1e-9)


def test_eq5_bounds_the_l2_sensitivity_and_is_reached_along_z_minus_w():
    from experiments import theory

    rng = np.random.default_rng(1)
    for _ in range(50):
        z, w = rng.standard_normal((2, 10))
        size = rng.uniform(0.01, 2.0)
        cos_d = z @ w / (np.linalg.norm(z) * np.linalg.norm(w))
        sup = theory.sup_sensitivity_l2(np.linalg.norm(z), np.linalg.norm(w), cos_d, size)
        directions = rng.standard_normal((500, 10))
        eps = size * directions / np.linalg.norm(directions, axis=1, keepdims=True)
        assert max(theory.sensitivity_l2(z, w, e) for e in eps) <= sup * (1 + 1e-12)
        along = size * (z - w) / np.linalg.norm(z - w)
        assert theory.sensitivity_l2(z, w, along) == pytest.approx(sup, rel=1e-10)


def test_eq7_implies_eq6_under_equal_norms_and_not_without():
    """With ||z|| and ||eps|| the same under both classifiers (the paper's assumption), every
    random tuple meeting Eq. 7 meets Eq. 6. Without it (the FC feature 10 times longer than the
    l2 one), Eq. 7 holds and Eq. 6 fails in some tuples: the implication needs the assumption."""
    from experiments import theory

    rng = np.random.default_rng(2)
    held, broken, counted = 0, 0, 0
    for _ in range(4000):
        z, w_c, w_d, eps_c, eps_d = rng.standard_normal((5, 6))
        unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
        z_d = unit(rng.standard_normal(6)) * np.linalg.norm(z)  # the same norm, another direction
        eps_d = unit(eps_d) * np.linalg.norm(eps_c)
        cos_c, cos_g = unit(z) @ unit(w_c), unit(eps_c) @ unit(w_c)
        sin_d = math.sqrt(max(0.0, 1 - (unit(z_d) @ unit(w_d)) ** 2))
        if theory.sufficient_condition(cos_c, cos_g, sin_d):
            counted += 1
            held += theory.fc_at_least_as_sensitive(z, w_c, eps_c, z_d, w_d, eps_d)
            broken += not theory.fc_at_least_as_sensitive(10 * z, w_c, eps_c, z_d, w_d, eps_d)
    assert counted >= 100 and held == counted
    assert broken >= 1


@pytest.mark.parametrize("d", [3, 10, 64, 512])
def test_eq10_densities_integrate_to_one_and_match_uniform_directions(d):
    from scipy import integrate

    from experiments import theory

    assert integrate.quad(lambda e: theory.density_cos(e, d), -1, 1, limit=200)[0] == pytest.approx(1, abs=1e-7)
    assert integrate.quad(lambda t: float(theory.density_sin(math.sin(t), d)) * math.cos(t), 0, math.pi / 2,
                          limit=200)[0] == pytest.approx(1, abs=1e-7)  # tau = sin t
    rng = np.random.default_rng(d)
    n = 20000
    u = rng.standard_normal((n, d))
    cos = u[:, 0] / np.linalg.norm(u, axis=1)  # the angle between a uniform direction and e_1
    sin = np.sqrt(1 - cos ** 2)

    def ks(angles, density_of_angle):
        """KS distance of sampled angles t from the CDF integrated (trapezoids) from a density in t."""
        ts = np.sort(angles)
        grid = np.linspace(0, math.pi / 2 if ts.max() <= math.pi / 2 else math.pi, 20001)
        pdf = np.array([density_of_angle(g) for g in grid])
        cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(grid))])
        model = np.interp(ts, grid, cdf)
        return np.max(np.maximum(np.arange(1, n + 1) / n - model, model - np.arange(n) / n))
    critical = 1.63 / math.sqrt(n)  # Kolmogorov-Smirnov, 1%
    # cos theta = cos(t), t in [0, pi]; sin theta = sin(t), t in [0, pi/2]: the densities in t
    assert ks(np.arccos(cos), lambda t: float(theory.density_cos(math.cos(t), d)) * math.sin(t)) < critical
    assert ks(np.arcsin(sin), lambda t: float(theory.density_sin(math.sin(t), d)) * math.cos(t)
              if t < math.pi / 2 else 0.0) < critical


@pytest.mark.parametrize("d", [2, 8, 64, 512])
def test_cdf_isotropic_matches_monte_carlo_over_uniform_directions(d):
    from experiments import theory

    rng = np.random.default_rng(100 + d)
    n = 40000
    u, v = rng.standard_normal((2, n, d))
    cos_c = u[:, 0] / np.linalg.norm(u, axis=1)
    sin_d = np.sqrt(1 - (v[:, 0] / np.linalg.norm(v, axis=1)) ** 2)
    x = np.abs(cos_c) / sin_d
    for c in (0.02, 0.1, 0.3, 0.7, 1.0, 1.5):
        p = (x <= c).mean()
        se = max(math.sqrt(p * (1 - p) / n), 1 / n)
        assert abs(theory.cdf_isotropic(c, d) - p) <= 4 * se, (d, c)


def test_eq11_as_printed_is_half_the_cdf():
    """The relation found: Eq. 11's constant is 2 Gamma^2(d/2) / (pi Gamma^2((d-1)/2)) where the
    supplementary's Eq. 28 has 4: as printed it is F_X(c) / 2 exactly (c <= 1)."""
    from experiments import theory

    for d in (2, 5, 16, 128):
        for c in (0.05, 0.3, 0.9, 1.0):
            assert theory.cdf_isotropic_as_printed(c, d) == pytest.approx(theory.cdf_isotropic(c, d) / 2,
                                                                           rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("which", ["paper", "wide"])
def test_cdf_empirical_matches_monte_carlo_from_the_eq12_mixture(which):
    from experiments import theory

    stats_ = theory.PAPER_RESNET50 if which == "paper" else theory.angle_stats(
        (60, 15, 95, 10, 0.3), (70, 20, 100, 12, 0.2))  # broader angles: the CDF spans (0, 1)
    rng = np.random.default_rng(7)
    n = 100000
    x = np.abs(np.cos(theory.sample_angles(n, *stats_["c"], rng))) / np.abs(
        np.sin(theory.sample_angles(n, *stats_["d"], rng)))
    for c in (0.05, 0.1, 0.2, 0.4, 0.7, 1.0):
        p = (x <= c).mean()
        se = max(math.sqrt(p * (1 - p) / n), 1 / n)
        assert abs(theory.cdf_empirical(c, stats_) - p) <= 4 * se, (which, c)


# The MNIST miniature end to end, reduced (--quick) -------------------------------------------
# Every stage leaves its artefacts and the numbers agree with each other and with independent
# recomputations; the study; Adv-DPNP's run; the theory run; the figures.


QUICK = run_mnist.SETTINGS["quick"]
def committed():
    """True in a git checkout without changes to tracked files (CI's fresh clone of main)."""
    if not (ROOT / ".git").exists():
        return False
    status = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True)
    return status.returncode == 0 and not status.stdout.strip()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One reduced run shared by the tests below, run as a new user runs it: the README's main-job
    command, in a fresh clone into an empty folder with nothing beside it (on a checkout with
    uncommitted changes, in the checkout itself). Its output folder, with its stdout.txt."""
    command = re.search(r"^(python -m experiments\.run_mnist --quick)\s", (ROOT / "README.md").read_text(),
                        re.M).group(1)
    folder = tmp_path_factory.mktemp("fresh")
    if committed():
        cwd, out = folder / "clone", folder / "clone" / "runs" / "mnist-quick"  # (the quick form's default)
        subprocess.run(["git", "clone", "-q", str(ROOT), str(cwd)], check=True)
        argv = command.split()[1:]
    else:
        cwd, out = ROOT, folder / "mnist"
        argv = command.split()[1:] + ["--out-dir", str(out)]
    proc = subprocess.run([sys.executable, *argv, "--device", "cpu"], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def rows(results):
    return results.rows()


def write_idx(path, array):
    """An idx file written independently of run_mnist.read_idx (magic 2051 images, 2049 labels)."""
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.slow
def test_every_stage_writes_its_artefacts(quick):
    for name in ("train.npz", "heldout.npz", "cnn_fc.pt", "cnn_l2.pt", "cnn_fc_at.pt", "fig1.md",
                 "fig1.json", "fig1.png", "head.pt", "finetune.log", "results.json", "evaluate.log",
                 "results_paper.json", "evaluate_paper.log",
                 "table1.md", "summary.md"):
        assert (quick / name).is_file() and (quick / name).stat().st_size > 0, name
    for name, n in (("train.npz", QUICK["n_train"]), ("heldout.npz", 10000 - QUICK["split"])):
        with np.load(quick / name) as f:
            assert f["x"].dtype == np.uint8 and f["x"].shape == (n, 1, 28, 28)
            assert f["y"].dtype == np.int64 and f["y"].shape == (n,)
    for name in ("cnn_fc.pt", "cnn_l2.pt", "cnn_fc_at.pt"):
        assert isinstance(torch.load(quick / name, weights_only=False), common.SmallCNN)
    ckpt = read_head(str(quick / "head.pt"))  # what evaluate.py reads
    assert ckpt["finished"] and ckpt["dataset"] == "mnist"
    assert (quick / "fig1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = read_results(quick / "results.json")
    assert results.complete and results.config["checks"]
    summary = (quick / "summary.md").read_text()
    for text in ("Fig. 1 in miniature", "Table 1 in miniature", "python finetune.py --model",
                 "python evaluate.py --head", "eps_sweep", "the base model here", "--version paper"):
        assert text in summary, text


@pytest.mark.slow
def test_the_strong_version_is_never_above_the_paper_version_on_mnist(quick):
    strong = read_results(quick / "results.json")
    paper = read_results(quick / "results_paper.json")
    assert (strong.version, paper.version) == ("strong", "paper")
    assert strong.subset["indices"] == paper.subset["indices"]
    table = (quick / "summary.md").read_text()
    for name in rows(strong):
        s, p = rows(strong)[name], rows(paper)[name]
        assert s.clean == p.clean
        # the strong suite contains the paper's attacks (with queries scored), so per image it can
        # only be less robust; and the summary table shows both numbers
        assert all(a <= b for a, b in zip(s.correct("worst_case"), p.correct("worst_case"))), name
        assert f"{100 * s.worst_case:.1f}" in table and f"{100 * p.worst_case:.1f}" in table


@pytest.mark.slow
def test_the_quick_main_job_uses_a_real_model_and_lands_within_a_few_points_of_the_full_run(quick):
    """The quick run's adversarially trained model is the embedded one, at least 90% correct on the
    5,000 held-out images; its worst case per row lies within 5 points of the full run's
    (assets/mnist/results.json, the committed run of python -m experiments.run_mnist) on the same
    128 images (its subset a prefix of the full run's); and its output says what it is and is not."""
    with np.load(quick / "heldout.npz") as f:
        x, y = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    assert common.accuracy(common.embedded_model(), x, y, "cpu") >= 0.90
    quick_res, full = read_results(quick / "results.json"), read_results(ROOT / "assets" / "mnist" / "results.json")
    position = {v: i for i, v in enumerate(full.subset["indices"])}
    assert all(i in position for i in quick_res.subset["indices"]) and quick_res.subset["n"] == 128
    for name in ("base", "hpm/batch", "hpm/image"):
        full_wc = full.row(name).correct("worst_case")
        same = [full_wc[position[i]] for i in quick_res.subset["indices"]]
        assert abs(quick_res.row(name).worst_case - sum(same) / len(same)) <= 0.05, name
    stdout = (quick / "stdout.txt").read_text()
    assert stdout.startswith("The quick form of the main job") and "It is not the MNIST miniature" in stdout


@pytest.mark.slow
def test_splits_are_the_seeded_permutation_of_the_test_set(quick):
    x = common.read_idx(common.MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    y = common.read_idx(common.MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    perm = np.random.default_rng(0).permutation(10000)
    n_tr, split = QUICK["n_train"], QUICK["split"]
    with np.load(quick / "train.npz") as tr, np.load(quick / "heldout.npz") as ho:
        np.testing.assert_array_equal(tr["x"][:, 0], x[perm[:n_tr]])
        np.testing.assert_array_equal(tr["y"], y[perm[:n_tr]])
        # held out: every image after the embedded model's training part, so that no model of either
        # run ever trained on one
        np.testing.assert_array_equal(ho["x"][:, 0], x[perm[split:]])
        np.testing.assert_array_equal(ho["y"], y[perm[split:]])


@pytest.mark.slow
def test_each_row_runs_its_versions_attacks_and_table1_reports_the_file(quick):
    results = read_results(quick / "results.json")
    table = (quick / "table1.md").read_text()
    attacks = evaluate.VERSIONS[results.version]["attacks"]
    per_image = [a for a in attacks if a not in catalogue.BATCH_ADVERSARY]  # it needs a batch that decides
    base_kinds = {a.split("/")[0] for a in per_image if a != "flip/mix"}  # flip needs an HPM head
    for name, r in rows(results).items():
        expected = {"base": base_kinds, "hpm/image": set(per_image), "hpm/batch": set(attacks)}[name]
        assert set(r.accuracies) == expected, name
        assert f"| {100 * r.worst_case:.1f} |" in table, name


@pytest.mark.slow
def test_fig1_falls_with_eps_from_the_clean_accuracy(quick):
    fig = json.loads((quick / "fig1.json").read_text())
    assert fig["eps"][0] == 0 and fig["eps"] == sorted(fig["eps"])
    with np.load(quick / "heldout.npz") as f:
        x = torch.from_numpy(f["x"][:fig["n"]]).double() / 255
        y = torch.from_numpy(f["y"][:fig["n"]])
    for name in ("fc", "l2"):
        acc = fig["accuracy"][name]
        assert len(acc) == len(fig["eps"]) and all(0 <= a <= 1 for a in acc)
        assert all(b <= a + 0.02 for a, b in zip(acc, acc[1:])), (name, acc)  # monotone within 2%
        model = torch.load(quick / fig["models"][name], weights_only=False).double().eval()
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).double().mean().item()  # float64, one batch
        assert acc[0] == pytest.approx(clean, abs=0.5 / fig["n"]), name  # the same images


@pytest.mark.slow
def test_standard_layout_trains_on_the_training_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    x_train, y_train = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    x_test, y_test = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    write_idx(raw / "train-images-idx3-ubyte", x_train)  # plain and gzip files may mix
    write_idx(raw / "train-labels-idx1-ubyte.gz", y_train)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", x_test)
    write_idx(raw / "t10k-labels-idx1-ubyte", y_test)
    xtr, ytr, xho, yho, _ = common.make_splits(tmp_path, run_mnist.SETTINGS["full"], seed=0)
    np.testing.assert_array_equal(xtr[:, 0], x_train)
    np.testing.assert_array_equal(ytr, y_train)
    np.testing.assert_array_equal(xho[:, 0], x_test)
    np.testing.assert_array_equal(yho, y_test)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64


@pytest.mark.slow
def test_a_folder_without_mnist_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match=str(tmp_path)) as e:
        run_mnist.main(run_mnist.parse_args(["--mnist-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]))
    assert "\n" not in str(e.value)


def test_the_embedded_mnist_files_are_the_test_set_and_are_checked(tmp_path, monkeypatch):
    """The two idx files in experiments/data/mnist: their SHA-256 (computed here) is the one the
    loader checks, they hold the 10,000 test images with labels 0-9, and a missing or damaged
    copy stops the loader in one line instead of feeding other data."""
    for name, digest in common.MNIST_SHA256.items():
        import hashlib

        assert hashlib.sha256((ROOT / "experiments" / "data" / "mnist" / name).read_bytes()).hexdigest() == digest
    x_train, _, x, y, source = common.load_mnist()
    assert x_train is None and x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert sorted(set(y.tolist())) == list(range(10)) and "experiments/data/mnist" in source
    for damage in ("corrupted", "missing"):
        copy_dir = tmp_path / damage
        copy_dir.mkdir()
        for name in common.MNIST_SHA256:
            (copy_dir / name).write_bytes((common.MNIST_DIR / name).read_bytes())
        victim = copy_dir / "t10k-labels-idx1-ubyte.gz"
        if damage == "missing":
            victim.unlink()
        else:
            data = victim.read_bytes()
            victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        monkeypatch.setattr(common, "MNIST_DIR", copy_dir)
        with pytest.raises(SystemExit, match=f"embedded MNIST file .* is {damage}") as e:
            common.load_mnist()
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_a_pickled_experiment_model_loads_in_a_fresh_process(quick):
    code = ("import torch, sys; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m).__module__ + '.' + type(m).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(quick / "cnn_fc_at.pt")], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "experiments.common.SmallCNN"


@pytest.mark.slow
def test_a_fresh_clone_runs_the_readmes_main_job_on_the_embedded_mnist(quick):
    """The README's first block ran in a clone with nothing beside it (the quick fixture) and
    printed its tables, from the embedded MNIST."""
    if not committed():
        pytest.skip("uncommitted changes: the quick run used this checkout, not a clone")
    clone = quick.parent.parent
    assert sorted(p.name for p in clone.parent.iterdir()) == ["clone"]  # nothing beside it
    stdout = (quick / "stdout.txt").read_text()
    assert "| HPM, batch context |" in stdout and "experiments/data/mnist" in stdout
    assert str(clone) in stdout and (quick / "fig1.png").exists()


@pytest.mark.slow
def test_the_reduced_study_runs_and_its_table_holds_together(quick, tmp_path):

    runs = run_study.main(run_study.parse_args(["--quick", "--mnist-run", str(quick), "--out-dir",
                                                 str(tmp_path)]))
    assert [r["setting"] for r in runs] == run_study.QUICK_SETTINGS
    base = [r["results"].row("base").correct("worst_case") for r in runs]
    assert all(b == base[0] for b in base)  # the same base model, images and seeds in every run
    md = (tmp_path / "study.md").read_text()
    for r in runs:
        for name in ("base", "hpm/batch", "hpm/image"):
            row = run_study.row(r["results"], name)
            if row is None:  # the controls have no batch context
                assert r["name"] in ("ncm", "dpnp") and name == "hpm/batch"
                continue
            assert f"| {100 * row.worst_case:.1f} |" in md
        ckpt = read_head(str(tmp_path / f"head_{run_study.tag_of(r['name'])}.pt"))
        assert all(ckpt["args"][k] == v for k, v in r["setting"].items())  # the checkpoint records them
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "official defaults" in md and "Adv-DPNP" in md


@pytest.mark.slow
def test_the_lenets_plus_plus_run_writes_its_figure_and_trains_both_models(tmp_path):
    """Adv-DPNP end to end (the paper's Figure 2 on MNIST), reduced."""

    results = run_dpnp_mnist.main(run_dpnp_mnist.parse_args(["--quick", "--out-dir", str(tmp_path)]))
    assert (tmp_path / "fig2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "fig2.json").read_text())
    assert saved["accuracy"] == results and set(results) == {"at", "dpnp"}
    for r in results.values():
        assert 0 <= r["pgd"] <= 1 and 0 <= r["clean"] <= 1
    state = torch.load(tmp_path / "lenets_dpnp.pt", weights_only=True)
    torch.manual_seed(0)  # the initialisation the run started from (its seed)
    fresh = run_dpnp_mnist.LeNetsPP("dpnp")
    assert state["classifier.prototypes"].shape == (10, 2)  # prototypes in the 2-D feature space
    assert not torch.equal(state["features.0.weight"], fresh.state_dict()["features.0.weight"])  # trained end to end


@pytest.mark.slow
def test_the_theory_run_writes_its_figures_and_its_numbers_hold_together(quick, tmp_path):
    from experiments import theory

    summary = run_theory.main(run_theory.parse_args(["--quick", "--mnist-run", str(quick), "--out-dir",
                                                     str(tmp_path)]))
    for name in ("fig2.png", "fig3_paper.png", "fig3_mnist.png", "attack.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = summary["table"]
    for d in ("2", "8", "32", "128", "512", "2048"):  # a CDF in c, growing with d (the paper's Fig. 2)
        values = [table[d][c] for c in ("0.05", "0.1", "0.2", "0.5", "1.0")]
        assert values == sorted(values) and 0 <= values[0] and values[-1] <= 1 + 1e-9
    assert table["2"]["0.1"] < table["32"]["0.1"] < table["2048"]["0.1"]
    assert all(v == pytest.approx(0.5, rel=1e-7) for v in summary["eq11_printed_over_cdf_at_c1"].values())
    assert summary["mnist_feature_dim"] == 128 and summary["mnist_n"] == 64
    for c, row in summary["mnist_cdf"].items():
        assert 0 <= row["model"] <= 1 + 1e-9 and 0 <= row["empirical"] <= 1
    for key, a in summary["attack"].items():
        assert 0 <= a["abs_cos_gamma"]["q25"] <= a["abs_cos_gamma"]["median"] <= a["abs_cos_gamma"]["q75"] <= 1
    assert summary["paper_fig3_cdf"]["0.1"] == pytest.approx(theory.cdf_empirical(0.1, theory.PAPER_RESNET50))


def made_up_study_runs():
    """Four made-up settings: a batch context at exactly 0%, and two controls without one (one of
    them at 0% per image). Each run's results answer rows() as hpmkit.results.Results does."""
    def results(batch, image):
        rows = {"base": SimpleNamespace(clean=0.9, worst_case=0.6), "hpm/image": SimpleNamespace(clean=0.9, worst_case=image)}
        if batch is not None:
            rows["hpm/batch"] = SimpleNamespace(clean=0.9, worst_case=batch)
        return SimpleNamespace(rows=lambda: rows)

    return [{"name": "average/ste/ema/official", "results": results(0.3, 0.66)},
            {"name": "global/fc/fixed/official", "results": results(0.0, 0.5)},
            {"name": "ncm", "results": results(None, 0.52)}, {"name": "dpnp", "results": results(None, 0.0)}]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Every figure of the experiments, drawn from small made-up data (untrained LeNets++ for Adv-DPNP's):
    {name: (Figure, the renderer it was drawn with; the extents below are in its pixels)}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from experiments import theory

    out = tmp_path_factory.mktemp("figures")
    rng = np.random.default_rng(0)
    cs = np.linspace(0, 1, 11)
    paper = {"stats": theory.PAPER_RESNET50, "c": cs.tolist(), "model": cs.tolist()}
    angles = {w: (rng.uniform(0.5, 1.5, 20), rng.uniform(1.3, 2.0, 180)) for w in ("c", "d")}
    attack = {key: {"abs_cos_gamma": rng.uniform(0, 1, 20).tolist(), "S": rng.lognormal(-1, 1, 20).tolist()}
              for key in ("fc/apgd", "fc/random", "l2/apgd", "l2/random")}
    torch.manual_seed(0)
    lenets = {"at": run_dpnp_mnist.LeNetsPP("fc").eval(), "dpnp": run_dpnp_mnist.LeNetsPP("dpnp").eval()}
    x = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    figs = {
        "theory fig2": run_theory.plot_fig2({d: (cs ** (1 / d)).tolist() for d in run_theory.DIMS}, len(cs)),
        "theory fig3, paper": run_theory.plot_fig3(paper, "paper"),
        "theory fig3, measured": run_theory.plot_fig3(dict(paper, empirical=cs.tolist(), angles=angles), "measured"),
        "theory attack": run_theory.plot_attack(attack, 2),
        "study": run_study.plot(made_up_study_runs(), out / "study.png", "made up"),
        "mnist fig1": run_mnist.plot_fig1([0, 0.1, 0.3], {"fc": [0.9, 0.5, 0.0], "l2": [0.95, 0.6, 0.02]},
                                          out / "fig1.png", "made up"),
        "dpnp fig2": run_dpnp_mnist.plot(lenets, x, torch.arange(10), out / "fig2.png", "made up",
                                         torch.device("cpu")),
    }
    for name, fig in figs.items():
        canvas = FigureCanvasAgg(fig)
        canvas.draw()  # laid out as when saved
        figs[name] = fig, canvas.get_renderer()
    return figs


def legends_of(fig):
    return fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]


def test_every_panel_of_every_figure_has_both_axis_labels_and_a_title(figures):
    for name, (fig, _) in figures.items():
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), (name, ax.get_title())


def test_every_legend_is_legible_and_lies_outside_the_data_and_inside_the_image(figures):
    for name, (fig, renderer) in figures.items():
        assert legends_of(fig), name
        for legend in legends_of(fig):
            assert all(t.get_fontsize() >= 8 for t in legend.get_texts()), name
            box = legend.get_window_extent(renderer)
            assert not any(box.overlaps(ax.bbox) for ax in fig.axes), name  # over no axes' data area
            assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1, name


def test_no_title_axis_label_or_legend_overlaps_another_or_leaves_the_image(figures):
    for name, (fig, renderer) in figures.items():
        texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        texts += [fig._suptitle] if fig._suptitle is not None else []
        boxes = [t.get_window_extent(renderer) for t in texts if t.get_text()]
        boxes += [legend.get_window_extent(renderer) for legend in legends_of(fig)]
        for i, box in enumerate(boxes):
            assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, (name, i)
            assert fig.bbox.y0 - 1 <= box.y0 and box.y1 <= fig.bbox.y1 + 1, (name, i)
            assert not any(box.overlaps(other) for other in boxes[i + 1:]), (name, i)


def test_the_study_plot_tells_a_worst_case_of_0_from_not_applicable(figures):
    """A 0% worst case is a bar labelled "0.0%"; a setting without a batch context has no bar, only
    the text "n/a" (the batch-context bars sit 0.2 above each setting's line, the per-image 0.2 below)."""
    ax = figures["study"][0].axes[0]
    bars = {round(b.get_y() + b.get_height() / 2, 3): b.get_width() for c in ax.containers for b in c}
    texts = {round(t.get_position()[1], 3): t.get_text() for t in ax.texts}
    assert bars[0.8] == 0 and texts[0.8] == "0.0%"  # global/fc/fixed/official, batch context: 0%
    assert bars[3.2] == 0 and texts[3.2] == "0.0%"  # dpnp, per image: 0%
    for y in (1.8, 2.8):  # ncm and dpnp, batch context: not applicable
        assert y not in bars and texts[y].startswith("n/a")
    assert sorted(bars) == [-0.2, 0.2, 0.8, 1.2, 2.2, 3.2]


def test_the_attack_side_measures_exactly_the_images_the_attack_fools():
    """APGD's perturb returns an image unchanged unless it fools it: a zero perturbation with no
    direction, once drawn as a spike at |cos gamma| = 0 and S = 0. Each model's counts are the
    images classified right and then wrong, recounted here, and every measured perturbation moves
    the feature."""
    from pyautoattack.autopgd_base import APGDAttack

    torch.manual_seed(0)
    models = {"fc": common.SmallCNN("fc").eval(), "l2": common.SmallCNN("l2").eval()}
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        predicted = {k: m(x).argmax(1) for k, m in models.items()}
    y = torch.cat([predicted["l2"][:6], predicted["fc"][6:]])  # labels each model gets partly right
    fooled = {}
    for k, m in models.items():
        x_adv = APGDAttack(m, n_iter=2, norm="Linf", eps=common.EPS, seed=0, loss="ce", device=x.device).perturb(x, y)
        with torch.no_grad():
            fooled[k] = int(((predicted[k] == y) & (m(x_adv).argmax(1) != y)).sum())
        assert 0 < fooled[k] < 16, k
    assert 0 < fooled["fc"] < int((predicted["fc"] == y).sum())  # also an image right and not fooled
    attack = run_theory.attack_side(models["fc"], models["l2"], x, y, 2, 0)
    for key, a in attack.items():
        assert len(a["S"]) == len(a["abs_cos_gamma"]) == fooled[key.split("/")[0]], key
        assert min(a["S"]) > 0 and min(a["abs_cos_gamma"]) > 0, key
