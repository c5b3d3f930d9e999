"""The alias history's format in the MLflow registry: who moved which alias of a registered model from which
version to which, when and why. Promotion writes it (cifarlab_lifecycle.promotion); the service reads it to show
the history of what it serves (GET /v1/model).

One registered-model tag per move, `alias_history.<alias>.<UTC time, microseconds>`, whose value is an AliasMove
as JSON. A tag per move, not one growing list: no read-modify-write race between two promoters, and no value near
the registry's length limit. The keys sort in time order.
"""

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

PREFIX = "alias_history"
NONE = "none"  # from_version when the alias named no version before


@dataclass(frozen=True)
class AliasMove:
    alias: str
    from_version: str  # NONE when the alias was new
    to_version: str
    by: str  # the user who ran the command
    at: str  # ISO 8601, UTC, microseconds
    why: str  # the decision in a sentence
    via: str  # the command that moved it


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def history_tag(move: AliasMove) -> tuple[str, str]:
    """The (key, value) of the registered-model tag that records `move`."""
    stamp = move.at.replace("-", "").replace(":", "").replace("+0000", "Z")
    return f"{PREFIX}.{move.alias}.{stamp}", json.dumps(asdict(move))


def alias_history(tags: Mapping[str, str], alias: str) -> list[AliasMove]:
    """The moves of `alias` recorded in a registered model's tags, oldest first; a tag that does not parse is
    skipped (written by hand, or by a later format)."""
    prefix = f"{PREFIX}.{alias}."
    moves = []
    for key in sorted(k for k in tags if k.startswith(prefix)):
        try:
            moves.append(AliasMove(**json.loads(tags[key])))
        except (TypeError, ValueError):
            continue
    return moves
