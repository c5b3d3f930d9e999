"""What `python train.py` prints, as a user sees it: every message once, one line per epoch, no unreviewed warning."""

import re

import pytest

from tests.conftest import TINY, isolated, run_cli

pytestmark = pytest.mark.slow  # train.py end to end

TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]")  # the console format of configs/hydra/default.yaml
EPOCH_LINE = re.compile(r"\[INFO\] epoch (\d+)/2  train loss \d\.\d{4} acc \d+\.\d%  val acc \d+\.\d%  \d+\.\d s$")
# Warnings a user may see, each reviewed: what it says is worth acting on. Empty: none is expected in this run.
ALLOWED_WARNINGS: tuple[re.Pattern[str], ...] = ()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The output of a short training run in a new tracking store (first-run messages included), stdout and
    stderr together as a terminal shows them, with the ONNX export of every new best as configured."""
    out = tmp_path_factory.mktemp("console")
    result = run_cli(
        "train.py",
        *TINY,
        *isolated(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return (result.stdout + result.stderr).splitlines()


def messages(lines: list[str]) -> list[str]:
    """The lines a user reads, timestamps dropped, without the config tree (YAML repeats keys such as _target_)."""
    kept, in_config = [], False
    for line in lines:
        if TIMESTAMP.match(line):
            in_config = line.endswith("config:")
        if not in_config:
            kept.append(TIMESTAMP.sub("", line))
    return kept


def test_no_line_is_printed_twice(console):
    seen: set[str] = set()
    repeated = [line for line in messages(console) if line.strip() and (line in seen or seen.add(line))]
    assert not repeated, "\n".join(console)


def is_warning(line: str) -> bool:
    """A logged warning, a Python warning (Lightning prints them as `file.py:123: message`, without the category),
    or a line of torch's C++-style log at level W or E."""
    return "warning" in line.lower() or bool(re.search(r"\.py:\d+: ", line) or re.match(r"[WE]\d{4} ", line))


def test_no_warning_outside_the_reviewed_list(console):
    warnings = [line for line in console if is_warning(line)]
    unreviewed = [line for line in warnings if not any(allowed.search(line) for allowed in ALLOWED_WARNINGS)]
    assert not unreviewed, "\n".join(console)


def test_one_readable_line_per_epoch_and_the_config_tree(console):
    epochs = [match.group(1) for line in console if (match := EPOCH_LINE.search(line))]
    assert epochs == ["1", "2"], "\n".join(console)
    assert "task_name: train" in console and "  max_epochs: 2" in console  # the composed config, printed at start
    assert any("Test accuracy" in line and "a subset, 256 of the 1,000 test images" in line for line in console)
    assert not any("\r" in line or "━" in line for line in console)  # no progress bar redraws in a file


def test_the_default_run_exports_once_at_fit_end_from_the_best_checkpoint(console):
    exports = [line for line in console if "Exported " in line]
    assert len(exports) == 1 and "checkpoints/best.ckpt in " in exports[0], "\n".join(console)
    fit_end = next(i for i, line in enumerate(console) if "`Trainer.fit` stopped" in line)
    assert console.index(exports[0]) > fit_end
