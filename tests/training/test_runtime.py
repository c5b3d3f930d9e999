"""cifarlab.runtime.user_errors_exit on what Hydra's instantiate raises: configuration mistakes become one line,
a bug inside a constructor keeps its traceback."""

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from cifarlab.runtime import user_errors_exit
from cifarlab_contract.errors import UserError

HERE = __name__


class Part:
    """A constructor as the repository writes them: bad values refused with ValueError or UserError."""

    def __init__(self, size: int = 1, fail: str = "") -> None:
        if size < 1:
            raise ValueError(f"size must be positive, not {size}")
        if fail == "user":
            raise UserError("the data folder is missing")
        if fail == "bug":
            {}["missing"]
        if fail == "type-bug":
            len(size)  # type: ignore[arg-type]  # a TypeError raised inside, not by the call's arguments


def build(**config: object) -> object:
    return user_errors_exit(instantiate)({"_target_": f"{HERE}.Part", **config})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"_target_": f"{HERE}.Absent"}, "error: invalid configuration: Error locating target"),
        ({"colour": "red"}, "error: invalid configuration: Error in call to target"),  # not in the signature
        ({"size": 0}, "error: invalid configuration: Error in call to target"),  # a value the constructor refused
        ({"fail": "user"}, "error: the data folder is missing"),
    ],
)
def test_configuration_errors_are_one_line(config: dict, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build(**config)
    assert caught.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(message)


@pytest.mark.parametrize(("fail", "cause"), [("bug", KeyError), ("type-bug", TypeError)])
def test_a_bug_inside_a_constructor_keeps_its_traceback(
    fail: str, cause: type, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(InstantiationException) as caught:
        build(fail=fail)
    assert isinstance(caught.value.__cause__, cause)
    assert capsys.readouterr().err == ""  # nothing printed: the error goes on, traceback and all
