"""Which OOD sets each table's averages cover: the paper's Avg-4 and Avg-all, and OpenOOD v1.5's Near-OOD and
Far-OOD. Imports neither torch nor scikit-learn: the tables (pipeline.tools.aggregate) and the runs share it."""
from __future__ import annotations

import dataclasses

PAPER_AVERAGE_SETS = ("inaturalist", "sun", "places", "textures")  # the paper's "Average"; OpenImage-O apart


@dataclasses.dataclass(frozen=True)
class OpenOODBenchmark:
    """One OpenOOD v1.5 benchmark's OOD sets (dataset config names), as its evaluator groups them."""

    name: str
    near: tuple[str, ...]
    far: tuple[str, ...]


OPENOOD_BENCHMARKS = (
    OpenOODBenchmark("ImageNet-1K", near=("openood-ssb-hard", "openood-ninco"),
                     far=("openood-inaturalist", "openood-textures", "openood-openimage-o")),
    OpenOODBenchmark("CIFAR-10", near=("openood-cifar10-cifar100", "openood-cifar10-tin"),
                     far=("openood-cifar10-mnist", "openood-cifar10-svhn", "openood-cifar10-texture",
                          "openood-cifar10-places365")),
    OpenOODBenchmark("CIFAR-100", near=("openood-cifar100-cifar10", "openood-cifar100-tin"),
                     far=("openood-cifar100-mnist", "openood-cifar100-svhn", "openood-cifar100-texture",
                          "openood-cifar100-places365")),
)


def paper_averages(ood_sets: list[str]) -> dict[str, tuple[str, ...]]:
    """The paper table's average columns, {label: sets}: Avg-4 (the paper's Average) when all four of its sets
    are among `ood_sets`, then Avg-all over every OOD set."""
    averages = {"Avg-all": tuple(ood_sets)}
    if all(name in ood_sets for name in PAPER_AVERAGE_SETS):
        averages = {"Avg-4": PAPER_AVERAGE_SETS, **averages}
    return averages


def run_averages(ood_sets: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(label, sets) of every average a run with these OOD sets bootstraps (averages.csv): the paper table's, and
    OpenOOD's Near-OOD and Far-OOD of each benchmark whose near (far) sets it scored all of."""
    averages = list(paper_averages(ood_sets).items())
    for benchmark in OPENOOD_BENCHMARKS:
        averages += [(label, sets) for label, sets in (("Near-OOD", benchmark.near), ("Far-OOD", benchmark.far))
                     if all(name in ood_sets for name in sets)]
    return averages
