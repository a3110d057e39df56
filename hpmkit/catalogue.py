"""What an evaluation runs: the settings every attack shares, and the catalogue of attacks.

A `Setting` is a run's budget, schedule and two choices; the checks derive theirs with
`dataclasses.replace(setting, eps=...)`. The catalogue holds one `Attack` record per attack
(hpmkit/attacks.py's run_attack says what runs for each kind), with what it costs in backbone
passes per image (`Attack.cost`, the unit engine.BackboneCounter measures).
"""
from dataclasses import dataclass

from hpmkit.cli import CLIError


@dataclass(frozen=True)
class Setting:
    """The attacks' budget, schedule and scoring, shared by every attack of a run."""
    norm: str  # "Linf" or "L2"
    eps: float
    steps: int = 40  # APGD iterations (and those of our gradient attacks)
    queries: int = 5000  # Square
    seed: int = 0  # the same for every batch
    restarts: int = 1  # APGD-CE, -DLR, -CW
    score_queries: bool = False  # every query of a whole fixed batch inside the ball is scored
    fixed_batch_square: bool = False  # Square queries whole fixed batches (batch context, L-inf)

    @property
    def square_on_whole_batches(self):
        """Square in the batch context queries whole fixed batches (only L-inf has that Square)."""
        return self.fixed_batch_square and self.norm == "Linf"


@dataclass(frozen=True)
class Attack:
    """One attack of the catalogue."""
    name: str  # as in the results: "apgd-ce/mix" on an HPM row, "apgd-ce" on a per-image model
    kind: str  # what runs: apgd-ce, apgd-dlr, apgd-t, apgd-cw, flip, square, joint, target; K of B:
    #            own:apgd-ce, own:apgd-dlr, benign:spread, benign:square, benign:victim (the name without
    #            its surrogate)
    surrogate: str = None  # the HPM model it follows (fc, soft, ste, mix, fixed); None: the real model
    classes: int = 2  # AutoAttack's DLR loss reads the 3rd largest logit, its targeted DLR the 4th
    runs_on: str = "all"  # the rows: "all": every row (a per-image model runs `kind` on itself); "hpm":
    #                      HPM rows; "batch": HPM's batch context (the batch adversary: it needs a batch
    #                      that decides); "attackers": the rows of K attacker slots in each batch (K of B)

    @property
    def reads_scores(self):
        """The batch adversary and the attacker slots' attacks steer by what the real model scored
        (they need a scorer)."""
        return self.kind in ("joint", "target") or self.runs_on == "attackers"

    def cost(self, setting, batch_size, classes=None, whole_batch=True, standing=1.0):
        """Backbone passes per image of the subset (a Cost), every scored final batch included.
        batch_size: the fixed batches'; classes: the model's (APGD-T's targets; None: at most 9);
        whole_batch: the path run_attack takes (False: AutoAttack's perturb, which attacks only the
        images still correct); standing: the fraction of the subset no attack has fooled yet (target
        and victim attack a copy of its fixed batch per image standing). Passes over all images
        of a chunk are exact; an attack that can stop early (Square, the batch adversary, spread,
        victim) or attack fewer images (perturb) gets an upper bound."""
        S, q, kind = setting.steps, setting.queries, self.kind.removeprefix("own:")
        if kind == "flip":  # the real model's runner-up, then two APGD runs, each scored
            return Cost(1 + 2 * (S + 2))
        if kind in KINDS:  # per run: its start and S steps, then its final batch scored
            targeted = int(kind == "apgd-t")  # (the clean logits that rank the targets)
            runs = min(9, (classes or 10) - 1) if targeted else setting.restarts
            if not whole_batch:  # perturb: a clean pass, then runs on the images still correct (each
                #                  target ranked again on them), one final batch scored
                return Cost(2 + targeted + runs * (S + 1 + targeted), bound=True)
            fixed = int(self.surrogate == "fixed")  # the clean features, once
            return Cost(targeted + fixed + runs * (S + 2), bound=bool(targeted) and classes is None)
        if kind in ("square", "benign:square"):  # AutoAttack's perturb: a clean pass before, one after
            return Cost(q + (4 if kind == "square" else 2), bound=True)
        if kind in ("joint", "benign:spread"):  # S steps, the last iterate, the final batch
            return Cost(S + 2, bound=True)
        return Cost(1 + standing * batch_size * (S + 1), bound=True)  # target, victim


@dataclass(frozen=True)
class Cost:
    """Backbone passes per image; bound: an upper bound (the attack may stop early)."""
    passes: float
    bound: bool = False

    def __add__(self, other):
        return Cost(self.passes + other.passes, self.bound or other.bound)

    def __str__(self):
        return ("at most " if self.bound else "") + f"{self.passes:,.0f}"


LOSSES = ("ce", "dlr")
SURROGATES = ("fc", "soft", "ste", "mix")  # MSA: Surrogate 1, Surrogate 2, the real model (BPDA), their mixture
ADAPTIVE = ("fixed",)  # adaptive surrogates designed from hpm.py (Tramer et al. 2020)
CONTEXTS = ("batch", "image")
KINDS = ("apgd-ce", "apgd-dlr", "apgd-t", "apgd-cw")  # APGD-T: AutoAttack's targeted DLR attack
OWN_KINDS = ("apgd-ce", "apgd-dlr")  # the APGD kinds K of B runs on the attacker's own images
CLASSES = {"apgd-ce": 2, "apgd-dlr": 3, "apgd-t": 4, "apgd-cw": 2, "flip": 4, "square": 2, "joint": 2,
           "target": 2}


def _catalogue():
    hpm = [Attack(f"{k}/{s}", k, s, CLASSES[k], "hpm" if s in ADAPTIVE else "all")
           for k in KINDS for s in SURROGATES + ADAPTIVE]
    hpm += [Attack("flip/mix", "flip", "mix", CLASSES["flip"], "hpm"), Attack("square", "square")]
    # The batch as the adversary's (batch_attacks.py), through a surrogate with batch prototypes;
    # last in the order (target reads the images every other attack left standing).
    hpm += [Attack(f"{k}/{s}", k, s, runs_on="batch") for k in ("joint", "target") for s in ("soft", "ste", "mix")]
    own = [Attack(k, k, None, CLASSES[k]) for k in KINDS]  # a per-image model's, on itself
    # K of B (batch_attacks.py): the attacker's own images misclassified, and collateral on the benign ones.
    slots = [Attack(f"own:{k}/{s}", f"own:{k}", s, CLASSES[k], "attackers") for k in OWN_KINDS for s in SURROGATES]
    slots += [Attack(f"benign:spread/{s}", "benign:spread", s, runs_on="attackers") for s in ("soft", "ste", "mix")]
    slots += [Attack("benign:square", "benign:square", runs_on="attackers")]
    # last: victim reads the benign images every other attack left standing
    slots += [Attack(f"benign:victim/{s}", "benign:victim", s, runs_on="attackers") for s in ("soft", "ste", "mix")]
    return {a.name: a for a in own + hpm + slots}


CATALOGUE = _catalogue()
ALL_ATTACKS = tuple(name for name in CATALOGUE if name not in KINDS)  # the names --attacks takes
ORDER = ("clean",) + tuple(CATALOGUE) + ("worst_case",)  # of the attacks in a row's results
HPM_ATTACKS = tuple(f"apgd-{loss}/{s}" for loss in LOSSES for s in SURROGATES) + ("square",)  # the paper's MSA
# The rows of K attacker slots, by default: MSA on the attacker's slots; collateral through C_batch
# (soft and mix surrogates: spread, then victim on the benign images left standing) and without gradients.
ATTACKER_ATTACKS = (tuple(f"own:{k}/{s}" for k in OWN_KINDS for s in SURROGATES)
                    + ("benign:spread/soft", "benign:spread/mix", "benign:square", "benign:victim/mix"))
BATCH_ADVERSARY = tuple(a.name for a in CATALOGUE.values() if a.runs_on == "batch")


def parse_attacks(text):
    """"apgd-ce/mix,square" -> the records, in the catalogue's order; a bare "apgd-ce" means every
    surrogate."""
    chosen = set()
    for tok in (t.strip() for t in text.split(",") if t.strip()):
        if tok in KINDS:
            chosen |= {f"{tok}/{s}" for s in SURROGATES}
        elif tok in ALL_ATTACKS:
            chosen.add(tok)
        else:
            raise CLIError(f"unknown attack {tok!r}; choose from {', '.join(ALL_ATTACKS)} "
                           f"(or {' / '.join(KINDS)} for all four surrogates)")
    if not chosen:
        raise CLIError("--attacks is empty")
    return [a for a in ALL_ATTACKS if a in chosen]


def check_classes(attacks, num_classes):
    """Refuse attacks the model has too few classes for, naming what each needs and the --attacks
    list that runs."""
    too_few = [a for a in attacks if CATALOGUE[a].classes > num_classes]
    if too_few:
        keep = [a for a in attacks if a not in too_few]
        needs = sorted({CATALOGUE[a].classes for a in too_few})
        groups = "; ".join(f"{', '.join(a for a in too_few if CATALOGUE[a].classes == k)} need at least {k}"
                           for k in needs)
        raise CLIError(f"the model has {num_classes} classes: {groups} (AutoAttack's DLR loss reads the 3rd "
                       "largest logit, its targeted DLR the 4th)"
                       + (f"; pass --attacks {','.join(keep)}" if keep else ""))
