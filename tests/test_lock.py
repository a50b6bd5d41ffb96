"""requirements-lock.txt (what `make install` installs) pins every requirement, inside requirements.txt's range."""

from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _lines(name: str) -> list[str]:
    text = (REPO / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in text if line.split("#")[0].strip()]


def test_lock_pins_every_requirement_within_its_range():
    pins = {}
    for line in _lines("requirements-lock.txt"):
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"lock line {line!r} is not an exact pin"
        pins[req.name.lower().replace("_", "-")] = spec.version
    for line in _lines("requirements.txt"):
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is in requirements.txt but not pinned in requirements-lock.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements-lock.txt pins {req.name}=={pins[name]}, outside requirements.txt's {req.specifier}")
    assert "torch" not in pins  # installed first from TORCH_SPEC (the local CPU wheel)


def test_makefile_installs_the_lock():
    makefile = (REPO / "Makefile").read_text()
    assert "-r requirements-lock.txt -r requirements.txt" in makefile
