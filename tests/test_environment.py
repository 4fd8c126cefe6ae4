"""environment.yml (conda) and the test command's pip path (scripts/setup.sh with the test extras)
install the same packages; the demo's setup installs the run time alone (the engine extra)."""
import re

from conftest import ROOT


def _extras(text: str) -> set[str]:
    match = re.search(r"-e \"?\.\[([a-z,]+)\]", text)
    assert match, "no editable install of the project with extras"
    return set(match.group(1).split(","))


def test_conda_and_pip_install_the_same_extras():
    conda = (ROOT / "environment.yml").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r'-e "\.\[\$\{extras\}\]"', setup) and 'extras="${1:-engine}"' in setup
    # the test command's extras: what conda installs too; the demo's: the engine alone
    tests = re.search(r"setup\.sh ([a-z,]+)", (ROOT / "scripts" / "test.sh").read_text()).group(1)
    assert _extras(conda) == set(tests.split(",")) == {"engine", "train", "bench", "test"}
    assert "setup.sh" in (ROOT / "scripts" / "demo.sh").read_text() and \
        not re.search(r"setup\.sh [a-z]", (ROOT / "scripts" / "demo.sh").read_text())
    # conda brings only python and pip: every package comes from pyproject.toml's one list
    deps = re.search(r"dependencies:\n((?:\s+-.*\n)+)", conda).group(1)
    assert [d.strip() for d in deps.splitlines() if d.strip().startswith("- ") and "pip:" not in d][:2] == \
        ["- python=3.11", "- pip"]
