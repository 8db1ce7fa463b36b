"""One config parser for every command (defectseg.config), and the command line's boundaries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from defectseg.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS, main
from defectseg.config import DefectSegCLI, merge_config, overrides_to_args, parse_config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "defectseg"
CLI_LAYER = ("defectseg.cli", "defectseg.commands")


def _imports(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _uses_cli_layer(names: list[str]) -> list[str]:
    return [n for n in names if any(n == layer or n.startswith(layer + ".") for layer in CLI_LAYER)]


def test_library_code_and_notebooks_never_import_the_command_line_layer():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("commands/") or relative in ("cli.py", "__main__.py"):
            continue  # the command line itself (__main__ is `python -m defectseg`)
        bad = _uses_cli_layer(_imports(ast.parse(path.read_text(), str(path))))
        if bad:
            offenders[relative] = bad
    for notebook in (REPO / "notebooks").glob("*.ipynb"):
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
            bad = _uses_cli_layer(_imports(ast.parse(code)))
            if bad:
                offenders[notebook.name] = bad
    assert offenders == {}


def test_the_import_walk_sees_a_library_module_that_imports_the_cli():
    tree = ast.parse("from defectseg.commands.common import x\nimport defectseg.cli\nfrom defectseg import cli\n")
    assert set(_uses_cli_layer(_imports(tree))) == {"defectseg.commands.common", "defectseg.commands.common.x",
                                                     "defectseg.cli"}
    assert _uses_cli_layer(_imports(ast.parse("from defectseg import config\nimport defectseg.data"))) == []


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_answer_without_importing_lightning(argv):
    code = (
        "import sys\nfrom defectseg.cli import main\ncode = main(sys.argv[1:])\n"
        "print('LIGHTNING' if 'lightning' in sys.modules or 'lightning.pytorch' in sys.modules else 'LIGHT', code)"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "LIGHT 0"
    if argv == ["--version"]:
        import defectseg

        assert result.stdout.splitlines()[0] == f"defectseg {defectseg.__version__}"


def test_help_lists_every_command_once_with_a_description(capsys):
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
    assert {"fit", "test", "predict", "stats", "dli-preview", "compare", "infer", "export"} <= set(commands)
    for name in commands:
        rows = [line for line in lines if line.split()[:1] == [name]]
        assert len(rows) == 1, (name, rows)
        assert len(rows[0].split()) > 3  # a one-line description follows the name


def test_stats_takes_dashed_overrides_like_fit(capsys):
    config = str(REPO / "configs" / "quickstart.yaml")
    assert main(["stats", "--config", config, "--data.init_args.num_images", "50", "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SyntheticDefectsDataModule: 50 images")
    assert "| background |" in out


def test_old_key_value_overrides_still_read():
    assert overrides_to_args(["data.init_args.root=/a=b", "--x.y", "3", "--out", "v=w"]) == [
        "--data.init_args.root", "/a=b", "--x.y", "3", "--out", "v=w"
    ]


def test_two_configs_merge_as_fit_print_config_shows(tmp_path, capsys):
    # the second file names the class by its module path: the same class, so the first file's
    # init_args stay (a plain dict merge that compares class_path texts would drop them)
    first = tmp_path / "a.yaml"
    first.write_text(yaml.safe_dump({"data": {"class_path": "defectseg.data.SyntheticDefectsDataModule",
                                              "init_args": {"num_images": 30, "image_size": 40}}}))
    second = tmp_path / "b.yaml"
    second.write_text(yaml.safe_dump({"data": {"class_path": "defectseg.data.synthetic.SyntheticDefectsDataModule",
                                               "init_args": {"batch_size": 3}}}))
    args = ["--config", str(first), "--config", str(second)]
    config, data = parse_config(args)
    assert (data.num_images, data.batch_size) == (30, 3)
    with pytest.raises(SystemExit) as done:
        DefectSegCLI(args=["fit", *args, "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"] == config.data.init_args.as_dict()
    # the dict merge used for compare's fragments replaces a block whose class_path text differs
    merged = merge_config(yaml.safe_load(first.read_text()), yaml.safe_load(second.read_text()))
    assert merged["data"]["init_args"] == {"batch_size": 3}


def _typo_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    config["data"]["init_args"]["num_imags"] = config["data"]["init_args"].pop("num_images")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_one_paragraph(err: str, prog: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: unknown key 'data.init_args.num_imags'")
    assert "closest valid names: data.init_args.num_images" in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["fit", "validate", "stats", "dli-preview", "compare"])
def test_an_unknown_key_gives_one_paragraph_and_exit_code_2(tmp_path, capsys, command):
    typo = str(_typo_config(tmp_path))
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"configurations": {"a": {}}, "seeds": 1}))
    cases = {  # a typo in a config file, or on the command line
        "fit": ["fit", "--config", typo],
        "validate": ["validate", "--config", quickstart, "--data.init_args.num_imags", "50"],
        "stats": ["stats", "--config", quickstart, "--data.init_args.num_imags", "50"],
        "dli-preview": ["dli-preview", "--config", typo, "--out", str(tmp_path / "grid.png")],
        "compare": ["compare", "--base", typo, "--grid", str(grid), "--out", str(tmp_path / "out"), "--dry-run"],
    }
    with pytest.raises(SystemExit) as done:
        main(cases[command])
    assert done.value.code == 2
    _assert_one_paragraph(capsys.readouterr().err, f"defectseg {command}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "grid.png").exists()


def test_compare_takes_dashed_overrides_like_fit():
    from defectseg.commands.compare import split_dotted_options

    rest, overrides = split_dotted_options(
        ["--base", "b.yaml", "--trainer.max_epochs", "2", "--quick", "--data.init_args.root=/d", "model.x=1"]
    )
    assert rest == ["--base", "b.yaml", "--quick", "model.x=1"]  # key=value items stay positional overrides
    assert overrides == ["trainer.max_epochs=2", "data.init_args.root=/d"]
    with pytest.raises(SystemExit, match="--trainer.max_epochs needs a value"):
        split_dotted_options(["--trainer.max_epochs"])
