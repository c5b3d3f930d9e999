"""Promotion: the registry's champion alias moves to the challenger version, recorded as `promotion.*` tags on it.

One function moves the alias, `promote_version`, whatever decided it: `promote` (scripts/promote.py) scores both
versions on the same test data and promotes only a challenger better by a margin; the A/B report's `--promote`
(cifarlab_lifecycle.abreport) promotes on an online test's evidence. Anything that fails before the decision (a
missing alias, an evaluation error) changes nothing.
"""

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from mlflow import MlflowClient
from omegaconf import DictConfig

from cifarlab_contract.alias_history import NONE, AliasMove, history_tag, now
from cifarlab_lifecycle.registry import (
    RegistryError,
    aliased,
    aliased_or_none,
    registry_client,
    stamped,
    tag_version,
)
from cifarlab_lifecycle.scoring import score_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promoted: bool
    challenger_version: str
    champion_version: str | None  # the champion before the decision; None when there was none
    challenger_score: float
    champion_score: float | None

    def describe(self, name: str, metric: str, margin: float) -> str:
        challenger = f"{name} version {self.challenger_version} ({metric} {self.challenger_score:.4f})"
        if self.champion_version is None:
            return f"promoted {challenger} to champion: there was no champion yet"
        champion = f"version {self.champion_version} ({metric} {self.champion_score:.4f})"
        if self.promoted:
            return f"promoted {challenger} to champion, replacing {champion}: better by more than {margin}"
        return f"kept {champion} as champion: {challenger} is not better by more than {margin}"


def promote(cfg: DictConfig) -> Decision:
    """Evaluate `cfg.challenger_alias` against `cfg.champion_alias` of `cfg.model_name` and move the champion
    alias to the challenger if its `cfg.metric` exceeds the champion's by more than `cfg.margin`."""
    client = registry_client(cfg)
    challenger = aliased(client, cfg.model_name, cfg.challenger_alias)
    champion = aliased_or_none(client, cfg.model_name, cfg.champion_alias)
    if champion is not None and champion.version == challenger.version:
        raise RegistryError(
            f"{cfg.model_name} version {challenger.version} is already both {cfg.challenger_alias} and "
            f"{cfg.champion_alias}: nothing to compare (train a new model, or point {cfg.challenger_alias} elsewhere)"
        )
    challenger_score = score_version(cfg, challenger)
    champion_score = None if champion is None else score_version(cfg, champion)
    promoted = champion_score is None or challenger_score > champion_score + cfg.margin
    champion_version = None if champion is None else str(champion.version)
    decision = Decision(promoted, challenger.version, champion_version, challenger_score, champion_score)
    evidence = {
        "metric": cfg.metric,
        "margin": str(cfg.margin),
        "challenger_score": f"{challenger_score:.6f}",
        "champion_score": "none" if champion_score is None else f"{champion_score:.6f}",
    }
    if promoted:
        promote_version(
            cfg.tracking_uri,
            cfg.model_name,
            challenger.version,
            evidence,
            cfg.champion_alias,
            cfg.challenger_alias,
            why=decision.describe(cfg.model_name, cfg.metric, cfg.margin),
            via="scripts/promote.py",
        )
    else:
        rejected = {"decision": "rejected", "champion_version": champion_version, **evidence}
        tag_version(client, cfg.model_name, challenger.version, stamped("promotion", rejected))
    log.info(decision.describe(cfg.model_name, cfg.metric, cfg.margin))
    return decision


def promote_version(
    tracking_uri: str,
    name: str,
    version: str,
    evidence: Mapping[str, str],
    champion_alias: str,
    challenger_alias: str,
    why: str = "",
    via: str = "",
) -> str | None:
    """Move `champion_alias` of `name` to `version` and record it as `promotion.*` tags on that version: `evidence`
    plus the previous champion, who and when; and as a move in the alias history (cifarlab_contract.alias_history),
    which a server following the alias shows, with `why` (the decision in a sentence) and `via` (the command).

    `version` must be the one `challenger_alias` names, so that what was tested is what gets promoted. Returns the
    previous champion's version (None if there was none). A refusal changes nothing.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    challenger = aliased(client, name, challenger_alias)
    if str(challenger.version) != str(version):
        raise RegistryError(
            f"the tested challenger is {name} version {version}, but the registry's {challenger_alias!r} alias names "
            f"version {challenger.version}: nothing was promoted (test the version the alias names)"
        )
    champion = aliased_or_none(client, name, champion_alias)
    previous = None if champion is None else str(champion.version)
    if previous == str(version):
        raise RegistryError(f"{name} version {version} is already {champion_alias!r}: nothing to promote")
    tags = stamped("promotion", {"decision": "promoted", "champion_version": previous or "none", **evidence})
    # The history first: a server following the alias reads it when it loads the version the alias names
    key, value = history_tag(
        AliasMove(champion_alias, previous or NONE, str(version), tags["promotion.by"], now(), why, via)
    )
    client.set_registered_model_tag(name, key, value)
    try:
        client.set_registered_model_alias(name, champion_alias, str(version))
    except Exception:
        client.delete_registered_model_tag(name, key)  # the move did not happen
        raise
    tag_version(client, name, str(version), tags)
    return previous
