"""constraints.txt is an installable set: every pinned distribution installed here accepts the versions pinned for
what it requires (a pin some package refuses, like tabulate 0.10.0 for reasoning-gym, fails here, not in pip)."""

from __future__ import annotations

from importlib.metadata import Distribution, distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"


def pins(text: str) -> dict[str, Version]:
    """{canonical name: version} of the `name==version` lines."""
    pinned = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pinned[canonicalize_name(name)] = Version(version.strip())
    return pinned


def refused(pinned: dict[str, Version], installed: list[Distribution]) -> list[str]:
    """Each requirement of a pinned, installed distribution (its extras aside; markers evaluated here) that the pin
    of what it requires does not satisfy."""
    problems = []
    for dist in installed:
        if canonicalize_name(dist.metadata["Name"]) not in pinned:
            continue  # installed here by hand: not part of the tested set
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            pin = pinned.get(canonicalize_name(requirement.name))
            if pin is not None and not requirement.specifier.contains(pin, prereleases=True):
                problems.append(f"{dist.metadata['Name']} requires {text}; constraints.txt pins "
                                f"{requirement.name}=={pin}")
    return problems


def test_every_pin_satisfies_the_installed_distributions() -> None:
    assert refused(pins(CONSTRAINTS.read_text()), list(distributions())) == []


def test_a_pin_a_package_refuses_is_found() -> None:
    pinned = pins(CONSTRAINTS.read_text())
    assert "reasoning-gym" in pinned  # installed from the tested set
    problems = refused({**pinned, "tabulate": Version("0.10.0")}, list(distributions()))
    assert problems == ["reasoning_gym requires tabulate==0.9.0; constraints.txt pins tabulate==0.10.0"]
