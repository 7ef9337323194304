"""Two-moons picture of NNGuide (the figure in the paper's repository README): KNN, the classifier's
confidence and NNGuide on that confidence.

A small MLP is trained on scikit-learn's two moons; each detector is fitted on the training points' outputs
and scored on a grid reaching well beyond the data, one contour panel per score. The confidence is the
maximum softmax probability by default, as in the paper's own plotting script (`--base energy` shows the
energy instead, whose growth far from the data this toy's guidance cannot cancel; see the README). Colours
are clipped to each panel's 5th-95th percentiles, as there too.
Usage: python figures/two_moons.py [--output assets/two_moons.png] [--grid 200] [--seed 0] [--k 10] [--base msp]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from sklearn.datasets import make_moons

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_detectors import create_detector  # noqa: E402

X_RANGE, Y_RANGE = (-3.0, 4.0), (-3.0, 3.0)
CONFIDENCE_NAMES = {"msp": "MSP", "energy": "energy"}


def panels(base: str) -> list[tuple[str, str, dict]]:
    """(score key, panel title, detector keyword arguments) for KNN, the confidence, and NNGuide on it."""
    return [("knn", "KNN", {}), (base, f"Classifier ({CONFIDENCE_NAMES[base]})", {}),
            ("nnguide", f"NNGuide ({CONFIDENCE_NAMES[base]} base)", {"base": base})]


class MoonsNet(torch.nn.Module):
    """(x - centre) -> 64 ReLU -> 256 ReLU features -> 2 logits; forward returns (features, logits).

    Shallow and wide so the normalised features still tell locations apart; a deeper net collapses each
    class onto one feature direction and then every point of the plane has a near neighbour (cosine ~ 1).
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

    # Thread start-up costs more than these tiny matmuls compute; one thread is several times faster.
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


def render(output: Path, grid: int = 200, seed: int = 0, k: int = 10, base: str = "msp") -> Path:
    """Draw the three score maps side by side into one PNG at `output`; returns its path."""
    scores = scores_on_grid(grid, seed, k, base)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    for axis, (name, title, _) in zip(axes, panels(base)):
        # Each score has its own units: each panel maps its 5th..95th percentiles onto [0, 1].
        low, high = np.percentile(scores[name], [5, 95])
        normalised = np.clip((scores[name] - low) / max(float(high - low), 1e-12), 0, 1)
        filled = axis.contourf(scores["xs"], scores["ys"], normalised, levels=20, cmap="viridis")
        axis.scatter(*scores["points"].T, c=scores["labels"], cmap="coolwarm", s=6,
                     edgecolors="white", linewidths=0.3)
        axis.set_title(title)
        axis.set_aspect("equal")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(filled, ax=axes, shrink=0.85, label="score (per-panel percentiles; higher = more ID)")
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
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
