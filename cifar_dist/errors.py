"""The few exception types a run can end with, and the exit status of each.

Every command (cli.run_command) prints one of them as one line on stderr and exits with
its code. The exit statuses, in one table (README "Exit status" copies it, and
launch/local.py and slurm/train.sh act on it):

    0   done
    2   bad input: a flag, a file, a cluster setting (UserError); nothing was written
    3   another worker died or stalled (PeerLost): restart the group, it resumes
    4   the loss diverged (TrainingDiverged): the last good checkpoint is kept
    75  stopped by a signal with a checkpoint in model_dir (Preempted, Interrupted):
        rerun the same command to resume
    76  stopped by a signal before any checkpoint existed (Interrupted): a rerun starts afresh;
        also predict, bench and preview stopped by a signal (nothing written)

The EXIT_* constants below are these numbers: launch/local.py imports them, and
slurm/train.sh (a shell script cannot import) repeats 75 and 76 with a comment pointing here.
"""

from __future__ import annotations

import os

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_PEER_LOST = 3
EXIT_DIVERGED = 4
EXIT_STOPPED = 75  # EX_TEMPFAIL: "try again", what requeue-aware schedulers expect
EXIT_STOPPED_EARLY = 76


def printable(text) -> str:
    """text (a str, bytes or path) as one printable line that any encoding can take
    apart again: used for every file name in an error line, a note or a CSV cell.

    Printable text is returned as it is. Otherwise backslashes are doubled and every
    character that could break the line or the encoding is escaped: bytes that were not
    UTF-8 (surrogateescape, as os.listdir hands them over) as \\xNN, control characters
    (newline, tab, escape, ...) as \\n, \\t, \\xNN or \\uNNNN, so one name can never
    become two lines, forge a `cifar_dist: error:` line or crash a UTF-8 writer."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    if isinstance(text, os.PathLike):
        text = os.fsdecode(text)
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:  # \n, \t, \x1b, U+2028, a lone surrogate, ...
            out.append(ch.encode("unicode_escape").decode("ascii")
                       if code < 0xD800 or code > 0xDFFF else f"\\u{code:04x}")
    return "".join(out)


class UserError(Exception):
    """Something the user can fix: a flag, a file, a cluster setting. Exit status 2.

    Its text is always one printable line (see printable), whatever file names or other
    errors' texts went into it: every command prints it as `cifar_dist: error: TEXT`."""

    exit_code = EXIT_BAD_INPUT

    def __str__(self):
        return printable(super().__str__())


class ConfigError(UserError):
    """Inconsistent or invalid flags."""


class DataError(UserError):
    """Missing, corrupt or inconsistent data files."""


class ClusterError(UserError):
    """TF_CONFIG, SLURM variables or device set-up that cannot work."""


class CheckpointError(UserError):
    """A model_dir whose checkpoints cannot be used with this configuration."""


class ModelError(UserError):
    """No usable exported model where the user pointed."""


class ImageError(DataError):
    """One unreadable image (predict reports it and goes on)."""


class TrainingDiverged(Exception):
    """A non-finite loss in float32; the last good checkpoint is kept."""

    exit_code = EXIT_DIVERGED


class PeerLost(Exception):
    """Another worker died or stalled past --collective_timeout. Restart the whole group."""

    exit_code = EXIT_PEER_LOST


class PeersMissing(PeerLost):
    """Workers of the cluster never started within --startup_timeout (exit 3, as PeerLost:
    the group must be started again as a whole). The text names the missing workers."""

    def __str__(self):
        return printable(super().__str__())  # addresses come from TF_CONFIG / SLURM


class Preempted(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived; a checkpoint was saved. Rerun the same command to resume."""

    exit_code = EXIT_STOPPED


class Interrupted(Exception):
    """A signal outside the training loop (start-up, compiling, export, evaluation).

    Exit 75 when model_dir holds a checkpoint (rerun to resume or to finish the export),
    76 when it holds none (nothing was saved; a rerun starts afresh). `resumable`: whether
    it holds one (signals.py asks run_dir).
    """

    def __init__(self, signum: int, model_dir: str = "", resumable: bool = False):
        import signal  # noqa: PLC0415

        self.signal_name = signal.Signals(signum).name
        self.resumable = bool(model_dir) and resumable
        self.exit_code = EXIT_STOPPED if self.resumable else EXIT_STOPPED_EARLY
        if not model_dir:  # predict, bench, preview: a command with no run behind it
            super().__init__(f"stopped by {self.signal_name}; nothing was written: rerun the "
                             "same command")
            return
        super().__init__(
            f"stopped by {self.signal_name} outside the training loop; " + (
                f"the checkpoints in {model_dir} are intact: rerun the same command to resume"
                if self.resumable else "no checkpoint was written: a rerun starts afresh"))


# TensorFlow's wrapping around the cause of a failed collective: lines that say nothing of it.
_NOISE = ("Graph execution error", "Detected at node", "The error could be from a previous",
          "Additional GRPC error information", ":UNKNOWN:Error received from peer",
          "The tasks have crashed", "[[{{node", "File ")
_PREFIXES = ("Collective ops is aborted by:", "Error reported from")


def peer_cause(message: str, limit: int = 300) -> str:
    """The cause in a TensorFlow error about a lost peer, as one line: "recvmsg:Connection
    reset by peer", "The following tasks are unhealthy (stopped sending heartbeats):
    /job:worker/replica:0/task:1", not its first line ("Graph execution error:")."""
    lines = []
    for line in (message or "").splitlines():
        line = line.strip()
        if not line or line.startswith(_NOISE):
            continue
        for prefix in _PREFIXES:  # "Collective ops is aborted by: Error reported from X: Y"
            if line.startswith(prefix):
                line = line[len(prefix):].strip()
                if prefix == _PREFIXES[1]:
                    line = line.partition(": ")[2] or line
        lines.append(line)
    cause = " ".join(lines[:2]) or (message or "").strip() or "no message"
    return printable(cause if len(cause) <= limit else cause[:limit - 3] + "...")


EXIT_ERRORS = (UserError, TrainingDiverged, PeerLost, Preempted, Interrupted)


def error_line(e: BaseException) -> str:
    """The one stderr line a command prints for e: `cifar_dist: error: ...` for input the
    user can fix, `cifar_dist: ...` for the ways a run stops (diverged, peer, signal)."""
    if isinstance(e, UserError):
        return f"cifar_dist: error: {e}"
    return f"cifar_dist: {printable(str(e))}"
