"""The files the scripts write: atomically, one run at a time, never over a file not theirs.

- `atomic_write`: a temporary file of its own beside PATH, then renamed over it: a run that
  dies never leaves half a file.
- `OutLock`: PATH.lock names the process that writes PATH; a second run stops in one line.
- `check_out`: --out checked before any work (a folder, an input, a file of another kind).
- `dumps`: indented JSON whose per-image lists stay on one line.
"""
import hashlib
import json
import os
import tempfile

import torch

from hpmkit.cli import CLIError


def atomic_write(path, write):
    """write(file object) into a temporary file of its own beside PATH (two runs on one PATH never
    share one), then rename it over PATH: never half a file at PATH."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    atomic_write(path, lambda f: f.write((dumps(obj) + "\n").encode()))


def dumps(obj, indent=0):
    """Indented JSON; a list of numbers or short strings stays on one line (per-image lists)."""
    pad = " " * indent
    if isinstance(obj, dict) and obj:
        items = [f"{pad}  {json.dumps(str(k))}: {dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) or
                                              (isinstance(v, str) and len(v) > 40) for v in obj):
        items = [f"{pad}  {dumps(v, indent + 2)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class OutLock:
    """Context manager: PATH.lock names the process that writes PATH; a second run on the same
    PATH stops at once, in one line (a lock left by a process that died is taken over)."""

    def __init__(self, path):
        self.path, self.lock = path, path + ".lock"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.lock)), exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(self.lock) as f:
                    pid = int(f.read().strip() or 0)
                os.kill(pid, 0)  # alive?
            except (OSError, ValueError):
                os.remove(self.lock)  # stale: its process is gone
                return self.__enter__()
            raise CLIError(f"another run (process {pid}) is writing {self.path}; wait for it to end or "
                           f"choose another --out (if no such run exists, remove {self.lock})")
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        if os.path.exists(self.lock):
            os.remove(self.lock)


def check_out(path, inputs=(), replaceable=None, what="file"):
    """--out can be written, checked before any work: not a folder, not under a regular file, in
    a folder this user may write in, never one of the run's inputs (files or folders), and, if
    it exists, a file the script may replace (replaceable(path) True: a `what` of its own)."""
    if os.path.isdir(path):
        raise CLIError(f"--out {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise CLIError(f"--out {path} lies under {folder}, which is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: no permission to write in {folder}")
    if not os.path.exists(path):
        return
    for given in inputs:
        if given and os.path.exists(given) and os.path.samefile(given, path):
            raise CLIError(f"--out {path} is an input of this run ({given}); choose another --out")
    if replaceable is not None and not replaceable(path):
        raise CLIError(f"--out {path} exists and is not a {what}; it is never replaced: choose another --out")
