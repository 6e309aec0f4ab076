"""Where the Hydra configs live, for an editable install and for a wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The `conf/` folder: inside the package for a wheel, at the repository top for a source checkout."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"opsd-lightning cannot find its Hydra configs (conf/train.yaml) next to {_PACKAGE_DIR}; "
        "reinstall the package with `pip install .` or run from a source checkout."
    )
