"""The README's two set-up commands, .ci/run and the packaging stay in agreement."""

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands():
    commands = quickstart_commands()
    assert len(commands) >= 2
    install_and_train, install_and_test = commands[0], commands[1]
    assert install_and_train.startswith("pip install -e . && defectseg fit --config ")
    config = install_and_train.split("--config ", 1)[1].split()[0]
    assert (REPO / config).is_file(), config
    assert install_and_test.startswith('pip install -e ".[dev]"') and install_and_test.endswith("pytest")


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    commands = [line for line in ci if line and not line.startswith("#")]
    assert commands[-1] == quickstart_commands()[1], "the README's test command and .ci/run drifted apart"
    assert any("python3 -m venv" in line for line in ci), ".ci/run must use a fresh virtual environment"


def test_pyproject_declares_the_runtime_stack():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]}
    for required in ("torch", "torchvision", "lightning", "torchmetrics", "segmentation-models-pytorch",
                     "opencv-python-headless", "albumentations", "wandb", "jsonargparse"):
        assert required in names, required
    assert project["scripts"]["defectseg"] == "defectseg.cli:main"
    dev = {re.split(r"[<>=\[ ]", dep, maxsplit=1)[0] for dep in project["optional-dependencies"]["dev"]}
    assert {"pytest", "ruff"} <= dev
    # no torch pin that would force a download of another build
    assert not any(dep.startswith("torch==") for dep in project["dependencies"])
