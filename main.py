"""Command line: parse the flags, resolve the experiment config, run the pipeline, print the table.

With no --config and no --model it runs the offline demo (configs/experiments/demo.yaml), on data that
scikit-learn ships, with any other flags applied on top.

    python main.py --model resnet50-supcon --train-data imagenet1k --id-data imagenet1k \
        --ood-data inaturalist sun places textures openimage-o --detectors energy nnguide knn \
        --data-root ~/datasets --output-dir logs/run1

The official repository's flag names (--model_name/-m, --ood_detectors, -bs, ...) are accepted as aliases.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from errors import UserError
from pipeline.config import resolve_experiment
from pipeline.distributed import shutdown
from pipeline.experiment import run_experiment
from pipeline.sweep import run_sweep, split_sweep


DEMO_EXPERIMENT = Path(__file__).resolve().parent / "configs" / "experiments" / "demo.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="NNGuide and baselines: OOD detection on cached features.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--config", type=Path, help="experiment YAML (configs/experiments/*.yaml); flags below override it")
    add("--model", "--model_name", "-m", dest="model", help="configs/models/<name>.yaml")
    add("--train-data", "--train_data_name", "-td", dest="train_data", help="dataset the bank is drawn from")
    add("--id-data", "--id_data_name", "-id", dest="id_data", help="in-distribution test dataset")
    add("--ood-data", "--ood_data_name", "-ood", dest="ood_data", nargs="+", help="OOD test datasets")
    add("--detectors", "--ood_detectors", dest="detectors", nargs="+", help="configs/detectors/<name>.yaml")
    add("--data-root", "--data_root_path", dest="data_root", help="folder with the datasets (default ~/datasets)")
    add("--output-dir", dest="output_dir", help="where results.csv, results.md and config.yaml go")
    add("--cache-dir", dest="cache_dir", help="feature cache (default saved_model_outputs)")
    add("--pretrained-dir", dest="pretrained_dir", help="checkpoints (default pretrained_models)")
    add("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    add("--gpu_idx", "-g", dest="gpu_idx", type=int, help="official alias: --gpu_idx 1 means --device cuda:1")
    add("--batch-size", "--batch_size", "-bs", dest="batch_size", type=int)
    add("--num-workers", "--num_workers", "-nw", dest="num_workers", type=int)
    add("--seed", type=int, help="draws the bank")
    add("--bank-ratio", dest="bank_ratio", type=float, help="fraction of the train split in the bank (0.01)")
    add("--amp", choices=["off", "bf16"], help="bf16 autocast for extraction (changes the last digits)")
    add("--channels-last", dest="channels_last", action="store_true", default=None)
    add("--download", action="store_true", default=None, help="let torchvision download CIFAR/SVHN")
    add("--plots", action=argparse.BooleanOptionalAction, default=None,
        help="write score histograms and ROC curves next to results.csv (default: on)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config value, e.g. detectors.nnguide.k=100 or bank_ratio=0.05")
    add("--recompute", action="store_true", default=None,
        help="delete and re-extract the cached features this run uses")
    add("--skip-broken-images", dest="skip_broken_images", action="store_true", default=None,
        help="skip images that cannot be decoded (listed in the log and config.yaml) instead of stopping")
    add("--gpu-decode", dest="gpu_decode", action="store_true", default=None,
        help="decode JPEGs on the GPU (nvJPEG); off by default: it changes pixels, so the last digits")
    add("--verify-image-content", dest="verify_image_content", action="store_true", default=None,
        help="hash the bytes of every image the run uses and recompute cached features whose images changed, "
             "even where size and modification time did not (reads every image)")
    add("--debug", action="store_true", help="show the full traceback of user errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.config is None and args.model is None:
        args.config = DEMO_EXPERIMENT  # no experiment named: the offline demo, with any flags applied on top
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # it announces which build it loaded
    flags = {key: value for key, value in vars(args).items()
             if key not in ("config", "overrides", "debug", "gpu_idx")}
    if args.gpu_idx is not None:
        flags["device"] = f"cuda:{args.gpu_idx}"
    try:
        if split_sweep(args.overrides):
            table, written = run_sweep(args.config, flags, args.overrides)
        else:
            config = resolve_experiment(args.config, flags, args.overrides)
            _, table = run_experiment(config)
            written = Path(config.output_dir) / "results.csv"
        shutdown()
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if table:  # under torchrun, only rank 0 has one
        print(table)
        print(f"\nresults: {written}")
    return 0


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster sends a pre-empted job before SIGKILL): the first stops the
    run as Ctrl-C does (exit 130, resumable); a second one while the first is being handled exits at once."""

    def __init__(self) -> None:
        self.main_pid = os.getpid()
        self.stopping = False

    def __call__(self, signum: int, frame: object) -> None:
        if os.getpid() != self.main_pid:  # a loader worker forked with this handler: Python's default
            raise KeyboardInterrupt
        if self.stopping:
            print("\ninterrupted again; exiting now (rerun the same command to resume)", file=sys.stderr, flush=True)
            os._exit(130)
        self.stopping = True
        # when the whole job is signalled, torch's loader workers die of the signal too: torch's SIGCHLD
        # handler would report that as a worker failure while the workers are being stopped
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise KeyboardInterrupt


if __name__ == "__main__":
    stop = StopOnSignal()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    sys.exit(main())
