"""The scripts' configuration: every flag checked before anything is loaded or written
(evaluate.py's resolve_config, finetune.py's finetune_settings), the settings a results file must
match to be resumed, the evaluation's attack setting, the fixed subset."""
from __future__ import annotations  # `str | None` fields on Python 3.9, pyproject's minimum

import os
from dataclasses import dataclass, replace
from fractions import Fraction

import torch

from hpmkit.catalogue import ALL_ATTACKS, ATTACKER_ATTACKS, CATALOGUE, CONTEXTS, Setting, parse_attacks
from hpmkit import controls
from hpmkit.checkpoint import is_head_file, read_head, shown
from hpmkit.chunks import make_batches
from hpmkit.cli import CLIError, check_device, check_eps, check_number, check_positive, check_seed
from hpmkit.data import DATASETS, DEFAULT_EPS, OWN, check_labels, eps_line, load_data
from hpmkit.files import check_out, sha256
from hpmkit.models import check_model, code_file, code_identity, code_spec
from hpmkit.engine import world_size
from hpmkit.results import Results

# --chunk: images attacked at once. On the CPU one batch of the default size: bench.py measured
# larger batches slower per image there (WRN-16-4 forward+backward: 148 images/s at 64, 88 at 256).
DEFAULT_CHUNK = {"cuda": 1024, "cpu": 64}

# The flags of --checks, and their defaults. --context-orders without --checks is refused, not
# ignored; --checks-n and --checks-tol are still taken without it (experiments/run_mnist.py shares
# its flags between runs with and without --checks).
CHECKS_DEFAULTS = {"checks_n": 512, "checks_tol": 0.02, "context_orders": 5}
# --context-orders at most: each order is one more clean pass of the whole subset, and the check
# asks whether any clean label changes; a thousand orders see what a billion would, in bounded time.
MAX_ORDERS = 1000
# The paper's fine-tuning batch size: finetune.py's default, evaluate.py's B without a head's.
PAPER_BATCH_SIZE = 64
VAL_PER_CLASS = 5  # evaluate.py on ImageNet: the paper's 5 validation images per class


@dataclass(frozen=True)
class EvalConfig:
    """evaluate.py's flags by name (its --help says each), resolved and checked (resolve_config,
    api.object_config); a field commented here is resolved, not only given. Settled later (replace):
    n_examples, the device under torchrun, a resumed file's attacks and attackers (open_results)."""
    head: str | None
    head_type: str | None  # the head's: "hpm", "ncm" or "dpnp"; None: the base model alone
    model: str  # --model, else the head's
    weights: str | None  # --weights, else the head's recorded ones for a code --model
    model_dir: str
    dataset: str  # --dataset, else the head's, else own data (data.OWN)
    data: str | None
    data_dir: str
    per_class: int | None  # --per-class, else 5 on ImageNet's validation set
    n_examples: int | None  # --n-examples; main: the subset's size (load_subset)
    subset_seed: int
    batch_size: int  # --batch-size, else the head's fine-tuning batch size, else PAPER_BATCH_SIZE
    threat_model: str  # --threat-model, else the head's, else Linf
    eps: float  # --eps, else the head's fine-tuning eps under this norm, else the dataset's
    version: str
    attacks: list  # names in the catalogue's order: --attacks, else the version's (and the K-of-B rows')
    steps: int  # --steps, else the version's
    queries: int
    restarts: int
    seed: int
    score_queries: bool  # the version's: every query of a whole fixed batch scored
    fixed_batch_square: bool  # the version's: Square queries whole fixed batches
    contexts: list  # the HPM rows' contexts: --contexts, else batch and image (image alone for NCM)
    attackers: list  # the K of --attackers, sorted ([]: no K-of-B row)
    attacker_eps: float  # --attacker-eps, else eps
    checks: bool
    checks_n: int  # --checks-n, --checks-tol, --context-orders: else CHECKS_DEFAULTS
    checks_tol: float
    context_orders: int
    head_sha256: str | None  # the files by content (IDENTITY)
    model_sha256: str | None  # model_sha256: None for a RobustBench name
    weights_sha256: str | None
    data_sha256: str | None
    out: str | None  # --out, else HEAD.eval-VERSION.json (the Python API: None, no file)
    overwrite: bool
    save_adv: str | None
    device: torch.device  # checked; under torchrun this process's GPU (main)
    chunk: int  # --chunk, else DEFAULT_CHUNK's for the device
    compile: bool
    no_progress: bool

    @property
    def setting(self):
        """The attacks' setting (catalogue.Setting)."""
        return Setting(norm=self.threat_model, eps=self.eps, steps=self.steps, queries=self.queries,
                       seed=self.seed, restarts=self.restarts, score_queries=self.score_queries,
                       fixed_batch_square=self.fixed_batch_square)


# Settings that change the numbers: an existing --out file must match them to be resumed. Files
# by their contents (SHA-256), not by how their path is spelled (a code spec: its file's SHA-256
# and NAME; its --weights: weights_sha256); identity() adds the model's name where it is no file
# (a RobustBench name).
IDENTITY = ("model_sha256", "weights_sha256", "dataset", "threat_model", "data_sha256", "head_sha256", "eps",
            "n_examples", "subset_seed", "per_class", "batch_size", "steps", "queries", "seed", "score_queries",
            "fixed_batch_square", "restarts", "attacker_eps")


def identity(cfg):
    """What a results file (or a torchrun ledger) of this configuration must match to be resumed."""
    ids = {k: getattr(cfg, k) for k in IDENTITY}
    if cfg.model_sha256 is None:
        ids["model"] = cfg.model
    return ids


def model_sha256(model):
    """A model by content: a code spec's file (SHA-256) and NAME, a file's SHA-256; None for a name."""
    spec = code_spec(model)
    if spec is not None:
        return code_identity(spec)
    return sha256(model) if os.path.isfile(model) else None


def code_inputs(model, weights):
    """The files a model given as code reads (its .py file or module's file, its --weights): inputs
    that --out must never be."""
    spec = code_spec(model)
    return [weights] + ([code_file(spec)] if spec is not None else [])


def resolve_config(args, versions):
    """(EvalConfig, the head's checkpoint or None): every setting, with the checkpoint's values where
    the flags leave them out, and the version's (versions: evaluate.VERSIONS); every flag is checked
    here, before anything is loaded or written."""
    ckpt = read_head(args.head) if args.head else None
    if ckpt is None and (args.model is None or args.dataset is None and args.data is None):
        raise CLIError("give --head FILE (a finetune.py checkpoint), or --model with --dataset or --data "
                       "FILE.npz (your own data) to evaluate a base model alone")
    if ckpt is not None and args.model is None and names_a_file(ckpt["model"]):
        what = ("code: only code you trust" + ("; --weights defaults to the head's" if ckpt.get("weights") else "")
                if ":" in ckpt["model"] else "a model file is code: only files you trust")
        raise CLIError(f"the head names model {ckpt['model']}; pass --model {ckpt['model']} to load it ({what})")
    s = dict(vars(args))  # the settings as they are resolved
    s["model"], s["weights"] = check_model(args.model or ckpt["model"], head_weights(args, ckpt))
    s["dataset"] = args.dataset or (ckpt or {}).get("dataset") or OWN
    if s["dataset"] == OWN and args.data is None:
        raise CLIError("the head was fine-tuned on own data (--data without --dataset): pass its test set "
                       "as --data FILE.npz")
    s["per_class"] = args.per_class if args.per_class is not None else (
        VAL_PER_CLASS if s["dataset"] == "imagenet" and args.data is None else None)
    resolve_settings(s, versions, ckpt)
    if s["save_adv"] and os.path.exists(s["save_adv"]) and not os.path.isdir(s["save_adv"]):
        raise CLIError(f"--save-adv {s['save_adv']} is a file; it names a folder for the images")
    if s["save_adv"] and world_size() > 1:
        raise CLIError("--save-adv works in one process only; run without torchrun to keep the images")
    s["head_sha256"] = sha256(args.head) if args.head else None
    s["model_sha256"] = model_sha256(s["model"])
    s["weights_sha256"] = sha256(s["weights"]) if s["weights"] else None
    s["data_sha256"] = sha256(args.data) if args.data and os.path.isfile(args.data) else None
    # one default file per head and version: a paper run after a strong one is no "other configuration"
    s["out"] = args.out or (f"{os.path.splitext(args.head)[0] if args.head else 'eval'}.eval-{s['version']}"
                              ".json")
    # --overwrite replaces a results file only: never an input, nor any other file
    inputs = [args.head, s["model"], args.data, args.save_adv, *code_inputs(s["model"], s["weights"])]
    check_out(s["out"], inputs, lambda path: Results.read(path) is not None, "results file of evaluate.py")
    return EvalConfig(**s), ckpt


def resolve_settings(s, versions, ckpt=None):
    """The settings of s (the flags by name, model and dataset resolved) that are no files, in place,
    checked: else the head's (ckpt: its checkpoint, or just {"head_type": ...}), the version's, the defaults."""
    if s["dataset"] not in DATASETS and s["dataset"] != OWN:
        raise CLIError(f"unknown dataset {s['dataset']!r}; choose from {', '.join(DATASETS)}")
    s["threat_model"] = s["threat_model"] or (ckpt or {}).get("threat_model") or "Linf"
    if s["eps"] is None:  # a head: the threat model it was fine-tuned for (SPEC 3); else the dataset's
        s["eps"] = head_eps(ckpt, s["threat_model"]) or DEFAULT_EPS[s["threat_model"]][s["dataset"]]
    if s["eps"] <= 0:
        raise CLIError(f"--eps must be positive, got {s['eps']:g}")
    check_eps(s["eps"], s["threat_model"])
    if s["batch_size"] is None:
        s["batch_size"] = int((ckpt or {}).get("batch_size") or PAPER_BATCH_SIZE)
    version = versions[s["version"]]
    if s["steps"] is None:
        s["steps"] = version["steps"]
    s["score_queries"], s["fixed_batch_square"] = version["score_queries"], version["fixed_batch_square"]
    resolve_checks(s)
    check_positive(batch_size=s["batch_size"], steps=s["steps"], queries=s["queries"],
                   restarts=s["restarts"], checks_n=s["checks_n"], n_examples=s["n_examples"],
                   per_class=s["per_class"])
    given = s["attacks"]
    s["attacks"] = parse_attacks(",".join(version["attacks"]) if given is None else given)
    s["head_type"] = None if ckpt is None else ckpt["head_type"]
    ncm = s["head_type"] == "ncm"  # no batch prototypes: one context says it all
    contexts = ("image" if ncm else ",".join(CONTEXTS)) if s["contexts"] is None else s["contexts"]
    s["contexts"] = [c.strip() for c in contexts.split(",") if c.strip()]
    if not s["contexts"] or not set(s["contexts"]) <= set(CONTEXTS):
        raise CLIError(f"--contexts must be a list from {', '.join(CONTEXTS)}, got {contexts!r}")
    resolve_attackers(s, given, version)
    check_seed(seed=s["seed"], subset_seed=s["subset_seed"])
    s["device"] = check_device(s["device"])
    if s["chunk"] is None:
        s["chunk"] = DEFAULT_CHUNK.get(s["device"].type, DEFAULT_CHUNK["cpu"])
    check_positive(chunk=s["chunk"])


def resolve_checks(s):
    """The flags of --checks (CHECKS_DEFAULTS), in place: their defaults where left out, each checked
    (a check never reports work it did not do); --context-orders without --checks is refused."""
    if s["context_orders"] is not None and not s["checks"]:
        raise CLIError("--context-orders needs --checks: it sets the context sensitivity check, which runs only "
                       "with --checks")
    for name, default in CHECKS_DEFAULTS.items():
        if s[name] is None:
            s[name] = default
    if not 0 <= s["checks_tol"] < 1:
        raise CLIError(f"--checks-tol is an accuracy difference in [0, 1), got {s['checks_tol']:g}")
    if not 1 <= s["context_orders"] <= MAX_ORDERS:
        raise CLIError(f"--context-orders is a number of random orders of the batches, 1 to {MAX_ORDERS} (each is a "
                       f"clean pass of the subset), got {s['context_orders']}")


def head_weights(args, ckpt):
    """evaluate.py's --weights: as given, else the head's recorded ones where --model is code (a
    state_dict is data; the fingerprint check proves they are the right ones)."""
    recorded = None if ckpt is None else ckpt.get("weights")
    if args.weights is not None or not recorded or code_spec(args.model or ckpt["model"]) is None:
        return args.weights
    if not os.path.isfile(recorded):
        raise CLIError(f"the head's base model weights {recorded} do not exist (moved?): pass --weights PATH")
    return ckpt["weights"]


def head_eps(ckpt, threat_model):
    """The eps the head was fine-tuned at, where it was fine-tuned under this norm (None: no head,
    another norm, or a head written before the field existed)."""
    ckpt = ckpt or {}
    return (ckpt.get("attack_eps") or None) if ckpt.get("threat_model") == threat_model else None


def said(value):
    """A default as a --help text says it: 8/255 where it is a fraction of 255, on or off, all for None."""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "all"}[value]
    fraction = Fraction(value).limit_denominator(255)
    return str(fraction) if fraction.denominator == 255 else f"{value:g}"


def per_dataset(table):
    """A per-dataset table ({dataset: value}) in a --help text's words: "1 for cifar10 and mnist; 2 for ..."."""
    words = {}
    for dataset, value in table.items():
        words.setdefault(said(value), []).append("own data" if dataset == OWN else dataset)
    return "; ".join(f"{v} for {', '.join(ds[:-1])}{' and ' if len(ds) > 1 else ''}{ds[-1]}" for v, ds in words.items())


# The --eps defaults in the --help texts (the scripts' first lines say where each comes from).
EPS_DEFAULTS = ". ".join(f"{norm}: {per_dataset(table)}" for norm, table in DEFAULT_EPS.items())


def header_lines(args, cfg, ckpt):
    """evaluate.py's lines on where eps and the batch size come from: a flag, the head, a default. A
    head is evaluated at its fine-tuning eps unless --eps says otherwise, and the line says both."""
    trained = (ckpt or {}).get("attack_eps")
    trained_at = f"{(ckpt or {}).get('threat_model')} eps {trained:.4g}" if trained else None
    if args.eps is None and head_eps(ckpt, cfg.threat_model):
        eps = f"eps {cfg.eps:.4g} (the head's: it was fine-tuned at this eps; --eps to set)"
    else:
        eps = eps_line(cfg.eps, args.eps is not None, cfg.threat_model, cfg.dataset)
        if trained_at and f"{cfg.threat_model} eps {cfg.eps:.4g}" != trained_at:
            eps = (f"{eps[:-1]}; the head was fine-tuned at {trained_at}: this is another threat model than "
                   "the one it was trained for)")
    if args.batch_size is not None:
        batch = "given as --batch-size"
    elif (ckpt or {}).get("batch_size"):
        batch = "the head's fine-tuning batch size; --batch-size to set, 1 for the per-image model"
    else:
        batch = "the default, the paper's fine-tuning batch size; --batch-size to set"
    return [eps, f"batch size {cfg.batch_size} ({batch})"]


FINETUNE_DATASET = "cifar10"  # finetune.py's without --dataset and --data
# Where each dataset's augmentation default comes from (finetune.py says it before training).
AUGMENT_ORIGIN = {"cifar10": "the IKL code's for cifar10", "cifar100": "the IKL code's for cifar100",
                  "imagenet": "our choice for imagenet", "mnist": "our choice for mnist: a flipped digit is "
                  "another digit", OWN: "own data's default"}


def finetune_origins(args, cfg):
    """finetune.py's first lines: where the data set, eps and augmentation come from (a flag, or
    whose default), so that nothing that changes the numbers is switched on silently."""
    if args.dataset is not None:
        dataset = "given as --dataset"
    elif cfg.dataset == OWN:
        dataset = (f"--data {cfg.data} without --dataset: your own data, image size from the file, classes "
                   "from the model")
    else:
        dataset = "the default; --dataset to choose, or --data FILE.npz alone for your own data"
    if args.augment is not None:
        augment = f"given as --{'' if cfg.augment else 'no-'}augment"
    else:
        augment = (f"{AUGMENT_ORIGIN[cfg.dataset]}; "
                   + ("--no-augment to turn it off" if cfg.augment else "--augment to crop and flip"))
    return [f"dataset {cfg.dataset} ({dataset})", eps_line(cfg.eps, args.eps is not None, cfg.threat_model,
                                                          cfg.dataset),
            f"augmentation {'on' if cfg.augment else 'off'} ({augment})"]


def finetune_banner(cfg, n):
    """finetune.py's settings in words, before the clean pass (n training images)."""
    if cfg.head == "ncm":
        return (f"NCM head on {cfg.model}: C_global = class means of {n} images; l2 logits to C_global alone "
                "(nothing trained)")
    return (f"HPM head on {cfg.model}: {n} {cfg.dataset} training images, {cfg.epochs} epoch(s) of batch "
            f"{cfg.batch_size}, Adam lr {cfg.lr:g}, EMA momentum {cfg.momentum}\nIKL alpha {cfg.alpha:g} beta "
            f"{cfg.beta:g} T {cfg.T:g}, class weights {cfg.class_weights}; attack {cfg.threat_model} eps "
            f"{cfg.eps:.4g}, {cfg.steps} steps of {cfg.step_size:.4g} on IKL with alpha {cfg.attack_alpha:g} beta "
            f"{cfg.attack_beta:g} ({cfg.attack_loss}) through mode {cfg.attack_mode!r}; mixer start "
            f"{cfg.mixer_init!r}")


@dataclass(frozen=True)
class FinetuneConfig:
    """finetune.py's settings: its flags by name (its --help says each), resolved and checked
    (finetune_settings). A field commented here is resolved, not only given; the head checkpoint
    records them all (dataclasses.asdict, in this order)."""
    model: str  # --model, its path made absolute (the checkpoint finds it from anywhere)
    weights: str | None
    dataset: str  # --dataset, else own data with --data alone, else cifar10
    threat_model: str
    data: str | None
    data_dir: str
    model_dir: str
    per_class: int | None  # per dataset (finetune.DEFAULTS), as are epochs, momentum, alpha, beta, T, augment
    out: str  # --out, else hpm_<dataset>_<model>.pt
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    alpha: float
    beta: float
    T: float
    eps: float  # --eps, else the dataset's (data.DEFAULT_EPS)
    steps: int
    step_size: float  # --step-size, else eps / 4
    attack_mode: str
    head: str
    dpnp_alpha: float
    lambda_dfa: float | None
    class_weights: str
    attack_loss: str
    augment: bool
    mixer_init: str
    seed: int
    device: str  # checked
    overwrite: bool
    no_progress: bool
    attack_alpha: float  # the training attack's IKL weights: --attack-loss official, the IKL code's
    attack_beta: float  # (finetune.OFFICIAL_ATTACK); train, alpha and beta
    dpnp_lambdas: tuple  # --head dpnp: (lambda_DPP, lambda_DNP, lambda_DFA), the dataset's (controls.py)


def finetune_settings(args, defaults, official_attack):
    """finetune.py's settings, resolved once before anything is loaded or written: the dataset's
    defaults where a flag was left out (finetune.DEFAULTS, the paper's; official_attack: the IKL
    code's attack alpha and beta), the Adv-DPNP control's lambdas, then every check."""
    s = dict(vars(args))
    if s["dataset"] is None:  # --data alone is own data, never CIFAR-10's augmentation and budget
        s["dataset"] = OWN if s["data"] is not None else FINETUNE_DATASET
    if s["eps"] is None:
        s["eps"] = DEFAULT_EPS[s["threat_model"]][s["dataset"]]
    for k, v in defaults[s["dataset"]].items():
        if s[k] is None:
            s[k] = v
    if s["step_size"] is None:
        s["step_size"] = s["eps"] / 4  # 10 steps of eps / 4 can cross the ball and come back
    s["attack_alpha"], s["attack_beta"] = (official_attack[s["dataset"]] if s["attack_loss"] == "official"
                                           else (s["alpha"], s["beta"]))
    s["dpnp_lambdas"] = controls.dpnp_lambdas(s["dataset"], s["lambda_dfa"])
    s["model"], s["weights"] = check_model(s["model"], s["weights"])
    if os.path.exists(s["model"]):
        s["model"] = os.path.abspath(s["model"])  # the checkpoint must find the file from anywhere
    if s["out"] is None:
        spec = code_spec(s["model"])
        stem = spec.name if spec is not None else os.path.splitext(os.path.basename(s["model"]))[0]
        s["out"] = f"hpm_{s['dataset']}_{stem}.pt"
    check_positive(epochs=s["epochs"], batch_size=s["batch_size"], steps=s["steps"], per_class=s["per_class"])
    check_eps(s["eps"], s["threat_model"])
    for flag in ("lr", "T", "step_size", "dpnp_alpha"):
        check_number(flag, s[flag], lambda v: v > 0, "a number > 0")
    for flag in ("alpha", "beta", "lambda_dfa"):  # the weights of loss terms
        check_number(flag, s[flag], lambda v: v >= 0, "a number >= 0")
    check_number("momentum", s["momentum"], lambda v: 0 <= v < 1, "a number in [0, 1)")
    check_seed(seed=s["seed"])
    check_out(s["out"], [s["model"], s["data"], s["data_dir"], *code_inputs(s["model"], s["weights"])],
              is_head_file, "head checkpoint")
    s["device"] = str(check_device(s["device"]))
    return FinetuneConfig(**s)


def resolve_attackers(s, attacks, version):
    """--attackers K[,K...] and --attacker-eps E (K of B, batch_attacks.py), checked as said below;
    the rows run the version's attacker attacks unless --attacks (`attacks`, None: not given) does."""
    text = s["attackers"]
    s["attackers"] = []
    if text is not None:
        try:
            s["attackers"] = sorted({int(k) for k in text.split(",") if k.strip()})
        except ValueError:
            raise CLIError(f"--attackers takes numbers of slots like 1,8; got {text!r}")
        if not s["attackers"]:
            raise CLIError("--attackers is empty; give numbers of slots like 1,8")
        B = s["batch_size"]
        bad = [k for k in s["attackers"] if not 1 <= k < B]
        if bad:
            raise CLIError(f"--attackers {bad[0]}: the attacker holds K of the B = {B} slots of a fixed batch, "
                           f"1 <= K < {B} (K = B is the whole batch: the row hpm/batch)")
        if s["head_type"] != "hpm":
            raise CLIError("--attackers needs an HPM head: " + ("a base model alone" if s["head_type"] is None
                           else f"a {s['head_type']} head") + " has no batch context, so nobody's images "
                           "change anyone else's label")
    E = s["attacker_eps"]
    if E is not None and not s["attackers"]:
        raise CLIError("--attacker-eps needs --attackers K: it is the budget of the attacker's K slots")
    s["attacker_eps"] = s["eps"] if E is None else E
    if not (s["attacker_eps"] > 0 and (s["threat_model"] != "Linf" or s["attacker_eps"] <= 1)):
        raise CLIError(f"--attacker-eps must lie in (0, 1] (L-inf: 1 is any image), got {s['attacker_eps']:g}")
    if s["attackers"] and attacks is None:
        s["attacks"] = parse_attacks(",".join(version["attacks"] + ATTACKER_ATTACKS))
    elif s["attackers"] and not any(CATALOGUE[a].runs_on == "attackers" for a in s["attacks"]):
        # --attacks names none of the K-of-B rows' own: APGD-CE/-DLR asked of every row is, on those
        # rows, the same attack through the same surrogate on the attacker's slots
        own = [f"own:{a}" for a in s["attacks"] if f"own:{a}" in CATALOGUE]
        if not own:
            raise CLIError(f"--attacks {attacks} has no attack for the --attackers rows: add apgd-ce or apgd-dlr "
                           "(run on the attacker's slots), or name theirs (own:..., benign:...)")
        s["attacks"] = parse_attacks(",".join(s["attacks"] + own))


def select_subset(n_total, n_examples, seed):
    """Sorted indices of a fixed uniform subset of the test set."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(n_examples, n_total)].sort().values


def load_subset(cfg, num_classes):
    """(x uint8 (n, C, H, W), y (n,), sorted indices (n,), size of the test set, n): the fixed subset
    of cfg's n_examples (at most all), else the paper's 25% of the test set. num_classes None: the
    labels are checked later (checkpoint.count_classes)."""
    split = "val" if cfg.dataset == "imagenet" else "test"
    x_all, y_all = load_data(cfg.dataset, split, data=cfg.data, data_dir=cfg.data_dir,
                             per_class=cfg.per_class)
    if num_classes is not None:
        check_labels(y_all, num_classes, cfg.data or f"{cfg.dataset} {split}")
    n_examples = cfg.n_examples
    if n_examples is None:  # the paper: a fixed 25% of the test set (ImageNet: all 5000)
        n_examples = len(y_all) if cfg.dataset == "imagenet" else max(1, round(len(y_all) / 4))
    idx = select_subset(len(y_all), n_examples, cfg.subset_seed)
    return x_all[idx], y_all[idx], idx, len(y_all), len(idx)  # the number evaluated


def open_results(cfg, n):
    """(the results to fill, cfg): empty to start, or what --out holds to resume (n images), refused
    if of another configuration (unless --overwrite) or if it does not hold together (Results.problem).
    Writes nothing. The cfg returned also names the attacks a resumed file finished."""
    out = cfg.out
    if not out or not os.path.exists(out) or cfg.overwrite:
        return Results(), cfg
    results = Results.read(out)  # (resolve_config refused any other file at --out)
    old = results.config
    diff = [f"{k}: {shown(old.get(k))} there, {shown(v)} now" for k, v in identity(cfg).items() if old.get(k) != v]
    if diff:
        raise CLIError(f"{out} holds results of another configuration ({'; '.join(diff[:3])}); to keep them, "
                       "give this run another --out (--overwrite would discard them and start over)")
    problem = results.problem(make_batches(n, cfg.batch_size))
    if problem:
        raise CLIError(f"{out} does not hold together ({problem}): it was edited or damaged; choose another "
                       "--out, or pass --overwrite to start over")
    print(f"resuming from {out}")
    attacks = set(cfg.attacks) | set(old.get("attacks") or [])
    return results, replace(cfg, attacks=[a for a in ALL_ATTACKS if a in attacks],
                            attackers=sorted(set(cfg.attackers) | set(old.get("attackers") or [])))


def names_a_file(model):
    """The head's model is code, a file (load_model would unpickle it) or a spec FILE.py:NAME or
    package.module:NAME (it would run), not a RobustBench name (which never has a colon)."""
    return os.path.exists(model) or model.endswith((".pt", ".pth", ".ckpt")) or os.sep in model or ":" in model
