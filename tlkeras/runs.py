"""Run folders that hold under faults: one user at a time, resume only what matches.

Standard library only, so that any process (a scheduler, a test) can take the lock cheaply.

* `RunLock`: a run folder is locked (`<run>/.lock`, holding the owner's pid)
  while a process uses it; a second process gets "run folder in use by pid
  N". A lock left by a killed process is detected and taken over.
* `check_resume`: before anything is written into an existing run folder,
  its `config.json` is compared with the new run's architecture, task, input
  shape and classes; a mismatch is refused, naming what differs.

A NaN loss is stopped by `tlkeras.validation.NonFiniteLossGuard`.

Example:

>>> import tempfile
>>> from tlkeras import runs
>>> folder = tempfile.mkdtemp()
>>> with runs.RunLock(folder):
...     runs.check_resume(folder, {"base": "mobilenetv2_1.00_96", "class_names": ["a", "b"]})
"""

import atexit
import json
import logging
import os
import socket

logger = logging.getLogger("tlkeras")

__all__ = ["RunFolderInUseError", "RunFolderMismatchError", "RunLock", "check_resume"]

# What makes a run folder's checkpoints usable by another run.
RESUME_KEYS = ("base", "task", "input_shape", "outputs", "class_names")
_held = {}  # lock path -> times acquired in this process


class RunFolderInUseError(RuntimeError):
    """Another live process holds the run folder."""


class RunFolderMismatchError(ValueError):
    """An existing run folder belongs to a different model or data."""


class RunLock:
    """An inter-process lock on a run folder (`<folder>/.lock` with the owner's pid).

    Re-entrant within one process. A lock whose process is gone (killed) is
    taken over with a warning. Use as a context manager, or `acquire()` /
    `release()`.
    """

    def __init__(self, folder):
        self.folder = os.path.abspath(os.fspath(folder))
        self.path = os.path.join(self.folder, ".lock")

    def acquire(self):
        if _held.get(self.path):
            _held[self.path] += 1
            return self
        try:
            os.makedirs(self.folder, exist_ok=True)
        except OSError as error:
            raise type(error)(error.errno, f"Cannot create the run folder {self.folder}: "
                              f"{error.strerror}.") from error
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                if owner and _alive(owner):
                    raise RunFolderInUseError(
                        f"Run folder {self.folder} in use by pid {owner['pid']} on "
                        f"{owner['host']}. Wait for it to finish, or use another folder; if that "
                        f"process is gone, delete {self.path}.") from None
                logger.warning("Taking over the run folder %s: its lock was left by pid %s, "
                               "which is no longer running.", self.folder,
                               owner["pid"] if owner else "?")
                stale = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.replace(self.path, stale)
                    os.remove(stale)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
            _held[self.path] = 1
            atexit.register(self._release_at_exit)
            return self
        raise RunFolderInUseError(f"Could not lock the run folder {self.folder}: other processes "
                                  "keep taking it.")

    def release(self):
        count = _held.get(self.path, 0)
        if count > 1:
            _held[self.path] = count - 1
            return
        if count == 1:
            del _held[self.path]
            owner = _read_owner(self.path)
            if owner and owner["pid"] == os.getpid():
                try:
                    os.remove(self.path)
                except OSError:
                    pass

    def _release_at_exit(self):
        if _held.get(self.path):
            _held[self.path] = 1
            self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_owner(path):
    try:
        with open(path) as f:
            owner = json.load(f)
        return {"pid": int(owner["pid"]), "host": str(owner.get("host", ""))}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable or half-written: a process killed while locking


def _alive(owner):
    if owner["host"] and owner["host"] != socket.gethostname():
        return True  # another machine's process: cannot tell, so assume it runs
    if owner["pid"] == os.getpid():
        return False  # a lock this process left behind (e.g. after an exception)
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that was not reaped yet is a zombie: gone for our purpose
        with open(f"/proc/{owner['pid']}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def check_resume(folder, config, keys=RESUME_KEYS):
    """Refuses to reuse `folder` when its `config.json` is for another model or data.

    Compares `keys` (architecture, task, input shape, classes) of `config` with
    the run already in `folder`; call it before writing anything there.

    Raises:
        RunFolderMismatchError: naming each differing key, both values and what to do.
    """
    path = os.path.join(os.fspath(folder), "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError) as error:
        raise RunFolderMismatchError(
            f"Cannot resume in {folder}: its config.json is unreadable ({error}). Use another "
            "folder, or delete this one to start over.") from error
    differ = [k for k in keys if config.get(k) is not None and previous.get(k) is not None
              and _normal(config[k]) != _normal(previous[k])]
    if differ:
        details = "; ".join(f"{k}: the folder has {previous[k]!r}, this run {config[k]!r}"
                            for k in differ)
        raise RunFolderMismatchError(
            f"Cannot resume in {folder}: it holds a different run ({details}). Nothing was "
            "written. Use another folder, or delete this one to start over.")


def _normal(value):
    return json.loads(json.dumps(value, default=str))
