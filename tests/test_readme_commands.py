"""README's install commands agree with each other and with pyproject.toml (the ones that need a
network and a fresh machine run in CI: the test command, verbatim, by .ci/run)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_every_install_pins_the_same_torch_and_torchvision():
    pins = [re.findall(r"\btorch(?:vision)?==\S+", block) for block in BASH if "pip install torch" in block]
    assert len(pins) >= 3  # the first command, the test command, the CPU-only variant
    assert all(p == pins[0] for p in pins) and len(pins[0]) == 2, pins


def test_the_cpu_only_command_is_the_first_command_with_a_cpu_torch():
    first, cpu = BASH[0].strip(), next(b.strip() for b in BASH if "download.pytorch.org/whl/cpu" in b)
    torch_pins = " ".join(re.findall(r"\btorch(?:vision)?==\S+", first))
    index = "--index-url https://download.pytorch.org/whl/cpu"
    # The index URL replaces PyPI for that one pip call, so ninja and the rest install in the next.
    want = first.replace(f"install {torch_pins} ", f"install {torch_pins} {index} && .venv/bin/pip install ")
    assert cpu == want


def test_the_tests_in_the_first_commands_environment_install_the_test_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    (command,) = [b.strip() for b in BASH if b.startswith(".venv/bin/pip install pytest")]
    install, run = command.split(" && ")
    assert install.split()[2:] == extra and run == ".venv/bin/pytest"
