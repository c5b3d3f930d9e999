"""SLURM, as the sweep launcher (configs/hydra/launcher/slurm*.yaml) and a run see it: the checks made before a
sweep queues anything, the one line that says why a job ended without a result, and a run's job tags.

Every check asks SLURM itself: `scontrol ping` for the controller, `sacct` for the accounting that submitit reads
to notice a job that died, and `sbatch --test-only` on the very script the sweep would submit, so a partition,
GPU, CPU, memory or time request that the cluster cannot grant is refused in SLURM's own words, with nothing queued.
"""

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cifarlab.errors import ConfigError

# what submitit and these checks run on the submitting machine (srun also runs there when a job starts its tasks)
CLIENT_COMMANDS = ("sbatch", "srun", "sacct", "scontrol", "sinfo")
RESOURCE_FLAGS = ("partition", "nodes", "ntasks-per-node", "cpus-per-task", "mem", "gpus-per-node", "gres", "time")
CLIENT_TIMEOUT_S = 60


class SchedulerError(ConfigError):
    """SLURM cannot run the sweep as configured (no client commands, no controller, a request it refuses)."""


def check_client() -> None:
    """Raise SchedulerError unless SLURM's client commands are here, its controller answers and sacct works."""
    missing = [command for command in CLIENT_COMMANDS if shutil.which(command) is None]
    if missing:
        raise SchedulerError(
            f"{', '.join(missing)} not found on PATH: hydra/launcher=slurm submits through SLURM's client commands "
            "(run from a machine of the cluster, or use hydra/launcher=basic)"
        )
    _check_controller()
    _check_accounting()


def check_time_limit(timeout_min: int, signal_delay_s: int) -> None:
    """submitit asks SLURM for its warning signal `signal_delay_s` before the time limit, and ends the job on it: a
    delay as long as the limit would end every job as it starts."""
    if signal_delay_s >= timeout_min * 60:
        raise SchedulerError(
            f"hydra.launcher.signal_delay_s={signal_delay_s} is not shorter than hydra.launcher.timeout_min="
            f"{timeout_min} (minutes): submitit would stop each job at its start as timed out"
        )


def check_request(sbatch_script: str) -> None:
    """Raise SchedulerError, in one line, unless SLURM would accept `sbatch_script` (one of the sweep's jobs)."""
    with tempfile.TemporaryDirectory(prefix="cifarlab-sbatch-") as folder:
        script = Path(folder) / "job.sh"
        script.write_text(sbatch_script)
        test = _client("sbatch", "--test-only", str(script))
    if test.returncode == 0:
        return
    requested = " ".join(flag for flag in _sbatch_flags(sbatch_script) if flag.split("=")[0][2:] in RESOURCE_FLAGS)
    raise SchedulerError(
        f"SLURM refuses the sweep's jobs ({requested}): {_first(test.stderr)}; {_partitions()}; nothing was submitted"
    )


def job_end(state: str, stderr: str) -> str:
    """Why a job left no result, in one line: SLURM's state, and what SLURM said in the job's log (slurmstepd's
    `*** JOB 12 ON n1 CANCELLED AT 2026-12-03T12:00:00 ***`); for a job that failed on its own, its last line."""
    said = re.findall(r"^slurmstepd(?:-\S+)?: error: \*\*\* (.*?) \*\*\*", stderr, re.MULTILINE)
    job = [line for line in said if line.startswith("JOB ")] or said
    if job:
        return f"{state}: {job[-1]}"
    program = [line for line in _lines(stderr) if not line.startswith(("srun: ", "slurmstepd"))]
    return f"{state}: {program[-1]}" if state.startswith("FAILED") and program else state


def job_tags() -> dict[str, str]:
    """The SLURM job a run ran in, as MLflow tags (none outside SLURM): `12_1` for an element of an array job."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return {}
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "slurm.job_id": f"{array}_{task}" if array and task else job,
        "slurm.cluster": os.environ.get("SLURM_CLUSTER_NAME", ""),
        "slurm.nodes": os.environ.get("SLURM_JOB_NODELIST", ""),
    }


def _check_controller() -> None:
    ping = _client("scontrol", "ping")
    if ping.returncode != 0 or " is UP" not in ping.stdout:
        said = [line for line in ping.stdout.splitlines() if line.startswith("Slurmctld")] or _lines(ping.stderr)
        raise SchedulerError(
            f"the SLURM controller does not answer ({'; '.join(said[:2])}; configuration {_slurm_conf()}): "
            "nothing was submitted"
        )


def _check_accounting() -> None:
    sacct = _client("sacct", "--noheader", "-X", "--starttime", "now")
    if sacct.returncode != 0:
        raise SchedulerError(
            f"sacct cannot read SLURM's job accounting ({_first(sacct.stderr)}): submitit needs it to see that a job "
            "ended without a result, so nothing was submitted"
        )


def _client(*command: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise SchedulerError(f"`{' '.join(command)}` did not answer within {CLIENT_TIMEOUT_S} s") from error


def _sbatch_flags(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH ")]


def _partitions() -> str:
    """What the cluster has, for the refusal's message: "partition cpu*: 2 nodes, 1 CPUs, 12052 MB, gres (null)"."""
    listing = _client("sinfo", "--noheader", "-o", "%P|%D|%c|%m|%G")
    rows = [line.split("|") for line in listing.stdout.splitlines() if line.count("|") == 4]
    described = [f"partition {p}: {n} nodes, {c} CPUs, {m} MB, gres {g}" for p, n, c, m, g in rows]
    return "; ".join(described) or "sinfo lists no partition"


def _first(stderr: str) -> str:
    """SLURM's reason, without the command's prefix: `sbatch: error: Invalid generic resource (gres) specification`."""
    lines = _lines(stderr)
    first = lines[0] if lines else "no reason given"
    return re.sub(r"^(\w+: )?(error: |fatal: )?(allocation failure: )?", "", first)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _slurm_conf() -> str:
    return os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
