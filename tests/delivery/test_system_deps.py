"""`make system-deps`, the first step of `make test`: the list of system packages, and the target run for real as a
user who cannot install anything (no root, no usable sudo), on a PATH that lacks every listed command."""

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ROOT / "requirements" / "system-packages"


def listed() -> dict[str, str]:
    """command -> Debian package, from requirements/system-packages."""
    lines = [line.split() for line in PACKAGES.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert all(len(fields) == 2 for fields in lines), f"{PACKAGES.name}: one `command package` pair a line"
    return dict(lines)


def user_env(**overrides: str) -> dict[str, str]:
    """The environment of a user's shell: none of the variables an outer make (make test-shuffled) passes down,
    which would change how the inner make reports."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    return {**inherited, **overrides}


def path_without(commands: set[str], bin_dir: Path) -> str:
    """A PATH of one folder linking every command on today's PATH except `commands`."""
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for tool in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if tool.name not in commands and os.access(tool, os.X_OK) and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    return str(bin_dir)


def as_unprivileged_user(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run `command` as a user who is not root: `nobody` when the suite runs as root, else the suite's own user."""
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv is not installed: apt-get install util-linux")
        nobody = pwd.getpwnam("nobody")
        command = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", *command]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_the_list_names_prometheus_for_both_its_commands():
    assert listed()["promtool"] == "prometheus" and listed()["prometheus"] == "prometheus"


def test_a_user_who_cannot_install_gets_one_line_saying_what_to_install():
    commands = set(listed())
    # as the suite's own (non-root) user, a passwordless sudo would really install: leave sudo off PATH then
    hidden = commands if os.geteuid() == 0 else commands | {"sudo"}
    with tempfile.TemporaryDirectory() as home:  # not under pytest's tmp_path: `nobody` must reach the PATH folder
        os.chmod(home, 0o755)
        env = user_env(PATH=path_without(hidden, Path(home) / "bin"), HOME=home)
        make = shutil.which("make", path=env["PATH"])
        assert make and shutil.which("apt-get", path=env["PATH"]), "the refusal under test is a Debian system's"
        result = as_unprivileged_user([make, "--no-print-directory", "system-deps"], env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("make:")]  # make's own Error line
    assert len(errors) == 1, result.stderr
    (error,) = errors
    packages = " ".join(dict.fromkeys(listed().values()))
    assert error.startswith("error: the tests need ") and f"apt-get install {packages}` as root" in error
    assert all(command in error for command in commands), error
    assert result.stdout == ""


def test_nothing_missing_runs_nothing_and_says_nothing(tmp_path: Path):
    present = tmp_path / "present"
    present.write_text("# only commands every system has\nsh  dash\nenv  coreutils\n")
    env = user_env(SYSTEM_PACKAGES=str(present), PATH=path_without({"apt-get", "sudo"}, tmp_path / "bin"))
    result = subprocess.run(["make", "--no-print-directory", "system-deps"], cwd=ROOT, env=env, capture_output=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_a_system_without_apt_get_is_told_what_to_install(tmp_path: Path):
    absent = tmp_path / "absent"
    absent.write_text("cifarlab-no-such-command  cifarlab-no-such-package\n")
    env = user_env(SYSTEM_PACKAGES=str(absent), PATH=path_without({"apt-get"}, tmp_path / "bin"))
    result = subprocess.run(["scripts/system_deps.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        "error: the tests need cifarlab-no-such-command (Debian: cifarlab-no-such-package): install them with your"
        " system's package manager and put them on PATH\n"
    )
