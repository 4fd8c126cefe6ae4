"""environment.yml (conda) and the pip path (scripts/setup.sh) install the same packages."""
import re

from conftest import ROOT


def _extras(text: str) -> set[str]:
    match = re.search(r"-e \"?\.\[([a-z,]+)\]", text)
    assert match, "no editable install of the project with extras"
    return set(match.group(1).split(","))


def test_conda_and_pip_install_the_same_extras():
    conda = (ROOT / "environment.yml").read_text()
    pip = (ROOT / "scripts" / "setup.sh").read_text()
    assert _extras(conda) == _extras(pip) == {"engine", "train", "bench", "test"}
    # conda brings only python and pip: every package comes from pyproject.toml's one list
    deps = re.search(r"dependencies:\n((?:\s+-.*\n)+)", conda).group(1)
    assert [d.strip() for d in deps.splitlines() if d.strip().startswith("- ") and "pip:" not in d][:2] == \
        ["- python=3.11", "- pip"]
