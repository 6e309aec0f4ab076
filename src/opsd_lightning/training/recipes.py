"""Recipes: an algorithm config (`conf/algorithm/*.yaml`) is the training module's arguments plus the parts it
is built from. A recipe may also state its own options at its top level (`group_size`, `loss`, `mode`, ...)
for its parts to read as `${algorithm.<option>}`: one knob, one place, even when two parts read it."""

from __future__ import annotations

import inspect
import logging
import re

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
_READ = re.compile(r"\$\{algorithm\.([A-Za-z_]\w*)")


def recipe_options(algorithm: DictConfig) -> set[str]:
    """The top-level keys of an (unresolved) algorithm config that its parts read as `${algorithm.<key>}`."""
    text = OmegaConf.to_yaml(algorithm, resolve=False)
    return set(_READ.findall(text)) & set(algorithm.keys())


def check_recipe_options(algorithm: DictConfig) -> None:
    """Warn about a top-level key of the algorithm config that is neither an argument of its module nor read
    by one of its parts: a misspelt option in a recipe of one's own, or an option of a part the recipe no
    longer has (`algorithm.loss` once `algorithm.terms` holds no distill term). A misspelling on the command
    line is refused by Hydra itself."""
    target = get_class(algorithm._target_)
    parameters = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # a module without recipe options: Hydra itself rejects unknown arguments
    if "${" not in OmegaConf.to_yaml(algorithm, resolve=False):
        return  # resolved already (a composed config in a test): the parts' reads can no longer be seen
    known = {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
    unread = sorted(set(algorithm.keys()) - known - recipe_options(algorithm) - {"_target_"})
    if unread:
        log.warning(
            "%s: neither an argument of %s nor read by one of the recipe's parts (as ${algorithm.<option>}), "
            "so it changes nothing: check its spelling",
            ", ".join(f"algorithm.{key}" for key in unread),
            algorithm._target_,
        )
