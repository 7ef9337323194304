"""Two-moons picture of NNGuide (the figure in the paper's repository README): KNN, the classifier's
confidence and NNGuide on that confidence.

A small MLP is trained on scikit-learn's two moons; each detector is fitted on the training points' outputs
and scored on a grid reaching well beyond the data, one panel per score. The confidence is the maximum softmax
probability by default, as in the paper's own plotting script (`--base energy` shows the energy instead, whose
growth far from the data this toy's guidance cannot cancel; see docs/two-moons.md). Each panel shades the
region its detector accepts at the threshold that accepts 95% of the training points (their 5th-percentile
score), outlines it, and colours it by a scale shared by all panels: the share of training points scoring lower.
Points farther than FAR_DISTANCE from every training point lie outside the dashed line; each title gives the
share of them accepted.
Usage: python figures/two_moons.py [--output assets/two_moons.png] [--grid 200] [--seed 0] [--k 10] [--base msp]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from sklearn.datasets import make_moons

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_detectors import create_detector  # noqa: E402

X_RANGE, Y_RANGE = (-3.0, 4.0), (-3.0, 3.0)
FAR_DISTANCE = 1.5          # grid points farther than this from every training point count as far from the data
ID_REJECTED_PERCENT = 5     # the threshold is the training points' 5th-percentile score: it accepts 95% of ID
REJECTED_COLOUR = "#d4d4d4"
CONFIDENCE_NAMES = {"msp": "MSP", "energy": "energy"}


def panels(base: str) -> list[tuple[str, str, dict]]:
    """(score key, panel title, detector keyword arguments) for KNN, the confidence, and NNGuide on it."""
    return [("knn", "KNN", {}), (base, f"Classifier ({CONFIDENCE_NAMES[base]})", {}),
            ("nnguide", f"NNGuide ({CONFIDENCE_NAMES[base]} base)", {"base": base})]


class MoonsNet(torch.nn.Module):
    """(x - centre) -> 64 ReLU -> 256 ReLU features -> 2 logits; forward returns (features (N, 256), logits (N, 2)).

    Shallow and wide so that the normalised features still tell locations apart (a deeper net collapses each
    class onto one feature direction).
    """

    def __init__(self, centre: torch.Tensor, hidden: int = 64, feature_dim: int = 256) -> None:
        super().__init__()
        self.register_buffer("centre", centre)           # (2,) mean of the training points
        self.body = torch.nn.Sequential(
            torch.nn.Linear(2, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, feature_dim), torch.nn.ReLU())
        self.head = torch.nn.Linear(feature_dim, 2)

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(points - self.centre)       # (N, feature_dim)
        return features, self.head(features)             # (N, 2)


def train_classifier(points: torch.Tensor, labels: torch.Tensor, seed: int, steps: int = 200) -> MoonsNet:
    """Full-batch Adam on cross-entropy; seeded so the figure is the same on every run."""
    torch.manual_seed(seed)
    model = MoonsNet(points.mean(dim=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(points)[1], labels)
        loss.backward()
        optimizer.step()
    return model.eval()


def model_outputs(model: MoonsNet, points: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detectors' input: L2-normalised penultimate features, logits and labels."""
    with torch.no_grad():
        features, logits = model(points)
    return {"feas": torch.nn.functional.normalize(features, dim=1), "logits": logits, "labels": labels}


def scores_on_grid(grid: int = 200, seed: int = 0, k: int = 10, base: str = "msp") -> dict[str, np.ndarray]:
    """Train on two moons, then score a grid x grid mesh with each detector fitted on the training points.

    Keys: "xs", "ys" (grid,); "points" (500, 2), "labels" (500,); "distance" (grid, grid) from each grid point
    to the nearest training point; per detector name its grid scores (grid, grid) and "<name>_train" (500,).
    """
    points, labels = make_moons(n_samples=500, noise=0.1, random_state=seed)
    train_points = torch.tensor(points, dtype=torch.float32)
    train_labels = torch.tensor(labels, dtype=torch.long)
    xs = np.linspace(*X_RANGE, grid, dtype=np.float32)
    ys = np.linspace(*Y_RANGE, grid, dtype=np.float32)
    mesh = torch.from_numpy(np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2))   # (grid * grid, 2)

    # Thread start-up costs more than these tiny matmuls compute: one thread is faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_classifier(train_points, train_labels, seed)
        train_outputs = model_outputs(model, train_points, train_labels)
        grid_outputs = model_outputs(model, mesh, torch.zeros(len(mesh), dtype=torch.long))
        result: dict[str, np.ndarray] = {
            "xs": xs, "ys": ys, "points": points, "labels": labels,
            "distance": torch.cdist(mesh, train_points).amin(dim=1).numpy().reshape(grid, grid)}
        for name, _, options in panels(base):
            detector = create_detector(name, **({"k": k, **options} if name in ("knn", "nnguide") else {}))
            detector.fit(train_outputs)
            result[name] = detector.score_samples(grid_outputs).numpy().reshape(grid, grid)
            result[f"{name}_train"] = detector.score_samples(train_outputs).numpy()
    finally:
        torch.set_num_threads(threads)
    return result


def acceptance_threshold(train_scores: np.ndarray) -> float:
    """The score that 95% of the training points exceed: the threshold that accepts 95% of ID."""
    return float(np.percentile(train_scores, ID_REJECTED_PERCENT))


def far_accepted_fraction(scores: dict[str, np.ndarray], name: str) -> float:
    """Share of the grid points farther than FAR_DISTANCE from the data that detector `name` accepts."""
    far = scores["distance"] > FAR_DISTANCE
    return float((scores[name][far] > acceptance_threshold(scores[f"{name}_train"])).mean())


def draw(scores: dict[str, np.ndarray], base: str = "msp") -> Figure:
    """The three panels of `scores_on_grid`'s output: each detector's accepted region (score above its ID
    threshold) coloured by the share of training points scoring lower, a scale shared by all panels since each
    score has its own units; the rejected region grey."""
    figure = Figure(figsize=(15, 4.5), dpi=100)
    figure.subplots_adjust(left=0.01, right=0.9, bottom=0.1, top=0.93, wspace=0.04)
    axes = figure.subplots(1, 3)
    accepted_levels = np.linspace(ID_REJECTED_PERCENT / 100, 1.0, 20)
    for axis, (name, title, _) in zip(axes, panels(base)):
        grid_scores, train_scores = scores[name], np.sort(scores[f"{name}_train"])
        threshold = acceptance_threshold(train_scores)
        share_below = np.searchsorted(train_scores, grid_scores, side="left") / train_scores.size
        filled = axis.contourf(scores["xs"], scores["ys"], share_below, levels=accepted_levels, cmap="viridis")
        rejected_levels = [min(float(grid_scores.min()), threshold) - 1.0, threshold]
        axis.contourf(scores["xs"], scores["ys"], grid_scores, levels=rejected_levels, colors=[REJECTED_COLOUR])
        axis.contour(scores["xs"], scores["ys"], grid_scores, levels=[threshold], colors="black", linewidths=1.6)
        axis.contour(scores["xs"], scores["ys"], scores["distance"], levels=[FAR_DISTANCE], colors="#555555",
                     linewidths=1.0, linestyles="--")
        axis.scatter(*scores["points"].T, c=scores["labels"], cmap="coolwarm", s=6,
                     edgecolors="white", linewidths=0.3)
        axis.set_title(f"{title}: accepts {100 * far_accepted_fraction(scores, name):.1f}% of far points")
        axis.set_aspect("equal")
        axis.set_xticks([])
        axis.set_yticks([])
    colour_axis = figure.add_axes((0.915, 0.14, 0.012, 0.75))
    figure.colorbar(filled, cax=colour_axis, ticks=[0.05, 0.25, 0.5, 0.75, 1.0],
                    label="share of training points scoring lower (all panels)")
    figure.legend(handles=[Patch(color=REJECTED_COLOUR, label="rejected: below the ID threshold"),
                           Line2D([], [], color="black", linewidth=1.6,
                                  label=f"ID threshold (accepts {100 - ID_REJECTED_PERCENT}% of training points)"),
                           Line2D([], [], color="#555555", linewidth=1.0, linestyle="--",
                                  label=f"distance {FAR_DISTANCE} from the data: far points lie outside")],
                  loc="lower center", ncols=3, frameon=False, fontsize=10)
    return figure


def render(output: Path, grid: int = 200, seed: int = 0, k: int = 10, base: str = "msp") -> Path:
    """Draw the three score maps side by side into one PNG at `output`; returns its path."""
    figure = draw(scores_on_grid(grid, seed, k, base), base)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("assets/two_moons.png"))
    parser.add_argument("--grid", type=int, default=200, help="grid points per axis")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the classifier")
    parser.add_argument("--k", type=int, default=10, help="neighbours for KNN and NNGuide")
    parser.add_argument("--base", choices=list(CONFIDENCE_NAMES), default="msp",
                        help="the classifier's confidence, shown alone and as NNGuide's base")
    args = parser.parse_args()
    print(render(args.output, args.grid, args.seed, args.k, args.base))


if __name__ == "__main__":
    main()
