"""pyproject.toml and the requirements files pin the same packages at the same versions."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pins(path):
    """name -> version of each `name==version` line, comments and `-r` includes left out."""
    found = {}
    for line in (REPO / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, version = line.split("==")
            found[name.strip().lower()] = version.strip()
    return found


def as_pins(requirements):
    return dict((n.strip().lower(), v.strip()) for n, v in (r.split("==") for r in requirements))


def test_pyproject_dependencies_are_the_pins_of_requirements_txt():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert as_pins(project["dependencies"]) == pins("requirements.txt")
    assert as_pins(project["optional-dependencies"]["test"]) == pins("requirements-test.txt")


def test_every_requirement_is_pinned_exactly():
    for path in ("requirements.txt", "requirements-test.txt"):
        for name, version in pins(path).items():
            assert version and version[0].isdigit(), f"{path}: {name} is not pinned to a version"
