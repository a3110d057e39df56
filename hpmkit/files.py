"""The files the scripts write: atomically (`atomic_write`), through links, one run at a time
(`OutLock`), never over a file not theirs (`check_out`, before any work)."""
import errno
import hashlib
import json
import os
import re
import stat
import tempfile

import torch

from hpmkit.cli import CLIError

# A temporary file of atomic_write beside PATH: PATH.hpm-PID-xxxxxxxx.tmp (PID: its process's;
# xxxxxxxx: mkstemp's random letters), a name no user gives a file; remove_stale_tmp removes
# only such names, and only those whose process is gone.
TMP = re.compile(r"\.hpm-(\d{1,10})-[a-z0-9_]{8}\.tmp")

# What a run writes beside --out, at most, in bytes of the name: OUT.unfinished.pt's temporary
# file, OUT.unfinished.pt.hpm-PID-xxxxxxxx.tmp (finetune.py), or OUT.parts (torchrun).
BESIDE = len(".unfinished") + len(".hpm-4194304-xxxxxxxx.tmp")  # (Linux's largest PID)


def atomic_write(path, write):
    """write(file object) into a temporary file of its own beside the file PATH names (two runs on
    one PATH never share one), then rename it over that file: a run that dies never leaves half a
    file. The file keeps its mode; a write that fails (a full disk, say) is one line, the file unchanged."""
    target = os.path.realpath(path)  # a symlink stays one: its target is the file replaced
    tmp = None
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".tmp",
                                   prefix=f"{os.path.basename(target)}.hpm-{os.getpid()}-")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, file_mode(target))  # mkstemp's 0600 is for the temporary file alone
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise CLIError(f"could not write {path} ({e.strerror or e}); it keeps its earlier contents") from e
        raise


def file_mode(path):
    """The mode a rewritten file keeps; a new one gets what open() would give it."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # read by setting it, so set it back at once
        os.umask(umask)
        return 0o666 & ~umask


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


def too_deep(obj, limit):
    """obj nests lists and dicts more than `limit` deep (walked without recursion: a file may hold
    JSON nested thousands deep)."""
    todo = [(obj, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            todo += [(w, depth + 1) for w in (v.values() if isinstance(v, dict) else v)]
    return False


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def remove_stale_tmp(path):
    """The temporary files of atomic_write that a killed run left beside PATH: only names of TMP's
    form (PATH.hpm-PID-xxxxxxxx.tmp) whose process PID is gone; a file of any other name, or of a
    live process, stays. Called with PATH's lock held."""
    folder, base = os.path.split(os.path.realpath(path))
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        found = TMP.fullmatch(name[len(base):]) if name.startswith(base) else None
        if found and not alive(int(found.group(1))):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def alive(pid):
    """A process PID exists (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: is it alive?
    except PermissionError:
        return True  # alive, another user's
    except (OSError, OverflowError):
        return False
    return True


def kind_of(mode):
    """What a path that is not a regular file is, in words."""
    return ("a folder" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


class OutLock:
    """Context manager: one run writes PATH at a time, whichever script and however PATH is
    spelled: the lock is R.lock, R the resolved PATH, holding its run's PID. A second run stops in
    one line; a stale lock is taken over: an empty one, one naming this very process (a PID reused
    after a restart), or one whose process is gone. Folders made for the lock go again if the run
    leaves them empty."""

    def __init__(self, path):
        self.path, self.lock, self.made = path, os.path.realpath(path) + ".lock", []

    def __enter__(self):
        self.made = make_folders(os.path.dirname(self.lock))
        try:
            for _ in range(3):  # a stale lock is removed, then this run's is made
                if self.create():
                    break
                pid, seen = self.holder()
                if pid is not None:
                    raise CLIError(f"another run (process {pid}) is writing {self.path}; wait for it to end or "
                                   f"choose another --out (if no such run exists, remove {self.lock})")
                if seen is not None and same_file(self.lock, seen):
                    os.remove(self.lock)
            else:
                raise CLIError(f"could not take the lock {self.lock}: other runs keep taking it")
        except BaseException:
            self.remove_folders()
            raise
        remove_stale_tmp(self.lock[:-len(".lock")])
        return self

    def create(self):
        """The lock with this process's PID, made in one step (a hard link of a written file, so no
        run ever sees it empty); False if a lock is there already."""
        pid, tmp = str(os.getpid()), f"{self.lock}.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                f.write(pid)
            try:
                os.link(tmp, self.lock)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)  # no hard links here
                os.write(fd, pid.encode())
                os.close(fd)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise CLIError(f"could not create the lock {self.lock} ({e.strerror or e}); nothing was written")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def holder(self):
        """(PID of the live run that holds the lock, None) or, for a stale lock, (None, its stat),
        never opening anything but a regular file; a lock that is no lock of ours: one line."""
        try:
            st = os.lstat(self.lock)
            if not stat.S_ISREG(st.st_mode):
                raise CLIError(f"{self.lock} is {kind_of(st.st_mode)}, not a lock file of these scripts; "
                               "remove it or choose another --out")
            with open(self.lock, "rb") as f:
                text = f.read(64).strip()
        except FileNotFoundError:  # its run just ended
            return None, None
        if not text:  # a run killed as it wrote it, or a full disk
            return None, st
        if not text.isdigit():
            raise CLIError(f"{self.lock} does not name a process: it is no lock of these scripts; remove it "
                           "or choose another --out")
        pid = int(text)
        if pid == 0 or pid == os.getpid() or not alive(pid):
            return None, st
        return pid, None

    def __exit__(self, *exc):
        try:
            with open(self.lock, "rb") as f:
                ours = f.read(64).strip() == str(os.getpid()).encode()
        except OSError:
            ours = False
        if ours:  # (a run that took it over as stale holds it now otherwise)
            os.remove(self.lock)
        self.remove_folders()

    def remove_folders(self):
        for folder in reversed(self.made):
            try:
                os.rmdir(folder)  # only if empty
            except OSError:
                break


def same_file(path, seen):
    """PATH is still the very file whose os.lstat was `seen` (not a new lock made meanwhile)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev, st.st_mtime_ns) == (seen.st_ino, seen.st_dev, seen.st_mtime_ns)


def make_folders(folder):
    """os.makedirs(folder), returning the folders it made, outermost first."""
    missing, made = [], []
    while folder and not os.path.exists(folder):
        missing.insert(0, folder)
        folder = os.path.dirname(folder)
    for f in missing:
        try:
            os.mkdir(f)
            made.append(f)
        except FileExistsError:  # made by another run meanwhile
            continue
        except OSError as e:
            for g in reversed(made):
                os.rmdir(g)
            raise CLIError(f"could not make the folder {f} ({e.strerror or e}); nothing was written")
    return made


def check_out(path, inputs=(), replaceable=None, what="file"):
    """--out can be written, checked before any work (through a symlink, its target): each check
    is one error below. replaceable(path): True if an existing file is a `what` the script may replace."""
    if os.path.isdir(path):
        raise CLIError(f"--out {path} is a folder; give a file name")
    if path.endswith(("/", os.sep)):
        raise CLIError(f"--out {path} ends in a slash, so it names a folder; give a file name")
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    missing = []
    while not os.path.exists(folder):
        missing.insert(0, os.path.basename(folder))
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise CLIError(f"--out {path} lies under {folder}, which is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: no permission to write in {folder}")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for name, room in [(m, 0) for m in missing] + [(os.path.basename(target), BESIDE)]:
        if len(os.fsencode(name)) + room > name_max:
            raise CLIError(f"--out {path}: the name {name[:20]}... is too long for this file system "
                           f"({len(os.fsencode(name))} bytes; at most {name_max}" + (f", less {room} for the "
                           "files the run writes beside it)" if room else ")"))
    if not os.path.exists(target):
        return
    mode = os.stat(target).st_mode
    if not stat.S_ISREG(mode):
        raise CLIError(f"--out {path} is {kind_of(mode)}, not a file; it is never opened: choose another --out")
    for given in inputs:
        if given and os.path.exists(given) and os.path.samefile(given, target):
            raise CLIError(f"--out {path} is an input of this run ({given}); choose another --out")
    if replaceable is not None and not replaceable(target):
        raise CLIError(f"--out {path} exists and is not a {what}; it is never replaced: choose another --out")
    if not mode & 0o222:  # (os.access would say yes to root)
        raise CLIError(f"--out {path} is read-only (mode {stat.S_IMODE(mode):04o}); it is never replaced: "
                       f"make it writable (chmod u+w) to let this run replace it, or choose another --out")
