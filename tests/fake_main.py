"""Stands in for `python main.py` in run.sh tests: logs its argv and writes minimal results files.

`python -m ...` calls are passed to the real interpreter, so run.sh's aggregation step really runs.
Environment: FAKE_LOG (argv log, one JSON list per line), FAKE_FAIL_MODEL (that --model exits with 3).
"""
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.report.rows import CSV_COLUMNS, OPENOOD_COLUMNS  # noqa: E402

OPENOOD_SETS = ["openood-ssb-hard", "openood-ninco", "openood-inaturalist", "openood-textures",
                "openood-openimage-o"]

arguments = sys.argv[1:]
if arguments[:1] == ["-m"]:
    os.execv(sys.executable, [sys.executable, *arguments])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(arguments) + "\n")


def value(flag: str, default: str = "") -> str:
    return arguments[arguments.index(flag) + 1] if flag in arguments else default


model = value("--model")
if model == os.environ.get("FAKE_FAIL_MODEL"):
    sys.exit(3)
output_dir = value("--output-dir")
# run.sh --openood-cifar runs two experiments per checkpoint: their rows differ by detector and checkpoint
detector = "nnguide-openood" if value("--config").endswith("-nnguide.yaml") else "nnguide"
checkpoint = value("--checkpoint")
os.makedirs(output_dir, exist_ok=True)
with open(os.path.join(output_dir, "results.csv"), "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(CSV_COLUMNS)
    writer.writerow([model, "imagenet1k", value("--id-data", "openood-imagenet-test"), "inaturalist", detector,
                     "97.5", "12.5", "1", "1", "1", "80", checkpoint])
with open(os.path.join(output_dir, "results_openood.csv"), "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(OPENOOD_COLUMNS)
    for ood in OPENOOD_SETS:
        writer.writerow([model, "imagenet1k", "openood-imagenet-test", ood, detector, "90", "30", "80", "80", "86.1",
                         checkpoint])
