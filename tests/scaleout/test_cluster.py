"""The loopback SLURM cluster the scale-out tests submit to: its nodes share this machine, jobs span them, and a
stopped cluster leaves no process and no file behind."""

from pathlib import Path

from tests.scaleout.cluster import SlurmCluster, host_resources
from tests.scaleout.conftest import SCALEOUT

pytestmark = SCALEOUT


def mentioning(text: str) -> list[int]:
    """The processes on this machine whose command line or environment holds `text`."""
    found = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if any(text.encode() in (process / part).read_bytes() for part in ("cmdline", "environ")):
                found.append(int(process.name))
        except OSError:  # ended meanwhile
            continue
    return found


def test_a_cluster_starts_with_its_nodes_idle_and_stops_leaving_nothing(tmp_path):
    root = tmp_path / "cluster"
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        nodes = cluster.run("sinfo", "-h", "-N", "-o", "%N %t %c %m").stdout.splitlines()
        cpus, memory_mb = host_resources()
        assert nodes == [f"n{i} idle {max(1, cpus // 2)} {memory_mb // 2}" for i in (0, 1)]
        tasks = cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "printenv", "SLURMD_NODENAME").stdout.split()
        assert sorted(tasks) == ["n0", "n1"]
        assert cluster.ended("1")["State"] == "COMPLETED"  # the cluster's first job, in its accounting
        assert mentioning(str(root))  # what the check below looks for is there while it runs
    finally:
        cluster.stop()
    assert not root.exists()
    assert mentioning(str(root)) == []
