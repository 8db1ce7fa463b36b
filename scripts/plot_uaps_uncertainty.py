"""Figure of UAPS's uncertainty map next to the prediction error on validation images.

Trains a small UAPS model briefly on the built-in synthetic data (about 20 minutes on 2 CPU
cores for the default 300 steps), then for a few validation images draws: the image, the ground
truth, the main decoder's prediction, the prediction error (false positives and false negatives
of defect pixels, wrong classes) and the uncertainty map ``KL(p_mean || p_main)`` between the
mean of all decoders and the main decoder, with the auxiliary decoders' perturbations on, as in
Fig. 1 of the paper. It also prints how well the uncertainty separates wrong from right pixels
over the whole validation split (mean uncertainty of each, and the area under the ROC curve of
uncertainty as an error detector).

Usage (from the repository root)::

    python scripts/plot_uaps_uncertainty.py [--out docs/figures/uaps_uncertainty.png] [--steps 300]

An existing figure is kept unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning as L
import numpy as np

from defectseg.data import SyntheticDefectsDataModule
from defectseg.data.contract import IGNORE_INDEX
from defectseg.models import UAPSModule
from defectseg.utils.visualize import colorize, denormalize

REPO = Path(__file__).resolve().parents[1]
ERROR_COLOURS = {"false positive": (255, 60, 60), "missed defect": (60, 210, 255), "wrong class": (255, 255, 255)}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive`` (rank formula)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if not pos or not neg:
        return float("nan")
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def error_map(pred: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RGB map: false-positive defect pixels red, missed defect pixels cyan, wrong class white."""
    out = np.zeros((*mask.shape, 3), np.uint8)
    valid = mask != IGNORE_INDEX
    for colour, where in zip(ERROR_COLOURS.values(), (
        (pred > 0) & (mask == 0), (pred == 0) & (mask > 0), (pred > 0) & (mask > 0) & (pred != mask)
    )):
        out[valid & where] = colour
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "figures" / "uaps_uncertainty.png"))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing figure")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--images", type=int, default=3, help="validation images in the figure")
    parser.add_argument("--size", type=int, default=96, help="side of the synthetic images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    warnings.filterwarnings("ignore", category=UserWarning)
    L.seed_everything(args.seed, verbose=False)

    data = SyntheticDefectsDataModule(
        num_images=300, image_size=args.size, batch_size=8, unlabeled_batch_size=8,
        labeled_fraction=0.2, defect_free_fraction=0.3, seed=args.seed,
    )
    model = UAPSModule(
        num_classes=data.num_classes, class_names=data.class_names, encoder_depth=4,
        decoder_channels=[64, 32, 16, 16], lr=3e-3, unsupervised_weight=0.1, mean=data.mean, std=data.std,
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True,
    )
    trainer.fit(model, data)

    model.eval()
    records = []
    scores, wrong = [], []
    for batch in data.val_dataloader():
        result = model.uncertainty_map(batch["image"], perturb=True)
        for i in range(batch["image"].shape[0]):
            height, width = (int(v) for v in batch["valid_size"][i])
            mask = batch["mask"][i, :height, :width].numpy()
            pred = result["prediction"][i, :height, :width].numpy()
            unc = result["uncertainty"][i, :height, :width].numpy()
            valid = mask != IGNORE_INDEX
            scores.append(unc[valid])
            wrong.append((pred != mask)[valid])
            records.append(
                {
                    "image": denormalize(batch["image"][i, :, :height, :width], data.mean, data.std),
                    "mask": mask, "pred": pred, "unc": unc, "defect": int((mask > 0).sum()),
                    "errors": int(((pred != mask) & valid).sum()), "path": batch["path"][i],
                }
            )
    scores_all, wrong_all = np.concatenate(scores), np.concatenate(wrong)
    auc = roc_auc(scores_all, wrong_all)
    print(
        f"validation pixels: {wrong_all.mean() * 100:.2f} % wrong; mean uncertainty on wrong pixels "
        f"{scores_all[wrong_all].mean():.4f}, on right pixels {scores_all[~wrong_all].mean():.4f}; "
        f"ROC AUC of uncertainty as an error detector {auc:.3f}"
    )

    # images with defects of different classes, most errors first
    chosen, seen = [], set()
    for record in sorted(records, key=lambda r: -r["errors"]):
        label = int(record["mask"].max())
        if record["defect"] and label not in seen:
            chosen.append(record)
            seen.add(label)
        if len(chosen) == args.images:
            break

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    columns = ["image", "ground truth", "prediction (main decoder)", "prediction error", "uncertainty KL(p̄ ‖ p_main)"]
    fig, axes = plt.subplots(len(chosen), 5, figsize=(13, 2.8 * len(chosen)), squeeze=False)
    vmax = float(np.percentile(np.concatenate([r["unc"].ravel() for r in chosen]), 99.5)) or 1.0
    for row, record in enumerate(chosen):
        panels = [
            record["image"].squeeze(),
            colorize(record["mask"], data.num_classes),
            colorize(record["pred"], data.num_classes),
            error_map(record["pred"], record["mask"]),
        ]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, cmap="gray" if panel.ndim == 2 else None)
        shown = axes[row, 4].imshow(record["unc"], cmap="magma", vmin=0.0, vmax=vmax)
        fig.colorbar(shown, ax=axes[row, 4], fraction=0.046, pad=0.04)
        axes[row, 0].set_ylabel(record["path"], fontsize=8)
        for col in range(5):
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if row == 0:
                axes[row, col].set_title(columns[col], fontsize=10)
    fig.legend(
        handles=[Patch(facecolor=np.array(c) / 255, edgecolor="black", label=n) for n, c in ERROR_COLOURS.items()],
        loc="lower center", ncol=3, fontsize=9, frameon=False,
    )
    fig.suptitle(
        f"UAPS after {args.steps} steps on synthetic data (20 % labelled): uncertainty vs. error "
        f"(validation ROC AUC {auc:.2f})",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
