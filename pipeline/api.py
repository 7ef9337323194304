"""The pipeline as a library: resolve a config, run it, write its files (the command line calls the same three).

    from pipeline.api import resolve_experiment, run_experiment, write_result
    experiment = resolve_experiment("configs/experiments/demo.yaml", overrides=["detectors.nnguide.k=5"])
    result = run_experiment(experiment)   # an ExperimentResult; nothing written
    write_result(result, "logs/my-run")   # results.csv, results.md, averages.csv, scores.npz, plots, config.yaml
"""
from pipeline.config.experiment import ExperimentConfig, ResolvedExperiment, resolve_experiment
from pipeline.report.outputs import write_result
from pipeline.result import AverageRow, ExperimentResult, ResultRow, RunScores
from pipeline.run.experiment import run_experiment

__all__ = ["AverageRow", "ExperimentConfig", "ExperimentResult", "ResolvedExperiment", "ResultRow", "RunScores",
           "resolve_experiment", "run_experiment", "write_result"]
