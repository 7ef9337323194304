"""Command line: parse the flags, resolve the experiment config, run the pipeline, print the table.

`python main.py` with no arguments runs the offline demo (configs/experiments/demo.yaml) on data that
scikit-learn ships. Anything else names an experiment: a --config YAML, or a --model and its data.

    python main.py --model resnet50-supcon --train-data imagenet1k --id-data imagenet1k \
        --ood-data inaturalist sun places textures openimage-o --data-root ~/datasets

The official repository's flag names (--model_name/-m, --ood_detectors, -bs, ...) are accepted as aliases.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

# read once, when numpy loads OpenBLAS: its idle threads then sleep after 2^20 cycles instead of spinning for
# 2^28 (about 0.1 s) and taking a core from the search's top-k (docs/design.md, "The CPU search kernel")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from errors import UserError  # noqa: E402
from pipeline.config.experiment import DEFAULT_DETECTORS, ExperimentConfig, resolve_experiment  # noqa: E402
from pipeline.config.loading import available  # noqa: E402
from pipeline.features.distributed import shutdown  # noqa: E402
from pipeline.files import require_writable  # noqa: E402
from pipeline.report.outputs import check_output_dir, write_result  # noqa: E402
from pipeline.run.experiment import run_experiment  # noqa: E402
from pipeline.run.sweep import run_sweep, split_sweep  # noqa: E402


DEMO_EXPERIMENT = Path(__file__).resolve().parent / "configs" / "experiments" / "demo.yaml"
DEFAULTS = {field.name: field.default for field in dataclasses.fields(ExperimentConfig)}


def _names(kind: str) -> str:
    return ", ".join(available(kind))


def build_parser() -> argparse.ArgumentParser:
    """The flags; each one left out takes its value from --config, else ExperimentConfig's default (shown)."""
    epilog = (
        "With no arguments, `python main.py` runs the offline demo (configs/experiments/demo.yaml: digits, "
        "a small CNN trained at start-up, every detector; under a minute on a CPU). Otherwise give --config or "
        "--model: flags override the config file, --set overrides any key. A --set value with commas "
        "(--set detectors.nnguide.k=1,10,100) runs a sweep, one run per value on the cached features, with "
        "sweep.csv and sweep.md.\n\n"
        f"models (configs/models): {_names('models')}\n\n"
        f"datasets (configs/datasets): {_names('datasets')}\n\n"
        f"detectors (configs/detectors): {_names('detectors')}\n\n"
        "A YAML path works wherever a name does (--model my-model.yaml, --ood-data my-set.yaml).")
    parser = argparse.ArgumentParser(description="NNGuide and baselines: OOD detection on the cached features of "
                                                 "a pretrained classifier; prints AUROC / FPR95 tables.",
                                     epilog=epilog, formatter_class=_HelpFormatter)
    add = parser.add_argument
    add("--config", type=Path, help="experiment YAML (configs/experiments/*.yaml); flags below override it")
    add("--model", "--model_name", "-m", dest="model", help="backbone: a name listed below, or a model YAML")
    add("--train-data", "--train_data_name", "-td", dest="train_data",
        help="dataset whose train split the bank is drawn from")
    add("--id-data", "--id_data_name", "-id", dest="id_data", help="in-distribution test set (its test split)")
    add("--ood-data", "--ood_data_name", "-ood", dest="ood_data", nargs="+", help="OOD test sets, in table order")
    add("--detectors", "--ood_detectors", dest="detectors", nargs="+",
        help=f"detectors to compare (default: {' '.join(DEFAULT_DETECTORS)}, as run.sh)")
    add("--data-root", "--data_root_path", dest="data_root",
        help=f"folder holding the datasets (default: {DEFAULTS['data_root']})")
    add("--output-dir", dest="output_dir", help="where results.csv, results.md, config.yaml and the plots go; "
        "another run's results there are replaced whole (default: logs/<model>/<ID set>)")
    add("--cache-dir", dest="cache_dir", help=f"feature cache (default: {DEFAULTS['cache_dir']})")
    add("--pretrained-dir", dest="pretrained_dir", help=f"checkpoints (default: {DEFAULTS['pretrained_dir']})")
    add("--checkpoint", help="another checkpoint file of the model than its YAML names, e.g. one of OpenOOD's "
        "three runs (a path, or a name under --pretrained-dir)")
    add("--device", help="cuda, cuda:1 or cpu (default: cuda when available, else cpu)")
    add("--gpu_idx", "-g", dest="gpu_idx", type=int, help="official alias: --gpu_idx 1 means --device cuda:1")
    add("--batch-size", "--batch_size", "-bs", dest="batch_size", type=int,
        help=f"images per forward pass (default: {DEFAULTS['batch_size']})")
    add("--num-workers", "--num_workers", "-nw", dest="num_workers", type=int,
        help=f"data-loading worker processes (default: {DEFAULTS['num_workers']})")
    add("--seed", type=int, help=f"draws the bank from the train split (default: {DEFAULTS['seed']})")
    add("--bank-ratio", dest="bank_ratio", type=float,
        help=f"fraction of the train split in the bank (default: {DEFAULTS['bank_ratio']}, the paper's 1%%)")
    add("--amp", choices=["off", "bf16"], help="bf16 autocast for extraction; changes the last digits (default: off)")
    add("--channels-last", dest="channels_last", action="store_true", default=None,
        help="channels_last memory format for extraction (faster on some GPUs)")
    add("--download", action="store_true", default=None, help="let torchvision download CIFAR/SVHN when missing")
    add("--plots", action=argparse.BooleanOptionalAction, default=None,
        help="write score histograms and ROC curves next to results.csv (default: on)")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override any config value, e.g. detectors.nnguide.k=100, bank_ratio=0.05 or subsets.svhn=500 (a "
             "seeded, stratified subset of each split of that dataset, for debugging); comma-separated values run "
             "a sweep")
    add("--recompute", action="store_true", default=None,
        help="delete and re-extract the cached features this run uses")
    add("--skip-broken-images", dest="skip_broken_images", action="store_true", default=None,
        help="skip images that cannot be decoded (listed in the log and config.yaml) instead of stopping")
    add("--verify-image-content", dest="verify_image_content", action="store_true", default=None,
        help="hash the bytes of every image the run uses and recompute cached features whose images changed, "
             "even where size and modification time did not (reads every image)")
    add("--debug", action="store_true", help="show the full traceback of user errors")
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps the epilog paragraph by paragraph and never at a hyphen (names like openood-ninco stay whole), and
    names a flag's aliases before its value once ("--model, --model_name, -m MODEL")."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent,
                                         subsequent_indent=indent, break_on_hyphens=False)
                           for paragraph in text.split("\n\n"))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The parsed flags; `argv` empty means the demo, otherwise --config or --model is required."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not argv:
        args.config = DEMO_EXPERIMENT
    elif args.config is None and args.model is None:
        parser.exit(2, "error: no experiment given: add --model NAME with --train-data, --id-data and --ood-data, "
                       "or --config FILE (`python main.py` alone runs the demo; --help lists the names)\n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
            experiment = resolve_experiment(args.config, flags, args.overrides)
            written = Path(experiment.config.output_dir) / "results.csv"
            check_output_dir(experiment)
            require_writable(written.parent, "output directory (--output-dir)")
            result = run_experiment(experiment)
            table = write_result(result) if result is not None else ""  # under torchrun, rank 0 has the result
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
    if table:
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
