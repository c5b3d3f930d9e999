"""A real SLURM cluster on loopback, run as root from one temporary folder: what the scale-out tests and
benchmarks/scaleout/ submit to.

Six daemons, each a child of this process in the foreground, logging into the folder: munged (authentication),
MariaDB and slurmdbd (the accounting that `sacct` reads: submitit learns from it that a job ended without a result),
slurmctld, and one slurmd per node. The nodes share this machine's real CPUs and memory (`slurmd -C`) between them:
two nodes of one CPU each on two cores, so that a job can span two nodes as on a real cluster. The node names
(`n0`, `n1`) are not in DNS: a job that needs its first node's address (DDP's MASTER_ADDR) is given 127.0.0.1.
`stop()` cancels every job, stops the daemons and removes the folder.
"""

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.containers import free_port

COMMANDS = ("munged", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld", "slurmd", "sbatch")
PARTITION = "cpu"
DATABASE = "slurm_acct_db"
READY_S = 60  # each daemon answers in about a second here
STOP_S = 20
KILL_WAIT_S = 5  # SIGTERM to SIGKILL when SLURM ends a job (SLURM's default, 30 s, would only slow the tests)


def missing_commands() -> list[str]:
    return [command for command in COMMANDS if shutil.which(command) is None]


def host_resources() -> tuple[int, int]:
    """This machine's CPUs and memory (MB) as slurmd counts them, which is what it checks a node's config against."""
    fields = dict(
        field.split("=", 1) for field in subprocess.check_output(["slurmd", "-C"], text=True).split() if "=" in field
    )
    return int(fields["CPUs"]), int(fields["RealMemory"])


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    memory_mb: int
    port: int


class SlurmCluster:
    """`SlurmCluster(folder, nodes=2).start()`; clients reach it through `env` (SLURM_CONF)."""

    def __init__(self, root: Path, nodes: int = 2) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the SLURM cluster runs its daemons as root (slurmd starts jobs as their users)")
        missing = missing_commands()
        if missing:
            raise RuntimeError(f"SLURM is not installed ({', '.join(missing)} missing): run `make system-deps`")
        self.root = root
        cpus, memory_mb = host_resources()
        self.nodes = [
            Node(f"n{index}", max(1, cpus // nodes), memory_mb // nodes, free_port()) for index in range(nodes)
        ]
        self.ports = {name: free_port() for name in ("mariadb", "slurmdbd", "slurmctld")}
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._processes: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------------------------------ start and stop
    def start(self) -> float:
        """Start every daemon and wait until each node is idle; returns the seconds that took."""
        started = time.monotonic()
        for folder in ("munge", "mariadb", "state", "log", "tmp", *(f"spool/{node.name}" for node in self.nodes)):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # jobs reach the socket as their users
        try:
            self._start_munge()
            self._start_accounting()
            self._write_slurm_conf()
            self._start_controller()
            for node in self.nodes:
                self._spawn(f"slurmd-{node.name}", ["slurmd", "-D", "-N", node.name, "-f", str(self.conf)])
            self._wait(self._nodes_idle, "the nodes to be idle (sinfo)")
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    @contextlib.contextmanager
    def down(self, daemon: str) -> Iterator[None]:
        """`daemon` (slurmctld or slurmdbd) stopped for the block, then started again and answering."""
        command = self._processes[daemon].args
        self._terminate(daemon)
        try:
            yield
        finally:
            self._spawn(daemon, command)
            ready = self._nodes_idle if daemon == "slurmctld" else self._accounting_up
            self._wait(ready, f"{daemon} to answer again")

    def stop(self) -> None:
        """Cancel every job, stop the daemons (the controller and nodes first) and remove the folder."""
        if "slurmctld" in self._processes:
            self.run("scancel", "--full", "--user", "root", check=False)
            with contextlib.suppress(RuntimeError):  # a job that outlives its cancel goes with its node's slurmd
                self._wait(lambda: not self.run("squeue", "-h", check=False).stdout.strip(), "the jobs to end")
        for name in reversed(list(self._processes)):  # munged, started first, goes last
            self._terminate(name)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------ clients
    def run(self, *command: str, check: bool = True, timeout: int = 60) -> subprocess.CompletedProcess:
        """A SLURM client command (sinfo, squeue, sacct, scancel, ...) against this cluster."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def ended(self, job_id: str) -> dict[str, str]:
        """`sacct`'s record of one job (or array element, `12_1`) once it has ended: JobID, JobName, State, NodeList,
        ExitCode. The record lags the job by a second or two: a job's result is written before its process exits."""
        fields = ("JobID", "JobName", "State", "NodeList", "ExitCode")
        record: dict[str, str] = {}

        def read() -> bool:
            lines = self.run("sacct", "-X", "-n", "-P", "-j", job_id, "-o", ",".join(fields)).stdout.splitlines()
            record.update(dict(zip(fields, lines[0].split("|"), strict=True)) if lines else {})
            return bool(lines) and record["State"] not in ("PENDING", "RUNNING", "COMPLETING")

        self._wait(read, f"job {job_id} to end in sacct")
        return record

    def logs(self) -> str:
        """The end of every daemon's log, for a failing test's message."""
        tails = [f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in self._logs()]
        return "\n".join(tails)

    # ----------------------------------------------------------------------------------------------- daemons
    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        munge = self.root / "munge"
        socket_path = munge / "munge.socket"
        self._spawn(
            "munged",
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={socket_path}", f"--seed-file={munge / 'seed'}",
             f"--pid-file={munge / 'munged.pid'}"],
        )  # fmt: skip
        self._wait(socket_path.exists, "munged's socket")

    def _start_accounting(self) -> None:
        data, sock = self.root / "mariadb", self.root / "mariadb.sock"
        subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db",
             "--auth-root-authentication-method=socket"],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        self._spawn(
            "mariadbd",
            ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root", f"--socket={sock}",
             f"--port={self.ports['mariadb']}", "--bind-address=127.0.0.1", f"--tmpdir={self.root / 'tmp'}",
             f"--pid-file={self.root / 'mariadb.pid'}", "--skip-log-bin", "--innodb-buffer-pool-size=64M"],
        )  # fmt: skip
        sql = ["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e"]
        self._wait(lambda: subprocess.run([*sql, "SELECT 1"], capture_output=True).returncode == 0, "MariaDB")
        password = secrets.token_hex(16)
        grant = f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
        grant += f"GRANT ALL ON {DATABASE}.* TO 'slurm'@'127.0.0.1';"
        subprocess.run([*sql, grant], capture_output=True, check=True, timeout=30)
        # slurmdbd reads slurmdbd.conf beside SLURM_CONF's slurm.conf, and refuses one that others can read
        conf = self.root / "slurmdbd.conf"
        conf.touch(mode=0o600)
        conf.write_text(
            _lines(
                AuthType="auth/munge",
                AuthInfo=f"socket={self.root / 'munge' / 'munge.socket'}",
                DbdHost="localhost",
                DbdAddr="127.0.0.1",
                DbdPort=self.ports["slurmdbd"],
                SlurmUser="root",
                PidFile=self.root / "slurmdbd.pid",
                StorageType="accounting_storage/mysql",
                StorageHost="127.0.0.1",
                StoragePort=self.ports["mariadb"],
                StorageUser="slurm",
                StoragePass=password,
                StorageLoc=DATABASE,
            )
        )
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait(self._accounting_up, "slurmdbd")

    def _write_slurm_conf(self) -> None:
        munge_socket = self.root / "munge" / "munge.socket"
        settings = _lines(
            ClusterName="cifarlab",
            SlurmctldHost=f"{_short_hostname()}(127.0.0.1)",  # slurmctld runs only where its host name says
            SlurmctldPort=self.ports["slurmctld"],
            AuthType="auth/munge",
            AuthInfo=f"socket={munge_socket}",
            CredType="cred/munge",
            SlurmUser="root",
            SlurmdUser="root",
            StateSaveLocation=self.root / "state",
            SlurmdSpoolDir=self.root / "spool" / "%n",
            SlurmctldPidFile=self.root / "slurmctld.pid",
            SlurmdPidFile=self.root / "spool" / "%n" / "slurmd.pid",
            ProctrackType="proctrack/linuxproc",  # no cgroups here
            TaskPlugin="task/none",  # the nodes share the same cores: binding each to "its" CPU 0 would stack them
            SelectType="select/cons_tres",
            SelectTypeParameters="CR_CPU_Memory",
            ReturnToService=2,
            MpiDefault="none",
            KillWait=KILL_WAIT_S,
            JobAcctGatherType="jobacct_gather/none",
            AccountingStorageType="accounting_storage/slurmdbd",
            AccountingStorageHost="127.0.0.1",
            AccountingStoragePort=self.ports["slurmdbd"],
            AccountingStoragePass=munge_socket,  # the munge socket slurmctld and sacct reach slurmdbd through
        )
        nodes = [
            f"NodeName={node.name} NodeHostname={_short_hostname()} NodeAddr=127.0.0.1 Port={node.port} "
            f"CPUs={node.cpus} RealMemory={node.memory_mb} State=UNKNOWN"
            for node in self.nodes
        ]
        partition = f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
        self.conf.write_text(settings + "\n".join([*nodes, partition]) + "\n")

    def _start_controller(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(self._controller_up, "slurmctld to answer (scontrol ping)")

    def _spawn(self, name: str, command: list[str]) -> None:
        with (self.root / "log" / f"{name}.out").open("ab") as log:
            self._processes[name] = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _terminate(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + READY_S
        while not ready():
            exited = [name for name, process in self._processes.items() if process.poll() is not None]
            if exited or time.monotonic() > deadline:
                reason = f"{', '.join(exited)} exited" if exited else f"not within {READY_S} s"
                raise RuntimeError(f"waiting for {what}: {reason}\n{self.logs()}")
            time.sleep(0.1)

    def _accounting_up(self) -> bool:
        return _accepts("127.0.0.1", self.ports["slurmdbd"])

    def _controller_up(self) -> bool:
        return "is UP" in self.run("scontrol", "ping", check=False).stdout

    def _nodes_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
        return len(states) == len(self.nodes) and set(states) == {"idle"}

    def _logs(self) -> list[Path]:
        return sorted((self.root / "log").glob("*")) if (self.root / "log").is_dir() else []


def _lines(**settings: object) -> str:
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False
