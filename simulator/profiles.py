"""Named link profiles (lan, lte, 3g-poor, tunnel, ...) loaded strictly from YAML."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from simulator.linkmodel import LinkParams
from transport.configload import build, load_yaml
from transport.errors import ConfigError

__all__ = ["DEFAULT_PROFILES_PATH", "get_profile", "load_profiles"]

DEFAULT_PROFILES_PATH: Final = Path(__file__).resolve().parent.parent / "config" / "links.yaml"


@dataclass(frozen=True, slots=True)
class _ProfilesFile:
    """The shape of a link profiles file: ``profiles: {name: LinkParams}``."""

    profiles: dict[str, LinkParams]


def load_profiles(path: str | Path = DEFAULT_PROFILES_PATH) -> dict[str, LinkParams]:
    """Every profile in ``path``, validated; unknown keys and bad values are ConfigErrors."""
    where = str(path)
    parsed = build(_ProfilesFile, load_yaml(path), path=where)
    if not parsed.profiles:
        raise ConfigError(where, "profiles", "no link profiles defined")
    for name in parsed.profiles:
        if not name.strip():
            raise ConfigError(where, "profiles", "a profile name is empty")
    return dict(parsed.profiles)


def get_profile(name: str, path: str | Path = DEFAULT_PROFILES_PATH) -> LinkParams:
    """The profile called ``name``; a ConfigError lists the known names when it is missing."""
    profiles = load_profiles(path)
    try:
        return profiles[name]
    except KeyError:
        known = ", ".join(sorted(profiles))
        raise ConfigError(
            str(path), f"profiles.{name}", f"unknown link profile (known: {known})"
        ) from None
