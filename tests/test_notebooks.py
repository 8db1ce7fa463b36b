"""The notebooks under ``notebooks/`` run top to bottom and stay stripped of outputs.

Each notebook is executed with nbclient in a fresh IPython kernel of the interpreter running the
tests (a kernel spec written to a temporary folder, so no installed ``python3`` spec pointing at
another Python can be picked up), with ``notebooks/`` as the working directory. Before running,
a check cell is inserted in memory just before the notebook's last cell (tagged ``cleanup``,
which deletes the notebook's temporary folder); it prints values computed by the notebook as
JSON, which the tests then assert on. The committed files are never modified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = ("01_quickstart.ipynb", "02_your_own_data.ipynb", "03_methods.ipynb")
KERNEL = "defectseg-notebook-tests"
CELL_TIMEOUT = 600  # seconds per cell; a whole notebook takes about a minute on 2 CPU cores
MARKER = "__NOTEBOOK_CHECK__"


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a kernel spec that starts ipykernel with this interpreter."""
    try:
        from ipykernel.kernelspec import write_kernel_spec
    except ImportError:
        pytest.skip("no Jupyter kernel: ipykernel is not installed (pip install -e '.[dev]')")
    folder = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(str(folder / KERNEL))  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    return folder


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def tagged(nb: nbformat.NotebookNode, tag: str) -> int:
    """Index of the only cell carrying ``tag``."""
    found = [
        i for i, cell in enumerate(nb.cells) if tag in cell.get("metadata", {}).get("tags", [])
    ]
    assert len(found) == 1, f"expected one cell tagged {tag!r}, found {len(found)}"
    return found[0]


def with_check(nb: nbformat.NotebookNode, expressions: dict[str, str], before: int) -> None:
    """Insert a cell before cell ``before`` that prints ``{key: eval(expression)}`` as JSON."""
    items = ", ".join(f"{key!r}: {expression}" for key, expression in expressions.items())
    source = f"import json as _json\nprint({MARKER!r} + _json.dumps({{{items}}}, default=str))"
    nb.cells.insert(before, nbformat.v4.new_code_cell(source))


def execute(nb: nbformat.NotebookNode, kernels: Path) -> None:
    """Run every cell in a fresh kernel with ``notebooks/`` as the working directory."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    manager = AsyncKernelManager(
        kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    client = NotebookClient(
        nb,
        km=manager,
        kernel_name=KERNEL,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails


def check_output(nb: nbformat.NotebookNode) -> dict[str, Any]:
    """The JSON printed by the check cell."""
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text = output.get("text", "") if output.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith(MARKER):
                    return json.loads(line[len(MARKER) :])
    raise AssertionError("the check cell printed nothing")


def figures(nb: nbformat.NotebookNode) -> int:
    """Number of PNG images displayed by the notebook."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


def repo_files() -> set[Path]:
    return {p for p in NOTEBOOKS.rglob("*") if "__pycache__" not in p.parts}


def run_notebook(
    name: str, expressions: dict[str, str], kernels: Path
) -> tuple[dict[str, Any], nbformat.NotebookNode]:
    """Execute ``name`` with a check cell before its cleanup cell; check that nothing was left."""
    nb = read(name)
    with_check(nb, {"workdir": "str(workdir)", **expressions}, tagged(nb, "cleanup"))
    files = repo_files()
    execute(nb, kernels)
    values = check_output(nb)
    assert repo_files() == files, "the notebook wrote files into notebooks/"
    assert not Path(values["workdir"]).exists(), "the cleanup cell left the temporary folder"
    return values, nb


def expected_data_root() -> Path:
    """Where notebook 03 looks for the datasets (a relative variable counts from notebooks/)."""
    value = os.environ.get("DEFECTSEG_DATA_ROOT")
    if value is None:
        return REPO.parent / "shared" / "datasets"
    return Path(value) if Path(value).is_absolute() else NOTEBOOKS / value


# ---------------------------------------------------------------------------- stripped
@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_stripped(name: str) -> None:
    """No outputs or execution counts are committed, and the cells the tests rely on exist."""
    nb = read(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, f"{name} has no code cell"
    for index, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {index} has committed outputs; clear them"
        assert cell.execution_count is None, f"{name}: code cell {index} has an execution count"
    assert nb.cells[0].cell_type == "markdown" and "Tiny settings" in nb.cells[0].source
    assert tagged(nb, "cleanup") == len(nb.cells) - 1, "the cleanup cell must come last"
    assert "%matplotlib inline" in code[0].source


def test_every_notebook_is_tested() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


# ---------------------------------------------------------------------------- execution
@pytest.mark.slow
def test_quickstart_notebook(kernel_dir: Path) -> None:
    values, nb = run_notebook(
        "01_quickstart.ipynb",
        {"iou": "iou", "classes": "data.class_names", "miou_defect": "results['test/miou_defect']"},
        kernel_dir,
    )
    assert values["classes"] == ["background", "scratch", "pit", "stain", "crack"]
    assert list(values["iou"]) == values["classes"]
    assert values["iou"]["background"] > 0.8  # a trained model gets the background right
    found = [v for name, v in values["iou"].items() if name != "background" and v == v]  # not nan
    assert max(found, default=0.0) > 0.05  # and finds at least one defect class
    assert 0.0 <= values["miou_defect"] <= 1.0
    assert figures(nb) >= 3  # samples, training curves, predictions vs ground truth


@pytest.mark.slow
def test_your_own_data_notebook(kernel_dir: Path) -> None:
    values, nb = run_notebook(
        "02_your_own_data.ipynb",
        {
            "stats": "stats",
            "classes": "data.class_names",
            "before": "before.sum(0).tolist()",
            "after": "after.sum(0).tolist()",
            "inputs": "sorted(p.name for p in new_parts.iterdir())",
            "report": "[Path(r['file']).name for r in report]",
            "masks_written": "[Path(r['outputs']['mask']).is_file() for r in records]",
            "summary_images": "summary.images",
            "dli_logged": "dli_keys",
        },
        kernel_dir,
    )
    classes = ["background", "scratch", "pit"]
    assert values["classes"] == classes
    assert list(values["stats"]) == classes
    assert values["stats"]["background"]["image_ratio"] == 1.0
    # DLI: defect-free images received defects, no class lost images
    assert values["after"][0] < values["before"][0]
    assert all(a >= b for a, b in zip(values["after"][1:], values["before"][1:]))
    assert "train/dli/injected" in values["dli_logged"]
    # the report covers every input image once, and every mask it names was written
    assert values["report"] == values["inputs"]
    assert values["summary_images"] == len(values["inputs"])
    assert values["masks_written"] and all(values["masks_written"])
    assert figures(nb) >= 2  # DLI counts, overlays


@pytest.mark.slow
def test_methods_notebook(kernel_dir: Path) -> None:
    values, nb = run_notebook(
        "03_methods.ipynb",
        {
            "source": "source",
            "annotation_shape": "list(annotation.shape)",
            "map_shapes": "[list(m_class.shape), list(m_confusion.shape), list(m_both.shape)]",
            "confusion_range": "[float(m_confusion.min()), float(m_confusion.max())]",
            "defect_weight": "float(m_class[torch.from_numpy(annotation > 0)].min())",
            "dli_before": "dli_before.sum(0).tolist()",
            "dli_after": "dli_after.sum(0).tolist()",
            "pseudo_shape": "list(pseudo_label.shape)",
            "uncertainty_shape": "list(uncertainty.shape)",
            "uncertainty_min": "float(uncertainty.min())",
            "decoders": "uaps.decoder_names",
            "steps": "trainer.global_step",
        },
        kernel_dir,
    )
    magnetic_tile = any(
        (expected_data_root() / "magnetic_tile" / "MT_Crack" / "Imgs").glob("*.png")
    )
    assert values["source"].startswith("Magnetic Tile" if magnetic_tile else "synthetic")
    # balanced loss: maps of the annotation's size, confusion weights in [0, 1], defects up-weighted
    assert values["map_shapes"] == [values["annotation_shape"]] * 3
    low, high = values["confusion_range"]
    assert 0.0 <= low < 1.0 and high == 1.0
    assert values["defect_weight"] > 1.0
    # DLI: fewer defect-free images after injection, no class lost images
    assert values["dli_after"][0] < values["dli_before"][0]
    assert all(a >= b for a, b in zip(values["dli_after"][1:], values["dli_before"][1:]))
    # UAPS: one prediction per decoder, pseudo-labels and uncertainty maps of the images' size
    assert values["steps"] == 100
    assert values["decoders"] == ["main", "aux1_noise", "aux2_dropout", "aux3_feature_drop"]
    batch, height, width = values["pseudo_shape"]
    assert values["uncertainty_shape"] == [4, batch, height, width] and height == width == 64
    assert values["uncertainty_min"] > -1e-5  # a KL divergence
    assert figures(nb) >= 5  # curves, maps, DLI grid, DLI counts, UAPS


@pytest.mark.slow
def test_methods_notebook_without_magnetic_tile(
    kernel_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """The balanced-loss part falls back to a synthetic annotation when the dataset is absent."""
    monkeypatch.setenv("DEFECTSEG_DATA_ROOT", str(tmp_path / "no-datasets"))
    nb = read("03_methods.ipynb")
    nb.cells = nb.cells[: tagged(nb, "balanced-loss-maps") + 1] + nb.cells[-1:]  # + cleanup
    with_check(
        nb,
        {"source": "source", "shape": "list(m_both.shape)", "classes": "class_names"},
        len(nb.cells) - 1,
    )
    execute(nb, kernel_dir)
    values = check_output(nb)
    assert values["source"].startswith("synthetic")
    assert values["classes"] == ["background", "scratch", "pit", "stain", "crack"]
    assert values["shape"] == [160, 160]
    assert figures(nb) == 2  # loss curves, maps
