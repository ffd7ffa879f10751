"""Writing a file or a folder whole or not at all: the one place that stages and renames.

Every writer of the package (run_dir's config.json, history.csv and metrics.json, the
export, the evaluation report, predict's CSV, the CIFAR-10 download; tools/ too) writes
under a temporary name beside its target and renames it into place once complete (atomic
on one filesystem). On an exception the temporary is removed, and signals.py's watchdog
removes whatever is still staged when it has to end a stuck process. So a crash or a
signal leaves the old target or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import tempfile

from cifar_dist.errors import ConfigError

# Temporaries now being written, for remove_staged (the watchdog's last act).
_STAGED: set = set()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@contextlib.contextmanager
def staged(target: str, *, folder: bool = False):
    """Yields a temporary path beside target; renamed onto target when the block ends
    cleanly, removed when it raises.

    A file's temporary is not created; its name is always private, `.NAME.RANDOM.tmp`
    (hidden, random: no user file is called that, and no other process picks it; a fixed
    `NAME.tmp` could be a user's own file, which the stage would overwrite and delete).
    A folder's is created, private too, with the permissions of any new folder (not
    mkdtemp's 0700), and replaces a folder already at target (an earlier export or report).
    """
    target = os.path.normpath(target)  # "dir/" + ".tmp" would land inside dir
    parent = os.path.dirname(os.path.abspath(target))
    name = os.path.basename(target)
    if folder:
        tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())
    else:
        tmp = os.path.join(parent, f".{name}.{secrets.token_hex(4)}.tmp")
    _STAGED.add(tmp)
    try:
        yield tmp
        if folder:
            _replace_folder(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _STAGED.discard(tmp)


@contextlib.contextmanager
def writing(target: str, mode: str = "w", **open_kwargs):
    """open(target, mode) whole or not at all: the file object of a staged temporary."""
    with staged(target) as tmp, open(tmp, mode, **open_kwargs) as f:
        yield f


def write_json(path: str, obj) -> None:
    with writing(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)


def check_replaceable(target: str, flag: str, what: str, names) -> str:
    """A folder that staged(folder=True) will replace as a whole must be absent, empty or
    an earlier `what` (only `names` in it: never, say, the model_dir with its checkpoints),
    in a writable folder. Returns target normalised; ConfigError names --flag."""
    target = os.path.normpath(target)
    if os.path.exists(target):
        if not os.path.isdir(target) or not set(os.listdir(target)) <= set(names):
            raise ConfigError(f"--{flag}={target} exists and is not an {what} folder: it "
                              "would be replaced; choose another")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag}={target}: {parent} is not a writable folder")
    return target


def remove_leftovers(target: str) -> list:
    """Removes what an earlier writer of target left when it was killed (SIGKILL, a power
    cut: no chance to clean up): `.NAME.*.tmp` and `.NAME.old-*` beside it. Only for a
    caller that knows no other process writes target now (it holds the run's lock).
    Returns the names removed."""
    target = os.path.normpath(target)
    parent = os.path.dirname(os.path.abspath(target))
    prefix = f".{os.path.basename(target)}."
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            rest = entry[len(prefix):]
            if entry.startswith(prefix) and (rest.endswith(".tmp") or rest.startswith("old-")):
                path = os.path.join(parent, entry)
                if path not in _STAGED:
                    _remove(path)
                    removed.append(entry)
    return removed


def remove_staged() -> None:
    """Removes every temporary still being written (a process about to be ended)."""
    for path in list(_STAGED):
        _remove(path)


def _replace_folder(tmp: str, target: str) -> None:
    """Moves tmp to target, replacing a folder there. The old one is first renamed away
    (rmtree then rename would race with another writer finishing in between)."""
    for _ in range(10):
        try:
            os.replace(tmp, target)  # atomic when target is absent or empty
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-",
                               dir=os.path.dirname(os.path.abspath(target)))
        try:
            os.replace(target, old)
        except FileNotFoundError:  # another writer moved it away first
            pass
        shutil.rmtree(old, ignore_errors=True)
    raise FileExistsError(errno.EEXIST, "kept being replaced by other writers", target)
