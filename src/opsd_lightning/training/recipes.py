"""Recipes: an algorithm config (`conf/algorithm/*.yaml`) is the training module's arguments plus the parts it
is built from. A recipe may also state its own options at its top level (`group_size`, `loss`, `mode`, ...)
for its parts to read as `${algorithm.<option>}`: one knob, one place, even when two parts read it."""

from __future__ import annotations

import inspect
import re

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

_READ = re.compile(r"\$\{algorithm\.([A-Za-z_]\w*)")


def recipe_options(algorithm: DictConfig) -> set[str]:
    """The top-level keys of an (unresolved) algorithm config that its parts read as `${algorithm.<key>}`."""
    text = OmegaConf.to_yaml(algorithm, resolve=False)
    return set(_READ.findall(text)) & set(algorithm.keys())


def check_recipe_options(algorithm: DictConfig) -> None:
    """Every top-level key of the algorithm config is an argument of its module or read by one of its parts,
    so a misspelt option in a recipe of one's own fails before any model loads."""
    target = get_class(algorithm._target_)
    parameters = inspect.signature(target).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return  # a module without recipe options: Hydra itself rejects unknown arguments
    if "${" not in OmegaConf.to_yaml(algorithm, resolve=False):
        return  # resolved already (a composed config in a test): the parts' reads can no longer be seen
    known = {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
    unread = sorted(set(algorithm.keys()) - known - recipe_options(algorithm) - {"_target_"})
    if unread:
        raise ValueError(
            f"algorithm: {', '.join(f'algorithm.{key}' for key in unread)} is neither an argument of "
            f"{algorithm._target_} nor read by one of the recipe's parts (as ${{algorithm.<option>}}); "
            "check its spelling"
        )
