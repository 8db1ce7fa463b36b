"""Plot loss value and gradient against the error eps = 1 - p (as Figure 4 of Xie et al., 2023).

    python scripts/plot_losses.py                       # writes docs/figures/loss_curves.png
    python scripts/plot_losses.py --eps-inf 0.2 --eps-sup 0.8 --out my_curves.png

Curves: cross-entropy ``-ln(1 - eps)``, focal loss ``-eps^gamma ln(1 - eps)`` for gamma = 2 and 4,
and the truncated cross-entropy of the balanced loss (from
:func:`defectseg.losses.truncated_ce_from_error`). Gradients are ``d loss / d eps``, computed by
autograd on the same functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from defectseg.losses import truncated_ce_from_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def curves(eps_inf: float, eps_sup: float, points: int = 2000) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``eps`` and ``{label: (value, d value / d eps)}`` for every curve."""
    eps = torch.linspace(0.0, 0.995, points, dtype=torch.float64)
    functions = {
        "cross-entropy": lambda e: -torch.log1p(-e),
        "focal, $\\gamma$ = 2": lambda e: -(e**2) * torch.log1p(-e),
        "focal, $\\gamma$ = 4": lambda e: -(e**4) * torch.log1p(-e),
        f"truncated CE ($\\epsilon_{{inf}}$ = {eps_inf}, $\\epsilon_{{sup}}$ = {eps_sup})": lambda e: truncated_ce_from_error(
            e, eps_inf, eps_sup
        ),
    }
    out = {}
    for label, fn in functions.items():
        x = eps.clone().requires_grad_()
        value = fn(x)
        (grad,) = torch.autograd.grad(value.sum(), x)
        out[label] = (value.detach(), grad)
    return eps, out


def plot(path: Path, eps_inf: float, eps_sup: float) -> Path:
    eps, data = curves(eps_inf, eps_sup)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = ["-", "--", ":", "-"]
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for (label, (value, grad)), style, colour in zip(data.items(), styles, colours):
        width = 2.4 if label.startswith("truncated") else 1.6
        axes[0].plot(eps, value, style, color=colour, lw=width, label=label)
        axes[1].plot(eps, grad, style, color=colour, lw=width, label=label)
    for ax, title, top in ((axes[0], "loss value", 4.0), (axes[1], "gradient d loss / d $\\epsilon$", 12.0)):
        for x in (eps_inf, eps_sup):
            ax.axvline(x, color="grey", lw=0.8, ls=(0, (2, 3)))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, top)
        ax.set_xlabel("error $\\epsilon = 1 - p$ (p: predicted probability of the annotated class)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize=9)
    fig.suptitle("Cross-entropy, focal loss and the truncated cross-entropy of the balanced loss", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures" / "loss_curves.png")
    parser.add_argument("--eps-inf", type=float, default=0.3)
    parser.add_argument("--eps-sup", type=float, default=0.7)
    args = parser.parse_args()
    print(f"wrote {plot(args.out, args.eps_inf, args.eps_sup)}")


if __name__ == "__main__":
    main()
