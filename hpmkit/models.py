"""The base models: a RobustBench model by name, a whole pickled nn.Module from a path the user
names, or a model built by the user's own code (--model FILE.py:NAME or package.module:NAME, with
--weights STATE_DICT.pt); each takes images in [0, 1] and returns logits. Also the check that a
model takes the images, and the fingerprint that ties a head to the base model it was trained on.

A pickle and a code spec are code: they run only when the user names them on the command line.
A --weights file is data (torch.load with weights_only=True)."""
import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from dataclasses import dataclass

import torch

from hpmkit.autoattack import alias_autoattack
from hpmkit.cli import CLIError, first_line
from hpmkit.data import OWN, to_float
from hpmkit.files import sha256

SAVE_WEIGHTS = 'torch.save(model.state_dict(), "W.pt")'  # how a user writes --weights


@dataclass(frozen=True)
class CodeSpec:
    """--model FILE.py:NAME or package.module:NAME: NAME, a class or a function of no arguments,
    builds the model. source: the .py file's path, or the dotted module name."""
    source: str
    name: str

    @property
    def is_file(self):
        return self.source.endswith(".py")


def code_spec(model):
    """The CodeSpec of --model, None where it names no code (a RobustBench name never has a colon;
    an existing file is a pickle, whatever its name), or one line saying how to write it."""
    if os.path.exists(model):
        if model.endswith(".py"):
            raise CLIError(f"--model {model} is Python code: name what builds the model, --model "
                           f"{model}:NAME (a class, or a function of no arguments), with --weights W.pt")
        return None
    if ":" not in model:
        return None
    source, name = model.rsplit(":", 1)
    if not name.isidentifier():
        raise CLIError(f"--model {model}: after the colon give the name of a class or function that builds "
                       f"the model, got {name!r}")
    if not (source.endswith(".py") or all(part.isidentifier() for part in source.split("."))):
        raise CLIError(f"--model {model}: before the colon give a file FILE.py or a module package.module, "
                       f"got {source!r}")
    if source.endswith(".py") and not os.path.isfile(source):
        raise CLIError(f"model code file {source} does not exist")
    return CodeSpec(source, name)


@contextlib.contextmanager
def import_path(*folders):
    """folders first on sys.path for the block (those it did not hold), taken out after it."""
    added = [f for f in dict.fromkeys(folders) if f not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for f in added:
            if f in sys.path:
                sys.path.remove(f)


@contextlib.contextmanager
def as_program(spec):
    """The block runs the spec's code as a program of its own: sys.argv is [its file] alone (an
    argparse in the user's code sees none of our flags) and its folder (a module's: the current
    folder) is first on the import path, so that its own imports work."""
    argv = sys.argv
    sys.argv = [spec.source]
    try:
        with import_path(os.path.dirname(os.path.abspath(spec.source)) if spec.is_file else os.getcwd()):
            yield
    finally:
        sys.argv = argv


def code_file(spec):
    """The file whose contents are the code of a spec: the .py file, or the module's own file
    (found with the current folder on the import path; a package's parents are imported)."""
    if spec.is_file:
        return os.path.abspath(spec.source)
    with import_path(os.getcwd()):
        try:
            found = importlib.util.find_spec(spec.source)
        except ModuleNotFoundError:  # its package is not there
            found = None
        except Exception as e:  # a parent package that does not import
            raise CLIError(f"cannot import module {spec.source} ({first_line(e)})")
    if found is None or not found.origin or not os.path.isfile(found.origin):
        raise CLIError(f"no module {spec.source} here: run from the folder that holds it (the current "
                       f"folder is on the import path), or name its file, --model path/to/FILE.py:{spec.name}")
    return found.origin


def code_identity(spec):
    """What a code spec is by content: the SHA-256 of its file, and NAME."""
    return f"{sha256(code_file(spec))}:{spec.name}"


def import_code(spec):
    """The module of a spec, imported as_program. A file is loaded afresh under its own name, which
    sys.modules holds only while it runs (a file elsewhere with that name stays as it was)."""
    try:
        with as_program(spec):
            if not spec.is_file:
                return importlib.import_module(spec.source)
            path = os.path.abspath(spec.source)
            stem = os.path.splitext(os.path.basename(path))[0]
            module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(stem, path))
            had, previous = stem in sys.modules, sys.modules.get(stem)
            sys.modules[stem] = module  # (dataclasses and the like look their module up while it runs)
            try:
                module.__spec__.loader.exec_module(module)
            finally:
                if had:
                    sys.modules[stem] = previous
                else:
                    sys.modules.pop(stem, None)
            return module
    except (Exception, SystemExit) as e:  # a syntax error, a missing import, its top level failing or exiting
        hint = ("; its top level runs when imported: keep a script's work under if __name__ == \"__main__\":"
                if isinstance(e, SystemExit) else "")
        raise CLIError(f"{spec.source} does not import ({first_line(e)}){hint}")


def build_from_code(spec):
    """NAME() of a spec: a class or a function that takes no arguments, returning an nn.Module."""
    module = import_code(spec)
    build = getattr(module, spec.name, None)
    if build is None:
        defined = [n for n, v in vars(module).items() if (inspect.isclass(v) or inspect.isfunction(v))
                   and getattr(v, "__module__", None) == module.__name__]
        raise CLIError(f"{spec.source} has no {spec.name!r}" + (f"; it defines {', '.join(defined[:6])}"
                                                               if defined else ""))
    if not callable(build):
        raise CLIError(f"{spec.source}:{spec.name} is a {type(build).__name__}, not a class or function")
    try:
        inspect.signature(build).bind()
    except TypeError as e:
        raise CLIError(f"{spec.name} needs arguments ({e}); give a class or a function that builds the model "
                       f"with none, e.g. def build(): return {spec.name}(...), and --model {spec.source}:build")
    except ValueError:  # no signature to read (a builtin): the call says
        pass
    try:
        with as_program(spec):  # (an import inside NAME finds the file's neighbours too)
            net = build()
    except SystemExit as e:  # quit(), sys.exit(n), an argparse error: the builder ended the program
        raise CLIError(f"{spec.source}:{spec.name}() exited (status {e.code!r}) instead of returning the model; "
                       "a builder must return an nn.Module, not end the program")
    except Exception as e:
        raise CLIError(f"{spec.source}:{spec.name}() failed while building the model ({first_line(e)})")
    if not isinstance(net, torch.nn.Module):
        raise CLIError(f"{spec.source}:{spec.name}() returned a {type(net).__name__}, not an nn.Module")
    return net


def read_weights(path):
    """A state_dict from --weights, read as data (weights_only): bare, or under "state_dict"."""
    if not os.path.isfile(path):
        raise CLIError(f"weights file {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e) or "Weights only load failed" in str(e):
            raise CLIError(f"--weights {path} holds pickled objects, not a state_dict (a whole model? pass "
                           f"it as --model {path} instead, or write its weights: {SAVE_WEIGHTS})")
        raise CLIError(f"could not read weights {path} ({first_line(e)}); write them with {SAVE_WEIGHTS}")
    if isinstance(state, dict) and "head" in state and "model" in state:
        raise CLIError(f"{path} is a head checkpoint of finetune.py, not weights: pass it as --head")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in state.items())):
        raise CLIError(f"--weights {path} holds a {type(state).__name__}, not a state_dict (tensors by name): "
                       f"write it with {SAVE_WEIGHTS}")
    return state


def load_code_model(spec, weights=None):
    """The model a code spec builds, with --weights loaded into it strictly, else one line naming the
    first keys or shapes that do not fit (None: as NAME builds it, a one-line note says so). The
    weights are read first: they are data, checked before code runs."""
    state = None if weights is None else read_weights(weights)
    net = build_from_code(spec)
    if state is None:
        print(f"note: no --weights: the model is used as {spec.name}() builds it")
        return net.eval()
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected = [k for k in own if k not in given], [k for k in given if k not in own]
    shapes = [f"{k} {given[k]} there, {own[k]} in the model" for k in own if k in given and given[k] != own[k]]
    problems = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if keys]
    if problems:
        raise CLIError(f"--weights {weights} do not fit the model {spec.name}() builds: {'; '.join(problems)}")
    net.load_state_dict(state)
    return net.eval()


# torch.nn's layers that compute something else in train mode than in eval mode.
MODE_DEPENDENT = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)


def load_model_file(path):
    """A whole pickled nn.Module saved with torch.save(model, path). Unpickling runs code: only
    ever from a path the user named. Its classes are found from the current folder and the
    file's own folder as well as the import path."""
    alias_autoattack()
    try:
        with warnings.catch_warnings(), import_path(os.getcwd(), os.path.dirname(os.path.abspath(path))):
            warnings.simplefilter("ignore")  # robustbench's imports warn about pkg_resources
            net = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise CLIError(f"model file {path} refers to module {e.name!r}, which Python cannot import here: a "
                       f"pickled nn.Module stores its class by name, not its code; run from the folder that "
                       f"holds {e.name.split('.')[0]}.py (or add it to PYTHONPATH), or pass --model "
                       f"FILE.py:NAME --weights W.pt (write W.pt with {SAVE_WEIGHTS})")
    except AttributeError as e:
        if "__main__" not in str(e):  # (run with -m, __main__ shows as <module 'pkg.__main__'>)
            raise CLIError(f"could not load model file {path} ({first_line(e)}); the class it was saved "
                           f"from changed: pass --model FILE.py:NAME --weights W.pt ({SAVE_WEIGHTS})")
        found = re.search(r"attribute '([^']+)'", str(e))
        name = found.group(1) if found else "NAME"
        raise CLIError(f"model file {path} holds class {name} of a script run as __main__, which no other "
                       f"program can find: in that script write the weights, {SAVE_WEIGHTS}, and pass "
                       f"--model SCRIPT.py:{name} --weights W.pt (keep its training under "
                       'if __name__ == "__main__":)')
    except Exception as e:  # truncated, not a torch file, a class that changed since it was saved
        raise CLIError(f"could not load model file {path} ({first_line(e)}); it must hold a whole "
                       f"nn.Module saved with torch.save(model, path), or use --model FILE.py:NAME "
                       f"--weights W.pt ({SAVE_WEIGHTS})")
    if isinstance(net, dict) and "head" in net and "model" in net:
        raise CLIError(f"{path} is a head checkpoint of finetune.py, not a model: pass it as --head")
    if isinstance(net, dict):
        raise CLIError(f"{path} holds a dict (a state_dict?), not a whole pickled nn.Module: pass the code "
                       f"that builds the model with it, --model FILE.py:NAME --weights {path}")
    if not isinstance(net, torch.nn.Module):
        raise CLIError(f"{path} holds a {type(net).__name__}, not a whole pickled nn.Module "
                       "(save it with torch.save(model, path))")
    layers = sorted({type(m).__name__ for m in net.modules() if m.training and isinstance(m, MODE_DEPENDENT)})
    if layers:  # saved in the middle of training: the scripts' eval() changes what it computes
        print(f"note: model file {path} was saved in train mode, where its {' and '.join(layers)} layers act "
              "otherwise; the scripts use it in eval mode (model.eval(): dropout off, batch norm's running "
              "statistics)")
    return net.eval()


def check_model(model, weights):
    """--model and --weights checked before anything is loaded: (the model, a code file by its
    absolute path, found again from any folder; the weights' absolute path, or None)."""
    spec = code_spec(model)
    if weights is not None and spec is None:
        raise CLIError(f"--weights needs --model FILE.py:NAME or package.module:NAME, the code that builds "
                       f"the model; --model {model} brings its own weights")
    if weights is not None and not os.path.isfile(weights):
        raise CLIError(f"weights file {weights} does not exist")
    if spec is not None and spec.is_file:
        model = f"{os.path.abspath(spec.source)}:{spec.name}"
    return model, None if weights is None else os.path.abspath(weights)


def load_model(model, dataset, threat_model="Linf", model_dir="./models", weights=None):
    """The base model --model names (one of the three kinds above), in eval mode."""
    spec = code_spec(model)
    if spec is not None:
        return load_code_model(spec, weights)
    if weights is not None:
        check_model(model, weights)  # (refuses it in one line)
    if os.path.exists(model):
        return load_model_file(model)
    if model.endswith((".pt", ".pth", ".ckpt", ".py")) or os.sep in model:
        raise CLIError(f"model file {model} does not exist")
    if dataset == OWN:
        raise CLIError(f"no model file {model}; a RobustBench name needs --dataset (own data has no "
                       "RobustBench models): pass --model FILE.pt, or --model FILE.py:NAME --weights W.pt")
    alias_autoattack()
    with warnings.catch_warnings():  # robustbench's imports warn about pkg_resources and torch.jit
        warnings.simplefilter("ignore")
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        from robustbench.utils import load_model as rb_load_model

    try:
        names = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)].keys()
    except (ValueError, KeyError):
        raise CLIError(f"RobustBench has no models for dataset {dataset!r} and threat model "
                       f"{threat_model!r}; pass --model PATH to a pickled nn.Module instead")
    if model not in names:
        close = difflib.get_close_matches(model, list(names), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CLIError(f"unknown RobustBench model {model!r} for {dataset} {threat_model}{hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = rb_load_model(model_name=model, model_dir=model_dir, dataset=dataset,
                                threat_model=threat_model)
    except Exception as e:  # network errors come in many types; the first line says enough
        raise CLIError(f"could not load RobustBench model {model!r} into {model_dir} "
                       f"({first_line(e)}); without a network, download it once elsewhere and "
                       "pass --model PATH (torch.save(model, path))")
    return net.eval()


def check_images(model, x, device, name="the model"):
    """Two forwards of `model` on two images, before anything is written: what the scripts cannot
    use fails here in one line; a stochastic model gets a warning, as in AutoAttack's checks."""
    odd = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                  if p.is_floating_point() and p.dtype != torch.float32})
    if odd:
        raise CLIError(f"{name} holds {' and '.join(odd)} weights; the scripts feed it float32 images: "
                       "save it after model.float()")
    try:
        with torch.no_grad():
            logits = model(to_float(x[:2], device))
            again = model(to_float(x[:2], device))
    except (RuntimeError, ValueError) as e:
        if str(e).startswith("attach:"):  # hpm: the final nn.Linear does not make the logits
            raise CLIError(str(e))
        raise CLIError(f"{name} cannot classify images of shape {tuple(x.shape[1:])} (C, H, W): "
                       f"{str(e).splitlines()[0]}")
    if not torch.is_tensor(logits):
        raise CLIError(f"{name} returns a {type(logits).__name__}, not a logits tensor: wrap it in a "
                       "module whose forward returns the logits alone, save that, and pass it")
    if not torch.isfinite(logits).all():
        raise CLIError(f"{name} returns NaN or inf logits on clean images; check the model file "
                       "and that inputs are meant to lie in [0, 1]")
    if not torch.allclose(logits, again, rtol=1e-4, atol=1e-5):
        print(f"warning: {name} gives other logits for the same images in a second forward (randomness "
              "in forward, such as dropout or noise left on in eval()): the attacks see a moving target "
              "and its robust accuracy may be overestimated; evaluate a deterministic model")


@contextlib.contextmanager
def as_given(*objects):
    """The modules among objects left as they were given after the block, also on error: every
    submodule's training flag, every parameter's requires_grad, and the device of a module whose
    tensors lie on one (the Python API freezes and moves the caller's model for its run only)."""
    modules = [m for m in objects if isinstance(m, torch.nn.Module)]
    training = [(s, s.training) for m in modules for s in m.modules()]
    grads = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    devices = [(m, {t.device for t in (*m.parameters(), *m.buffers())}) for m in modules]
    try:
        yield
    finally:
        for m, given in devices:
            if len(given) == 1:
                m.to(given.pop())
        for s, flag in training:
            s.training = flag
        for p, flag in grads:
            p.requires_grad_(flag)


def fingerprint(state):
    """A short hash of a model's tensors (a state_dict): which base model a head was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def compile_head(head):
    """--compile: the head's forward through torch.compile, in place, tried at once: a machine that
    cannot compile fails here, in one line, not inside the first attack. An evaluation calls it in
    up to ~20 forms (modes, contexts, grouped or not, gradients, batch shapes): room for all."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, limit, max(getattr(config, limit), 64))
    head.compile()
    w = head.fc.weight
    try:
        with torch.no_grad():
            head(torch.zeros(2, w.shape[1], device=w.device, dtype=w.dtype))
    except Exception as e:
        while getattr(e, "inner_exception", None) or e.__cause__:  # the compiler's own error,
            e = getattr(e, "inner_exception", None) or e.__cause__  # not dynamo's wrapper
        first = (str(e).strip().splitlines() or [""])[0]
        raise CLIError(f"--compile: torch.compile fails on this machine ({type(e).__name__}: {first}); "
                       "run without --compile")
    return head
