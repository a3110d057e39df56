"""The two scripts wherever the project is installed: as commands (`hpm-finetune`, `hpm-evaluate`,
pyproject.toml's entry points) and, for the Python API (hpmkit.api), as a module.

finetune.py and evaluate.py stay files at the repository's root, read as the protocol, and are
never installed as top-level modules (a module `evaluate` would shadow Hugging Face's package).
They are found beside this package (a checkout, or pip install -e .), else in PREFIX/share/hpm
(pip install ., pyproject.toml's data-files).
"""
import importlib.util
import runpy
import sys
import sysconfig
from pathlib import Path

SCRIPTS = ("finetune.py", "evaluate.py")


def script_path(name):
    """Where the script `name` (finetune.py or evaluate.py) is."""
    for folder in (Path(__file__).resolve().parent.parent, Path(sysconfig.get_path("data")) / "share" / "hpm"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{name} is neither beside hpmkit nor in {sys.prefix}/share/hpm: reinstall the "
                            "project (pip install .)")


def run(name):
    """Run the script as `python SCRIPT ARGS...` does (its exit status is the command's); its messages
    name the command the user ran (hpm-evaluate), which runpy's sys.argv[0], the script's path, would not."""
    from hpmkit import cli

    cli.PROG = Path(sys.argv[0]).name
    runpy.run_path(str(script_path(name)), run_name="__main__")


def load(name):
    """The script as a module (imported once, under the name hpm_<script>)."""
    module_name = "hpm_" + Path(name).stem
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, script_path(name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def finetune():
    run("finetune.py")


def evaluate():
    run("evaluate.py")
