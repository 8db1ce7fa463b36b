"""The README's two set-up commands, .ci/run and the packaging stay in agreement."""

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    deps = {_name(dep): dep for dep in project["dependencies"]}
    for required in ("torch", "lightning", "torchmetrics", "segmentation-models-pytorch",
                     "opencv-python-headless", "albumentations", "wandb", "jsonargparse", "pyyaml", "pillow"):
        assert required in deps, required
    assert "torchvision" not in deps  # nothing imports it (segmentation-models-pytorch brings it)
    assert deps["albumentations"].replace(" ", "") == "albumentations>=2.0,<=2.0.8"
    assert deps["segmentation-models-pytorch"].replace(" ", "") == "segmentation-models-pytorch~=0.6.0"
    assert deps["opencv-python-headless"].replace(" ", "") == "opencv-python-headless>=4.10"
    assert deps["torch"].replace(" ", "") == "torch>=2.5"
    assert project["license"] == "MIT" and (REPO / "LICENSE").is_file()
    assert any(req.replace(" ", "").startswith("setuptools>=77") for req in pyproject["build-system"]["requires"])
    assert project["urls"] and project["classifiers"]
    assert project["scripts"]["defectseg"] == "defectseg.cli:main"
    extras = project["optional-dependencies"]
    dev = {_name(dep) for dep in extras["dev"]}
    assert {"pytest", "ruff"} <= dev
    assert "defectseg[onnx]" in extras["dev"] and not dev & {"onnx", "onnxruntime", "onnxscript"}
    # no torch pin that would force a download of another build
    assert not any(dep.startswith("torch==") for dep in project["dependencies"])


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=~!\[ ;]", requirement, maxsplit=1)[0]).lower()


def _imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, top-level name, lazy)`` of every absolute import in a file; ``lazy`` when it is
    inside a function (run on use, not when the module is imported)."""
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name.split(".")[0], lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.lineno, child.module.split(".")[0], lazy))
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def test_every_import_is_a_declared_dependency():
    """A module-level import must come from a core dependency; an import inside a function may
    also come from a non-dev extra (``onnx``). Stdlib and the package itself are free."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_name(dep) for dep in project["dependencies"]}
    extras = {_name(dep) for name, deps in project["optional-dependencies"].items() if name != "dev" for dep in deps}
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted((REPO / "defectseg").rglob("*.py")):
        for line, name, lazy in _imports(path):
            if name in sys.stdlib_module_names or name in ("defectseg", "__future__"):
                continue
            owners = {_name(d) for d in distributions.get(name, [])}
            allowed = core | extras if lazy else core
            if not owners & allowed:
                where = f"{path.relative_to(REPO)}:{line}"
                fix = ("only an extra provides it: import it inside the function that needs it"
                       if owners & extras else "declare its distribution in pyproject.toml's dependencies")
                problems.append(f"{where} imports {name!r} (from {sorted(owners) or 'nothing installed'}): {fix}")
    assert not problems, "\n".join(problems)


IMPORT_ALL = r"""
import importlib, pkgutil, sys
import defectseg
failed = []
for info in pkgutil.walk_packages(defectseg.__path__, "defectseg."):
    try:
        importlib.import_module(info.name)
    except ImportError as err:
        failed.append(f"{info.name}: {err!r}")
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _closure(requirements: list[str]) -> set[str]:
    """Distributions that installing ``requirements`` brings: them and their dependencies (with
    the extras asked for), from the installed metadata."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in requirements]
    names: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _name(requirement.name)
        for extra in ("", *sorted(requirement.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            names.add(name)
            try:
                requires = importlib.metadata.distribution(name).requires or []
            except importlib.metadata.PackageNotFoundError:
                continue
            for text in requires:
                sub = Requirement(text)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    if not (sub.marker is not None and "extra" in str(sub.marker) and not extra):
                        todo.append(sub)
    return names


@pytest.mark.slow
def test_every_module_imports_with_only_the_declared_dependencies(tmp_path):
    """Import each module of the package in a Python that sees only what ``pip install .``
    would bring: the core dependencies and theirs, linked into a fresh folder, with the
    site-packages folder (dev tools, the onnx extra, anything installed by hand) left out."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = _closure(project["dependencies"])
    assert {"torch", "segmentation-models-pytorch", "pillow", "pyyaml"} <= installed
    assert not {"pytest", "onnxruntime", "onnx"} & installed  # the check has teeth
    view = tmp_path / "site-packages"
    view.mkdir()
    for distribution in importlib.metadata.distributions():
        if _name(distribution.metadata["Name"]) not in installed or distribution.files is None:
            continue
        for file in distribution.files:
            top = file.parts[0]
            source = Path(distribution.locate_file(top))
            if top not in ("..", "__pycache__") and source.exists() and not (view / top).exists():
                (view / top).symlink_to(source)
    result = subprocess.run(
        [sys.executable, "-S", "-c", IMPORT_ALL], capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(view)]), "PYTHONNOUSERSITE": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
