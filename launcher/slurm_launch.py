"""Inside a Slurm job: `accelerate launch` run in-process, keeping the training processes' exit status.

Each srun task runs `python -m launcher.slurm launch <accelerate launch args>`, which ends up in
`launch` here: it ignores the preemption signal (the training processes handle it) and exits with
the training processes' status, so 124 (checkpoint saved after a preemption signal,
`launcher.preemption.PREEMPTED_EXIT`) reaches the batch script, which then requeues the job.
`launcher.cli` reads a process group's status with the same `group_status`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from launcher.errors import UsageError
from launcher.preemption import PREEMPTED_EXIT
from launcher.slurm_spec import EARLY_WARNING_SIGNALS

PREEMPT_SIGNAL_ENV = "LAUNCHER_PREEMPT_SIGNAL"


def status_from_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as shells report it


def group_status(codes: list[int]) -> int:
    """One exit status for the failed processes of a torch elastic group.

    Ranks leave at slightly different moments, and the agent SIGTERMs (later SIGKILLs) whoever is
    still running once the first one exits. The trainer exits 124 only after the checkpoint's final
    barrier, so one 124 means every rank got past it: 124 plus processes stopped by the agent is
    still a clean preemption. Any other failure wins.
    """
    stopped_by_agent = (-signal.SIGTERM, -signal.SIGKILL)
    if PREEMPTED_EXIT in codes and all(c == PREEMPTED_EXIT or c in stopped_by_agent for c in codes):
        return PREEMPTED_EXIT
    real = [c for c in codes if c != PREEMPTED_EXIT and c not in stopped_by_agent]
    return status_from_code((real or codes)[0])


def accelerate_launch(argv: list[str]) -> int:
    """Run `accelerate launch <argv>` in this process; return the training processes' exit status.

    `accelerate launch` reports any failed training process as status 1, which would hide the 124
    of a preempted run (or the 2 of a usage error). Here the launcher's own exceptions are caught
    instead (see `group_status` for several processes).
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:  # one process (accelerate's simple launcher)
        status = status_from_code(err.returncode)
    except ChildFailedError as err:  # several processes (torch elastic)
        status = group_status([failure.exitcode for failure in err.failures.values()])
    except SignalException as err:  # TERM/INT/HUP/QUIT: the agent stopped the workers
        status = 128 + int(err.sigval)
    else:
        status = 0
    return status


def launch(argv: list[str]) -> int:
    """`accelerate_launch` for a Slurm job step, with one line on stderr saying how training ended.

    The preemption signal is ignored in this process (and, until the trainer installs its handler,
    in the training processes it starts), so Slurm's signal to the whole step does not kill the
    launcher while the trainers checkpoint.
    """
    signal_name = os.environ.get(PREEMPT_SIGNAL_ENV, "SIGUSR1")
    if signal_name not in EARLY_WARNING_SIGNALS:
        raise UsageError(f"{PREEMPT_SIGNAL_ENV}={signal_name!r}: expected one of {', '.join(EARLY_WARNING_SIGNALS)}")
    signal.signal(getattr(signal, signal_name), signal.SIG_IGN)

    status = accelerate_launch(argv)
    if status == PREEMPTED_EXIT:
        print(f"launcher.slurm: training stopped on a preemption signal with a checkpoint saved (exit {status})",
              file=sys.stderr, flush=True)
    elif status:
        print(f"launcher.slurm: training failed (exit {status})", file=sys.stderr, flush=True)
    return status
