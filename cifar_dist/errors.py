"""The few exception types a user can cause; the command line turns them into one line + exit 2."""


class UserError(Exception):
    """Something the user can fix: a flag, a file, a cluster setting. Exit status 2."""

    exit_code = 2


class ConfigError(UserError):
    """Inconsistent or invalid flags."""


class DataError(UserError):
    """Missing, corrupt or inconsistent data files."""


class ClusterError(UserError):
    """TF_CONFIG, SLURM variables or device set-up that cannot work."""


class CheckpointError(UserError):
    """A model_dir whose checkpoints cannot be used with this configuration."""


class TrainingDiverged(Exception):
    """A non-finite loss in float32; the last good checkpoint is kept."""

    exit_code = 4


class PeerLost(Exception):
    """Another worker died or stalled past --collective_timeout. Restart the whole group."""

    exit_code = 3


class Preempted(Exception):
    """SIGTERM/SIGINT/SIGUSR1 arrived; a checkpoint was saved. Rerun the same command to resume."""

    exit_code = 75  # EX_TEMPFAIL: "try again", what requeue-aware schedulers expect.
