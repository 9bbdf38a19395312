"""Atomic writes: a reader sees the old file (or folder) or the new one, never a mix.

Every write goes to a temporary path in the same folder, is flushed to disk
(`fsync`), then moved into place with `os.replace`, which is atomic on one
filesystem. A process killed mid-way leaves at most a `.tmp-*` entry beside
the target, never a half-written target. Errors such as a full disk or a
read-only folder name the path being written.

Example:

>>> import os, tempfile
>>> from tlkeras import atomic
>>> folder = tempfile.mkdtemp()
>>> atomic.write_text(os.path.join(folder, "labels.txt"), "cat\\ndog\\n")
>>> with atomic.folder(os.path.join(folder, "export")) as tmp:
...     atomic.write_text(os.path.join(tmp, "a.txt"), "a")
>>> sorted(os.listdir(folder))
['export', 'labels.txt']
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile

__all__ = ["folder", "path", "refuse_overwrite", "write_bytes", "write_json", "write_text"]


def _explain(error, target):
    """An `OSError` re-raised as one line naming `target` and what to do."""
    what = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the filesystem is read-only",
            errno.EACCES: "permission denied", errno.EDQUOT: "disk quota exceeded",
            errno.ENOTDIR: "a file stands where a folder is expected"}.get(error.errno)
    if what is None:
        return error
    return type(error)(error.errno, f"Cannot write {target}: {what} ({error.strerror}). "
                                    "Free space or choose another folder; nothing was replaced.")


def refuse_overwrite(target, argument="output_dir"):
    """Raises `FileExistsError` when `target` exists, naming it and how to proceed."""
    if os.path.exists(target):
        raise FileExistsError(errno.EEXIST, f"{target} exists and is not overwritten: choose "
                              f"another {argument}, or pass overwrite=True to replace it.")


def _fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def path(target):
    """Yields a temporary path beside `target`; on success it replaces `target` atomically.

    For writers that take a path (e.g. `model.save`, `save_weights`). The
    temporary name keeps `target`'s suffix so such writers accept it.
    """
    target = os.path.abspath(os.fspath(target))
    directory, name = os.path.split(target)
    try:
        os.makedirs(directory, exist_ok=True)
        suffix = name[name.find(".", 1):] if "." in name[1:] else ""  # keeps ".weights.h5"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=suffix, dir=directory)
        os.close(fd)
    except OSError as error:
        raise _explain(error, target) from error
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(target, 0o666))  # as a plain open() would create it, not 0600
        os.replace(tmp, target)
        _fsync_dir(directory)
    except OSError as error:
        _remove(tmp)
        raise _explain(error, target) from error
    except BaseException:
        _remove(tmp)
        raise


def write_bytes(target, data):
    """Writes `data` to `target` atomically."""
    with path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(target, text):
    """Writes `text` (UTF-8) to `target` atomically."""
    write_bytes(target, text.encode("utf-8"))


def write_json(target, obj, **kwargs):
    """Writes `obj` as JSON to `target` atomically (`kwargs` go to `json.dumps`)."""
    write_text(target, json.dumps(obj, **{"indent": 2, "default": str, **kwargs}))


@contextlib.contextmanager
def folder(target):
    """Yields a fresh temporary folder beside `target`; on success it replaces `target` whole.

    Write every file into the yielded folder (and verify them) inside the
    `with` block. On success the old `target` (if any) is moved aside, the
    new one moved into place and the old one deleted, so `target` always
    holds one complete version. On an exception, `target` is left untouched.
    """
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(errno.ENOTDIR, f"Cannot write the folder {target}: a file of that "
                                 "name exists. Remove it or choose another folder.")
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    except OSError as error:
        raise _explain(error, target) from error
    try:
        yield tmp
        os.chmod(tmp, _mode(target, 0o777))
        for root, _, files in os.walk(tmp):
            for file in files:
                with open(os.path.join(root, file), "rb+") as f:
                    os.fsync(f.fileno())
        if os.path.exists(target) and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the old version
        else:
            old = None
            if os.path.exists(target):  # no atomic exchange here: move the old one aside first
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
                os.replace(target, os.path.join(old, name))
            os.replace(tmp, target)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(error, target) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _mode(target, default):
    """The mode of the existing `target`, else `default` less the umask."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return default & ~umask


def _exchange(a, b):
    """Swaps two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False if unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(tmp):
    with contextlib.suppress(OSError):
        os.remove(tmp)
