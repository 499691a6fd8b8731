"""What a command prints: its own progress and summary; the full config and other libraries'
chatter only with `--verbose`.

    quiet_third_party(verbose)   before Ray, DeepSpeed or MLflow start: MLflow's table creation and
                                 alembic migrations, DeepSpeed's INFO logs, Ray's start-up lines go
                                 quiet (warnings and errors still show)
    captured(verbose)            a block whose print()s are kept, not shown (DeepSpeed's ZeRO
                                 consolidation prints a dozen lines per release); shown if it fails
    local_ray_auth()             a local in-process Ray cluster: say "no token auth" once, quietly
                                 (Ray's default for a local cluster), instead of Ray's warning

The full config is always written beside a command's outputs (and logged to MLflow where the
command has a run); `--verbose` also prints it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

_NOISY_LOGGERS = ("alembic", "mlflow", "DeepSpeed", "deepspeed", "ray", "torch.distributed.elastic", "urllib3")


def quiet_third_party(verbose: bool = False) -> None:
    """Silence the libraries' INFO chatter for this process and the processes it starts."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read by mlflow at import, also in child ranks
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow's and pydantic's future-deprecation notes are for library authors, not users of a command.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow(\..*)?")
    # DeepSpeed's ZeRO calls a deprecated torch.distributed collective: two lines per rank per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed(\..*)?")


def local_ray_auth() -> None:
    """Before `ray.init(address="local")`: Ray warns on every start that token authentication is
    off unless RAY_AUTH_MODE is set. Off is what a local in-process cluster runs with either way; set
    it explicitly so the warning does not show. A cluster joined by address is left to its settings."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@contextlib.contextmanager
def captured(verbose: bool = False):
    """Keep what the block prints to Python's stdout/stderr; replay it when the block fails (or
    always, with verbose). Yields the buffer."""
    if verbose:
        yield io.StringIO()
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    except BaseException:
        sys.stderr.write(buffer.getvalue())
        raise
