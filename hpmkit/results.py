"""The results file of evaluate.py: its layout is read and written here alone (as AutoAttack's
state.py owns its state file). Everyone else asks `Results` and `RowResults`.

    {"description", "config", "versions", "subset", "version", "notes", "complete", "timing",
     "base": ROW, "dpnp": ROW, "hpm": {"batch": ROW, "image": ROW}}
    ROW = {"clean": accuracy, "attacks": {attack: accuracy}, "worst_case": accuracy,
           (K of B: "attacker_slots": [0/1], "own", "benign", "benign_clean": accuracies,
            "attacks_own", "attacks_benign": {attack: accuracy}),
           "correct": {"clean" | attack | "worst_case": [0/1 per image]},
           "batches_done": {job: n}, "timings_s": {job: seconds}, "backbone_images": {job: n},
           "final_batch_correct": {attack: [0/1]}, "backbone_passes_per_image": {attack: x},
           "library_warnings": {attack: text}, "checks": {"runs": RUNS, check: {...}}}
    RUNS = {"n": images, "accuracy": {run: accuracy}, "correct", "batches_done", "timings_s", ...}

Accuracies are fractions of the subset; a job is an attack (or the clean pass) over every fixed
batch of a row, recorded after every chunk so that a rerun resumes it.
"""
import json
import re
import time
from dataclasses import dataclass, field

from hpmkit.catalogue import ORDER
from hpmkit.cli import is_number
from hpmkit.files import too_deep, write_json


# The per-row bookkeeping keys: nothing but this module names them (a test reads every file).
BOOKKEEPING = ("batches_done", "timings_s", "final_batch_correct", "backbone_images", "backbone_passes_per_image",
               "library_warnings")
# What measures time or cost (a resumed attack has no cost figure; warnings are counted per process).
MEASURED = ("timing", "timings_s", "out", "backbone_passes_per_image", "backbone_images", "library_warnings")


@dataclass
class Progress:
    """What a job has done: per-image 0/1 of its first `done` batches, the kept final batches' own
    scores (None: not scored apart), seconds, backbone images (None: a file from before the count)."""
    done: int = 0
    correct: list = field(default_factory=list)
    final: list = None
    seconds: float = 0.0
    images: int = 0


class Runs:
    """Jobs over fixed batches, each with per-image results and its accuracy under `acc`."""

    def __init__(self, store, acc):
        self.store, self.acc = store, acc

    def accuracy(self, name):
        return self.store[self.acc].get(name)

    def finished(self, name):
        return name in self.store[self.acc]

    def correct(self, name):
        return self.store["correct"][name]

    def final_correct(self, name):
        return self.store.get("final_batch_correct", {}).get(name)

    def batches_done(self, name):
        return self.store["batches_done"].get(name, 0)

    def seconds(self, name):
        return self.store["timings_s"][name]

    def progress(self, name, batches):
        """The job as a resumed run finds it (batches: the fixed batches [(start, end), ...])."""
        done = self.batches_done(name)
        n = batches[done - 1][1] if done else 0
        final = self.final_correct(name)
        return Progress(done, list(self.store["correct"].get(name, []))[:n],
                        None if final is None else list(final)[:n], self.store["timings_s"].get(name, 0.0),
                        0 if done == 0 else self.store.get("backbone_images", {}).get(name))

    def record(self, name, p):
        """A job's progress into the store (after every chunk)."""
        self.store["correct"][name] = p.correct
        if p.final is not None:
            self.store.setdefault("final_batch_correct", {})[name] = p.final
        self.store["batches_done"][name] = p.done
        self.store["timings_s"][name] = p.seconds
        self.store.setdefault("backbone_images", {})[name] = p.images

    def reset(self, name):
        """Start the job over (its per-image results are gone)."""
        self.record(name, Progress())

    def finish(self, name):
        """The job is done: its accuracy from its per-image results."""
        correct = self.correct(name)
        self.store[self.acc][name] = sum(correct) / len(correct)


def stored(key, copy=False):
    """A property: the row's entry `key` (None where absent; copy: a copy of a mapping, {} where absent)."""
    return property(lambda self: dict(self.store.get(key, {})) if copy else self.store.get(key))


class RowResults(Runs):
    """The results of one row of the table (a model under test)."""
    clean, worst_case = stored("clean"), stored("worst_case")
    accuracies = stored("attacks", copy=True)  # {attack: accuracy} of the finished attacks, in ORDER
    per_image = stored("correct", copy=True)  # {"clean" | attack | "worst_case": [0/1 per image]}
    finals = stored("final_batch_correct", copy=True)  # {attack: what its kept final batch alone scores}
    warnings = stored("library_warnings", copy=True)  # {attack: AutoAttack's warnings, counted}
    attacker_slots = stored("attacker_slots")  # K of B: [0/1 per image], 1 for the attacker's images
    own = stored("own")  # K of B: the attacker's images correct clean and under every attack (worst case)
    benign = stored("benign")  # K of B: the benign images correct clean and under every attack on the slots
    benign_clean = stored("benign_clean")  # K of B: the benign images correct, the attacker's left clean

    def __init__(self, store):
        super().__init__(store, "attacks")

    def accuracy(self, name):
        return self.clean if name == "clean" else self.worst_case if name == "worst_case" else super().accuracy(name)

    def finished(self, name):
        return self.clean is not None if name == "clean" else super().finished(name)

    def passes_per_image(self, name):
        return self.store.get("backbone_passes_per_image", {}).get(name)

    def finish(self, name):
        """The job is done: its accuracy, its backbone passes per image, the row's worst case."""
        correct = self.correct(name)
        if name == "clean":
            self.store["clean"] = sum(correct) / len(correct)
        else:
            super().finish(name)
            images = self.store.get("backbone_images", {}).get(name)
            if images is not None:  # counted over every batch (a file from before the count has none)
                self.store.setdefault("backbone_passes_per_image", {})[name] = round(images / len(correct), 2)
        self.update_worst_case()

    def set_attacker_slots(self, slots):
        """K of B: the row then reports its per-image records split: own and benign."""
        self.store["attacker_slots"] = list(slots)

    def by_role(self, name, role):
        """Accuracy of `name` ("clean", an attack, "worst_case") over the attacker's images (role
        "own") or the benign ones ("benign"); None where the row has no attacker slots."""
        slots, correct = self.attacker_slots, self.store["correct"].get(name)
        if slots is None or correct is None:
            return None
        picked = [c for c, s in zip(correct, slots) if s == (role == "own")]
        return sum(picked) / len(picked) if picked else None

    def set_warnings(self, name, text):
        self.store.setdefault("library_warnings", {})[name] = text

    def update_worst_case(self):
        """Worst case over clean and every finished attack, per image and overall; the row's
        attacks in the canonical order, whatever order the runs took."""
        for key in ("attacks", "correct", "batches_done", "timings_s"):
            self.store[key] = dict(sorted(self.store[key].items(), key=lambda kv: ORDER.index(kv[0])))
        if self.clean is None:
            return
        finished = ["clean"] + list(self.store["attacks"])
        worst = [int(all(v)) for v in zip(*(self.store["correct"][k] for k in finished))]
        self.store["correct"]["worst_case"] = worst
        self.store["worst_case"] = sum(worst) / len(worst)
        if self.attacker_slots is not None:  # K of B: the two risks, overall and per attack
            self.store.update(own=self.by_role("worst_case", "own"), benign=self.by_role("worst_case", "benign"),
                              benign_clean=self.by_role("clean", "benign"))
            for role in ("own", "benign"):
                self.store[f"attacks_{role}"] = {a: self.by_role(a, role) for a in self.store["attacks"]}

    @property
    def checks(self):
        """{check: its result} (and "runs", the check attacks' own results)."""
        return self.store.setdefault("checks", {})

    def check_runs(self, n):
        """The check attacks' jobs on the first n images (started over for another n)."""
        runs = self.checks.get("runs")
        if runs is None or runs["n"] != n:
            runs = self.checks["runs"] = {"n": n, "accuracy": {}, "correct": {}, "batches_done": {},
                                          "timings_s": {}}
        return Runs(runs, "accuracy")

    def check_accuracies(self):
        return self.checks["runs"]["accuracy"]


def new_row():
    return {"clean": None, "attacks": {}, "worst_case": None, "correct": {}, "batches_done": {},
            "timings_s": {}}


# What a results file holds, at the top and in a row (Results.problem refuses anything else).
TOP = {"description", "config", "versions", "subset", "version", "notes", "complete", "timing", "base", "dpnp",
       "hpm"}
ROW = set(new_row()) | set(BOOKKEEPING) | {"checks", "attacker_slots", "own", "benign", "benign_clean",
                                           "attacks_own", "attacks_benign"}
CHECKED = {"timings_s": is_number, "backbone_passes_per_image": is_number,  # (per job)
           "backbone_images": lambda v: v is None or type(v) is int, "library_warnings": lambda v: isinstance(v, str)}


def is_bits(v):
    return isinstance(v, list) and all(type(c) is int and c in (0, 1) for c in v)


def row_problem(store, batches):
    """What in one row does not hold together, else None (batches: the run's fixed batches)."""
    if not isinstance(store, dict) or not set(store) <= ROW:
        return "is not a row of evaluate.py"
    for key in ("attacks", "correct", "batches_done", "attacks_own", "attacks_benign") + BOOKKEEPING:
        jobs = store.get(key, {})
        unknown = [k for k in jobs if k not in ORDER] if isinstance(jobs, dict) else [jobs]
        if unknown:
            return f"{key} is not a mapping of the row's jobs (it names {unknown[0]!r})"
    clean = store.get("clean")
    if clean is not None and not is_number(clean):
        return f"clean accuracy {clean!r} is not a number"
    finished = {**store["attacks"], **({} if clean is None else {"clean": clean})}
    problem = jobs_problem(store, finished, batches)
    if problem or clean is None:
        return problem
    worst = [int(all(v)) for v in zip(*(store["correct"][k] for k in finished))]
    mean = sum(worst) / len(worst)
    if store["correct"].get("worst_case") != worst:
        return "worst_case: its per-image list is not the AND of clean and every finished attack"
    if store.get("worst_case") != mean:
        return f"worst_case: accuracy {store.get('worst_case')!r} but its per-image list gives {mean:g}"
    slots = store.get("attacker_slots")
    if slots is not None and not (is_bits(slots) and len(slots) == len(worst)):
        return "attacker_slots is not a list of 0/1 over the images"
    runs = store.get("checks", {}).get("runs") if isinstance(store.get("checks", {}), dict) else "?"
    if runs is None:
        return None
    n = runs.get("n") if isinstance(runs, dict) else None
    if not (type(n) is int and 1 <= n <= batches[-1][1]) or not all(
            isinstance(runs.get(k), dict) for k in ("accuracy", "correct", "batches_done", "timings_s")):
        return "checks: its runs are not those of evaluate.py"
    problem = jobs_problem(runs, runs["accuracy"], [(a, min(b, n)) for a, b in batches if a < n])
    return problem and "check " + problem


def jobs_problem(store, finished, batches):
    """What in a store of jobs does not hold together: store["correct"] lists of 0/1, every finished
    job ({job: its accuracy}) with a list over all of `batches` whose mean is its accuracy, every
    unfinished one with a list over the batches it has done (store["batches_done"])."""
    correct, done, n = store["correct"], store["batches_done"], batches[-1][1]
    bad = [k for k, v in correct.items() if not is_bits(v)]
    if bad:
        return f"{bad[0]}: its per-image record is not a list of 0/1"
    bad = [(k, key) for key, ok in CHECKED.items() for k, v in store.get(key, {}).items() if not ok(v)]
    if bad:
        return f"{bad[0][0]}: its {bad[0][1]} entry is not what evaluate.py writes"
    for name, d in done.items():
        if not (type(d) is int and 0 <= d <= len(batches)):
            return f"{name}: batches_done {d!r}, but the run has {len(batches)} batches"
        images, has = batches[d - 1][1] if d else 0, len(correct.get(name, []))
        if name not in finished and has != images:
            return f"{name}: {d} batches done ({images} images), but its per-image list has {has}"
    for name, acc in finished.items():
        has = len(correct.get(name, []))
        if done.get(name) != len(batches) or has != n:
            return f"{name}: finished, but {has} of {n} images and {done.get(name)} of {len(batches)} batches done"
        if not is_number(acc) or acc != sum(correct[name]) / n:
            return f"{name}: accuracy {acc!r} but its per-image list gives {sum(correct[name]) / n:g}"
    finals = store.get("final_batch_correct", {})
    bad = [k for k, v in finals.items() if not is_bits(v) or len(v) != len(correct.get(k, []))]
    return f"{bad[0]}: its final batches' record is not a list of 0/1 as long as its per-image list" if bad else None


class Results:
    """A results file's contents (`data`, a JSON-able dict), read and written through here."""
    config, subset = property(lambda self: self.data["config"]), property(lambda self: self.data["subset"])
    complete = property(lambda self: self.data.get("complete") is True)
    version = property(lambda self: self.data.get("version"))
    processes = property(lambda self: self.data.get("timing", {}).get("processes"))  # torchrun's; None for one

    def __init__(self, data=None):
        self.data = {} if data is None else data

    @classmethod
    def read(cls, path):
        """The results a file of evaluate.py holds, else None (another kind of file)."""
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):  # (JSON nested thousands deep)
            return None
        return cls(data) if isinstance(data, dict) and isinstance(data.get("config"), dict) else None

    def write(self, path):
        write_json(self.data, path)

    def row(self, name):
        """The results of row `name` ("base", "dpnp", "hpm/batch", ...), created if absent."""
        if "/" not in name:
            return RowResults(self.data.setdefault(name, new_row()))
        model, ctx = name.split("/")
        return RowResults(self.data.setdefault(model, {}).setdefault(ctx, new_row()))

    def rows(self):
        """{name: RowResults} of the rows the file holds."""
        stores = {k: self.data[k] for k in ("base", "dpnp") if k in self.data}
        stores.update({f"hpm/{c}": v for c, v in self.data.get("hpm", {}).items()})
        return {name: RowResults(store) for name, store in stores.items()}

    def problem(self, batches):
        """What a resumed run would read that does not hold together (a file edited by hand or
        damaged), as a few words, else None. batches: the run's fixed batches [(start, end), ...]."""
        d = self.data
        unknown = set(d) - TOP
        if unknown:
            return f"an unknown entry {sorted(unknown)[0]!r}"
        if too_deep(d, 10):
            return "values nested deeper than evaluate.py writes them"
        if not isinstance(d.get("timing", {}), dict):
            return "timing is not a mapping"
        attacks, attackers = d["config"].get("attacks", []), d["config"].get("attackers", [])
        if not (isinstance(attacks, list) and all(isinstance(a, str) and a in ORDER for a in attacks)):
            return "config.attacks is not a list of attacks"
        if not (isinstance(attackers, list) and all(type(k) is int for k in attackers)):
            return "config.attackers is not a list of numbers of slots"
        if not (isinstance(d.get("hpm", {}), dict) and all(re.fullmatch(r"batch|image|attackers-\d+", str(c))
                                                           for c in d.get("hpm", {}))):
            return "hpm is not a mapping of contexts to rows"
        for name, rr in self.rows().items():
            problem = row_problem(rr.store, batches)
            if problem:
                return f"{name} {problem}"
        return None

    def describe(self, description, config, versions, subset, version, notes):
        """What was run, on what, with which software (the parts of the file that are not rows)."""
        self.data.update(description=description, config=config, versions=versions, subset=subset,
                         version=version, notes=notes, complete=False)
        self.data.setdefault("timing", {}).setdefault("started", now())

    def updated(self, processes=None):
        """Stamp the time of this write (and the number of processes, under torchrun)."""
        self.data["timing"]["updated"] = now()
        if processes is not None:
            self.data["timing"]["processes"] = processes

    def finished(self):
        self.data["complete"] = True


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S")
