"""FPR95 / AUROC of the ways nnguide can combine its guidance with ViM, side by side on synthetic outputs.

ViM scores are negative for much of a bank, so "ViM in both places" (confidence="raw") flips bank features.
This compares that with the default (bank_min_shift: ViM minus the bank's minimum ViM, the bank confidence in
the official repository's early commits) and the other readings (see docs/differences.md, "NNGuide-ViM"), next
to energy, ViM, KNN and plain NNGuide.

Synthetic outputs, seeded: class means in a `rank`-dimensional class subspace, a nuisance subspace of the
same rank that the head ignores, small isotropic noise elsewhere; logits from a linear head aligned with the
class means plus random weights; features L2-normalised after the logits are taken. OOD sets:
  near           means mixed from two ID classes (0.6 / 0.4): lower confidence, close to the data;
  far-principal  ID means under a 2.5x larger nuisance: as confident as ID but far in angle, no extra
                 residual (the classifier and ViM do not see it, the nearest neighbours do);
  far-residual   ID means 1.1x stronger plus about 3x more isotropic noise: over-confident, large ViM residual.
Default shapes: bank 5,000 x 512, 200 classes, ViM principal_dim 128, 2,000 ID and 1,000 per OOD set.
--imagenet: the paper's shapes, bank 12,811 x 2048, 1000 classes, principal_dim 500, 5,000 ID and 2,000 per
OOD set. Run times: docs/benchmarks.md.
Usage: python benchmarks/nnguide_vim_variants.py [--imagenet] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.nn.functional import normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ood_detectors import create_detector  # noqa: E402
from ood_evaluation.metrics import ood_metrics  # noqa: E402

# table name -> (detector, hyper-parameters); rows with base "vim" also get the shapes' principal_dim
VARIANTS = {
    "energy": ("energy", {}),
    "vim": ("vim", {}),
    "knn": ("knn", {}),
    "nnguide (energy, the paper)": ("nnguide", {}),
    "nnguide-vim raw (the paper's formula as written)": ("nnguide", {"base": "vim", "confidence": "raw"}),
    "nnguide-vim raw, energy bank": ("nnguide", {"base": "vim", "confidence": "raw", "bank_confidence": "energy"}),
    "nnguide-vim softplus, energy bank": ("nnguide", {"base": "vim", "confidence": "softplus",
                                                       "bank_confidence": "energy"}),
    "nnguide-vim bank_min_shift (the default)": ("nnguide", {"base": "vim", "confidence": "bank_min_shift"}),
    "nnguide-vim softplus": ("nnguide", {"base": "vim", "confidence": "softplus"}),
    "nnguide-vim shift (bank_min_shift floored at 0)": ("nnguide", {"base": "vim", "confidence": "shift"}),
    "nnguide-vim exp": ("nnguide", {"base": "vim", "confidence": "exp"}),
}


@dataclasses.dataclass(frozen=True)
class Shapes:
    bank: int = 5000
    dim: int = 512
    classes: int = 200
    rank: int = 64            # of the class subspace and of the nuisance subspace
    principal_dim: int = 128  # ViM's: both subspaces
    id_queries: int = 2000
    ood_queries: int = 1000   # per OOD set


IMAGENET = Shapes(bank=12811, dim=2048, classes=1000, rank=250, principal_dim=500, id_queries=5000,
                  ood_queries=2000)


def synthetic_sets(shapes: Shapes, seed: int) -> tuple[dict, dict, dict[str, dict]]:
    """(bank, ID queries, {OOD set name: queries}), each {"feas", "logits", "labels"}; see the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    dim, rank = shapes.dim, shapes.rank
    basis, _ = torch.linalg.qr(torch.randn(dim, 2 * rank, generator=generator))
    class_basis, nuisance_basis = basis[:, :rank], basis[:, rank:]                          # (D, rank) each
    means = normalize(torch.randn(shapes.classes, rank, generator=generator), dim=1) @ class_basis.T  # (C, D)
    head = 8.0 * means.T + 0.5 * torch.randn(dim, shapes.classes, generator=generator) / dim ** 0.5  # (D, C)

    def draw(centres: torch.Tensor, n: int, strength: float = 1.0, nuisance: float = 0.6,
             isotropic: float = 0.3) -> dict[str, torch.Tensor]:
        labels = torch.randint(0, centres.shape[0], (n,), generator=generator)
        scale = strength * (0.7 + 0.6 * torch.rand(n, 1, generator=generator))
        raw = (scale * centres[labels]
               + 0.5 * torch.randn(n, rank, generator=generator) @ class_basis.T / rank ** 0.5
               + nuisance * torch.randn(n, rank, generator=generator) @ nuisance_basis.T / rank ** 0.5
               + isotropic * torch.randn(n, dim, generator=generator) / dim ** 0.5)          # (n, D)
        return {"feas": normalize(raw, dim=1), "logits": raw @ head, "labels": labels}

    bank, id_queries = draw(means, shapes.bank), draw(means, shapes.id_queries)
    first, second = torch.randint(0, shapes.classes, (2, shapes.ood_queries), generator=generator)
    ood_sets = {"near": draw(normalize(0.6 * means[first] + 0.4 * means[second], dim=1), shapes.ood_queries),
                "far-principal": draw(means, shapes.ood_queries, nuisance=1.5),
                "far-residual": draw(means, shapes.ood_queries, strength=1.1, isotropic=1.0)}
    return bank, id_queries, ood_sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenet", action="store_true", help="the paper's shapes (about a minute on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes = IMAGENET if args.imagenet else Shapes()
    bank, id_queries, ood_sets = synthetic_sets(shapes, args.seed)
    vim = create_detector("vim", principal_dim=shapes.principal_dim).fit(bank)
    negative = {name: 100 * (vim.score_samples(outputs) < 0).float().mean().item()
                for name, outputs in {"bank": bank, "ID": id_queries}.items()}
    print(f"bank {shapes.bank} x {shapes.dim}, {shapes.classes} classes, ViM principal_dim {shapes.principal_dim}, "
          f"{shapes.id_queries} ID and {shapes.ood_queries} per OOD set, seed {args.seed}; ViM < 0 for "
          f"{negative['bank']:.0f}% of the bank and {negative['ID']:.0f}% of the ID queries")
    print("\nFPR95 / AUROC in percent (ID positive)\n")
    print(f"| variant | {' | '.join(ood_sets)} | average |")
    print(f"|---|{'---:|' * (len(ood_sets) + 1)}")
    for table_name, (detector_name, hyper_parameters) in VARIANTS.items():
        if detector_name == "vim" or hyper_parameters.get("base") == "vim":
            vim_options = {"principal_dim": shapes.principal_dim}
            hyper_parameters = {**hyper_parameters, **({"base_options": vim_options}
                                                       if detector_name == "nnguide" else vim_options)}
        detector = create_detector(detector_name, **hyper_parameters).fit(bank)
        id_scores = detector.score_samples(id_queries)
        metrics = [ood_metrics(id_scores, detector.score_samples(outputs)) for outputs in ood_sets.values()]
        cells = [f"{100 * m['fpr95']:.2f} / {100 * m['auroc']:.2f}" for m in metrics]
        average = [100 * sum(m[key] for m in metrics) / len(metrics) for key in ("fpr95", "auroc")]
        print(f"| {table_name} | {' | '.join(cells)} | {average[0]:.2f} / {average[1]:.2f} |")


if __name__ == "__main__":
    main()
