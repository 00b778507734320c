"""Where the shipped DeepSpeed configs and model presets are.

The repository keeps one copy of them, at its top level (``configs/*.json`` and
``configs/models/*.json``); ``pyproject.toml`` maps that folder into the package as
``ds_lowrank/configs`` when a wheel is built.  So an installed package finds them inside
itself, and a checkout (``PYTHONPATH`` or ``pip install -e``) next to itself.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """The folder of the shipped DeepSpeed configs (``models/`` in it holds the model presets)."""
    packaged = PACKAGE / "configs"
    if packaged.is_dir():
        return packaged
    return PACKAGE.parent / "configs"


def presets_dir() -> Path:
    """The folder of the model presets (``tiny.json``, ``60m.json``, ...)."""
    return configs_dir() / "models"


def shipped_configs() -> list[str]:
    """Names of the shipped DeepSpeed configs (``ldadam_zero2``, ``adamw_zero2``, ...)."""
    return sorted(p.stem for p in configs_dir().glob("*.json"))


def shipped_config(name: str) -> Path | None:
    """The path of a shipped DeepSpeed config by name (``adamw_zero2`` or ``adamw_zero2.json``),
    or None."""
    path = configs_dir() / (name if name.endswith(".json") else f"{name}.json")
    return path if Path(name).name == name and path.is_file() else None
