"""`python main.py ...` as real child processes, forked from one interpreter that has imported main's modules.

Most of a short main.py run is importing torch, torchvision and scikit-learn (about 5 CPU-seconds), and the
bad-input and reliability tests start dozens of them. `start_main` forks each from a multiprocessing fork server
that imported `main` once. Each run is still its own process, started as `python main.py` would be: main.py
runs as __main__ (its signal handlers, its `sys.exit` code), with its own arguments, working folder,
environment, session, stdout and stderr. What a forked run cannot show is a fresh interpreter's import-time
output; test_pipeline.py's user-error test runs `python main.py` itself and checks that stderr holds one line.

conftest.py starts the server when the session starts (its imports overlap collection) and stops it at the end.
The server is multiprocessing's own; only its start, stop and pid use the module's private `_forkserver`.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload(["main"])


def _run_script(script: str, args: list[str], cwd: str, env: dict[str, str], new_session: bool,
                stdout_path: str, stderr_path: str) -> None:
    """In the forked child: become `python script *args` run in `cwd` with `env`, output to the two files."""
    multiprocessing.set_start_method(None, force=True)  # the platform's default again, not the fork server
    if new_session:
        os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for stream, path in ((sys.stdout, stdout_path), (sys.stderr, stderr_path)):
        stream.flush()
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, stream.fileno())
        os.close(target)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))  # as `python script` puts the script's folder first
    runpy.run_path(script, run_name="__main__")  # its SystemExit is the process's exit code


class MainProcess:
    """One run's handle, shaped like subprocess.Popen's: pid, poll, wait, communicate (text), kill, returncode."""

    def __init__(self, args: list[str], process: multiprocessing.process.BaseProcess,
                 output_paths: tuple[str, str]) -> None:
        self.args = args
        self._process = process
        self._output_paths = output_paths
        self._output: tuple[str, str] | None = None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits for the exit, then returns (stdout, stderr) as text, as Popen(..., text=True) does."""
        self.wait(timeout)
        if self._output is None:
            self._output = tuple(Path(path).read_text() for path in self._output_paths)
            for path in self._output_paths:
                os.unlink(path)
        return self._output

    def kill(self) -> None:
        self._process.kill()


def start_fork_server() -> None:
    """Starts the fork server unless it runs; returns at once, while the server imports main in the background."""
    if multiprocessing.forkserver._forkserver._forkserver_pid is not None:
        return
    # libgomp reads OMP_NUM_THREADS when torch loads, in the server: one thread each, as the tests' runs go
    # side by side and would oversubscribe the CPUs (a run's own OMP_NUM_THREADS sets torch's thread count)
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = previous


def start_main(args: list[str], cwd: Path | str = REPO, env: Mapping[str, str] | None = None,
               new_session: bool = False, script: Path | str = REPO / "main.py") -> MainProcess:
    """Starts `python script *args` (main.py by default) in `cwd` with `env` (default: this process's), in a
    session of its own with `new_session` (as Popen's start_new_session); its output is read by communicate()."""
    start_fork_server()
    output_paths = []
    for name in ("stdout", "stderr"):
        descriptor, path = tempfile.mkstemp(prefix=f"main-{name}-")
        os.close(descriptor)
        output_paths.append(path)
    process = FORK_SERVER.Process(target=_run_script, args=(
        str(script), [str(arg) for arg in args], str(cwd), dict(os.environ if env is None else env), new_session,
        *output_paths))
    process.start()
    return MainProcess([sys.executable, str(script), *map(str, args)], process, tuple(output_paths))


def stop_fork_server(unused: bool = False) -> None:
    """Stops the fork server, if one was started, and waits for it: its runs' CPU time then counts in this
    process's (what `time python -m pytest` reports). An `unused` server is killed rather than left to finish
    its imports."""
    server = multiprocessing.forkserver._forkserver
    if unused and server._forkserver_pid is not None:
        os.kill(server._forkserver_pid, signal.SIGKILL)
    server._stop()
