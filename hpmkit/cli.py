"""The command line and the console: bad input as one line, the flags' checks, progress.

Bad input is a `CLIError`, printed by `run_cli` as one line (exit status 2, no traceback), and so
are argparse's own errors. The installed commands (`hpm-finetune`, `hpm-evaluate`) and the Python
API run finetune.py and evaluate.py, which stay files at the repository's root, read as the
protocol, never installed as top-level modules (a module `evaluate` would shadow Hugging Face's
package): they are found beside this package (a checkout, or pip install -e .), else in
PREFIX/share/hpm (pip install ., pyproject.toml's data-files).
"""
import argparse
import importlib.util
import math
import os
import runpy
import sys
import sysconfig
import time
from fractions import Fraction
from pathlib import Path

import torch


class CLIError(ValueError):
    """Bad input from the user: printed as one line, without a traceback (a ValueError: the Python
    API raises it with the line the command line prints)."""


PROG = None  # the installed command running a script (run_script), else None


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for both scripts: a bad flag or value is one line, not the 15-line usage
    (`--help` prints that), and a flag is never taken for a longer one it abbreviates (`--epoch 1`
    is no `--epochs 1`). prog: the command as the user ran it (hpm-evaluate, or evaluate.py)."""

    def __init__(self, **kwargs):
        super().__init__(prog=PROG or os.path.basename(sys.argv[0]), allow_abbrev=False, **kwargs)

    def error(self, message):
        raise CLIError(f"{message} ({self.prog} --help lists the flags)")


def run_cli(main, parse_args, argv=None, interrupted=None):
    """The scripts' `__main__`: CLIError -> one line on stderr and exit status 2; Ctrl-C -> 130;
    the reader of the output gone (`| head -1`) -> silence and 141, as a pipe's writer that
    SIGPIPE ends (every file written so far is whole: a rerun resumes)."""
    try:
        main(parse_args(argv))
        sys.stdout.flush()  # (a closed pipe shows here, not as a traceback at exit)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        try:  # what is still buffered for the pipe goes nowhere, not to a traceback at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # not a real file (a test's capture)
            pass
        return 141
    return 0


def first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# Flags -----------------------------------------------------------------------------------------

def eps_value(text):
    """argparse type of --eps: a number or a fraction such as 8/255 (non-negative); argparse prints
    what is wrong (ArgumentTypeError), not only "invalid value"."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or a fraction like 8/255: {text!r}")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


eps_value.__name__ = "eps"  # argparse names the type in its error message


def check_eps(eps, threat_model):
    """An L-inf budget above 1 cannot be meant: inputs lie in [0, 1] (pixels are 8/255, not 8)."""
    if threat_model == "Linf" and eps > 1:
        raise CLIError(f"--eps {eps:g} is above 1, but inputs lie in [0, 1]; for a budget in "
                       f"pixel levels write it as a fraction, e.g. --eps {eps:g}/255")


def check_positive(**values):
    """Each named count (batch size, steps, queries, epochs, ...) must be at least 1."""
    for name, v in values.items():
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {v}")


def is_number(v):
    """A finite real number (not a bool), as a file's field must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_number(name, value, ok, what):
    """A number flag (None: left out): finite and ok(value), else one line naming the flag."""
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise CLIError(f"--{name.replace('_', '-')} must be {what}, got {value:g}")


def check_seed(**seeds):
    """Each named seed fits torch's generator, [0, 2**63)."""
    for name, v in seeds.items():
        if not 0 <= v < 2 ** 63:
            raise CLIError(f"--{name.replace('_', '-')} must lie in [0, 2**63), got {v}")


def check_device(name):
    """torch.device(name), refused in one line where it is unknown or not available here."""
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}, but no CUDA GPU is available; pass --device cpu")
    use = "use --device cpu" + (" or cuda" if torch.cuda.is_available() else "")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, AttributeError, NotImplementedError) as e:
        raise CLIError(f"--device {name} is not available here ({first_line(e)}); {use}")
    if device.type == "meta":
        raise CLIError(f"--device meta holds no data; {use}")
    return device


# The console -------------------------------------------------------------------------------

def progress_bar(total, desc, enabled=True, every=60.0):
    """A tqdm bar on a terminal; in a redirected log no bar (thousands of fragments), only a
    line every `every` seconds; `enabled=False`: nothing."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
    return LogProgress(total, desc, every if enabled else math.inf)


class LogProgress:
    """The part of tqdm's interface the scripts use, as a compact line per `every` seconds."""

    def __init__(self, total, desc, every):
        self.total, self.desc, self.every, self.n, self.postfix = total, desc, every, 0, ""
        self.last = time.time()

    def update(self, n=1):
        self.n += n
        if time.time() - self.last >= self.every:
            self.last = time.time()
            print(f"  {self.desc}: {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text):
        self.postfix = text

    def close(self):
        pass


def say(line):
    """A line on stdout, flushed at once: a redirected log shows it when it happens, not at exit."""
    print(line, flush=True)


def duration(seconds):
    """12.3 s, 4.5 min, 2.1 h."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


# The installed commands -------------------------------------------------------------------------

def script_path(name):
    for folder in (Path(__file__).resolve().parent.parent, Path(sysconfig.get_path("data")) / "share" / "hpm"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is neither beside hpmkit nor in {sys.prefix}/share/hpm: reinstall the "
                            "project (pip install .)")


def run_script(name):
    """Run the script as `python SCRIPT ARGS...` does (its exit status is the command's); its messages
    name the command the user ran (hpm-evaluate), which runpy's sys.argv[0], the script's path, would not."""
    global PROG
    PROG = Path(sys.argv[0]).name
    runpy.run_path(str(script_path(name)), run_name="__main__")


def load_script(name):
    """The script as a module (imported once, under the name hpm_<script>)."""
    module_name = "hpm_" + Path(name).stem
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, script_path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def finetune():
    run_script("finetune.py")


def evaluate():
    run_script("evaluate.py")
