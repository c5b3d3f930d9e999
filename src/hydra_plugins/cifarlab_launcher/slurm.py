"""hydra-submitit-launcher's SLURM launcher, with what a sweep on a real cluster needs around it.

Before anything is queued or written (at setup, before the sweep folder exists), `cifarlab.slurm` asks
SLURM whether it would run one of the sweep's jobs: a missing client, a controller that does not answer, a partition
or request that cannot be granted is one line and exit status 1. After submission each job's SLURM id is logged, and
every job is waited for: one that SLURM killed (scancel, time limit, a node lost) or that died without a result comes
back to the sweeper as a failed job whose error is one line with SLURM's reason, while the other jobs' results (and
their runs) stand. The upstream launcher stops at the first such job with a traceback.
"""

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import DictConfig, OmegaConf

from cifarlab.runtime import user_errors_exit
from cifarlab.slurm import check_client, check_request, check_time_limit, job_end

log = logging.getLogger(__name__)

INIT_KEYS = {"submitit_folder", "max_num_timeout"}  # executor arguments; every other key is an sbatch parameter


class SweepJobFailed(CompactHydraException):
    """A sweep's job that ended without a result; Hydra prints a CompactHydraException as its message alone."""


class SlurmLauncher(SubmititSlurmLauncher):
    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self._check_cluster()

    @user_errors_exit
    def _check_cluster(self) -> None:
        check_client()  # first: submitit's executor looks for srun as it is made
        check_time_limit(self.params["timeout_min"], self.params["signal_delay_s"])
        check_request(self._executor()._executor._make_submission_file_text("true", "check"))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        arguments = [
            (list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
            for num, overrides in zip(numbers, job_overrides, strict=True)
        ]
        jobs = self._executor().map_array(self, *zip(*arguments, strict=True))
        submitted = list(zip(numbers, jobs, job_overrides, strict=True))
        for num, job, overrides in submitted:
            log.info(f"\t#{num} : SLURM job {job.job_id} : {' '.join(filter_overrides(overrides))}")
        return [self._result(num, job, overrides) for num, job, overrides in submitted]

    def _executor(self) -> Any:
        """The submitit executor of the sweep's jobs, with the launcher's parameters (hydra-submitit-launcher's
        mapping: the common keys by name, the SLURM-only ones with a `slurm_` prefix)."""
        import submitit  # here, not at the top: Hydra imports every plugin at each start

        executor = submitit.AutoExecutor(
            cluster="slurm", folder=self.params["submitit_folder"], slurm_max_num_timeout=self.params["max_num_timeout"]
        )
        common = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in common else f"slurm_{k}": v for k, v in self.params.items() if k not in INIT_KEYS}
        )
        return executor

    def _result(self, num: int, job: Any, overrides: Sequence[str]) -> JobReturn:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            result: JobReturn = job.results()[0]  # task 0's: the rank that tracks a multi-node run
        except (UncompletedJobError, FailedJobError):  # no result: SLURM ended it, or it died
            stderr = job.paths.stderr.read_text() if job.paths.stderr.exists() else ""
            return self._failed(num, job, overrides, f"ended {job_end(job.state, stderr)}")
        if result.status == JobStatus.FAILED and isinstance(result._return_value, UncompletedJobError):
            # submitit's answer to SLURM's warning signal, signal_delay_s before the time limit (--signal=USR2@...)
            limit = f"timeout_min={self.params['timeout_min']}, signal_delay_s={self.params['signal_delay_s']}"
            return self._failed(num, job, overrides, f"reached its time limit ({limit}): {result._return_value}")
        if result.status == JobStatus.COMPLETED:
            log.info(f"\t#{num} : SLURM job {job.job_id} returned {result.return_value}")
        return result

    def _failed(self, num: int, job: Any, overrides: Sequence[str], why: str) -> JobReturn:
        line = f"sweep job #{num} (SLURM job {job.job_id}) {why}"
        log.error(f"\t#{num} : {line} (log: {job.paths.stderr})")
        return JobReturn(
            overrides=list(overrides), status=JobStatus.FAILED, _return_value=SweepJobFailed(f"error: {line}")
        )
