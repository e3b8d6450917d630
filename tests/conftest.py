"""Shared fixtures: the script imported as a module, and the built-in tiny SD3 built once per session."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (the README's `-n 2`) each worker's torch takes one thread: two workers' OpenMP threads on two
# cores spin-wait on each other (tried: the grid test's experiment stalled for minutes). Set before torch is imported.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from distill_module import SCRIPT, MainProcess, load_distill, run_main_process  # noqa: E402,F401  (shared with the benchmark and experiment)


@pytest.fixture(scope="session")
def distill():
    return load_distill()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory, distill):
    """An OUTPUT_ROOT whose cache already holds the tiny model (built through the script's own path)."""
    root = tmp_path_factory.mktemp("tiny_root")
    distill.resolve_model_path(distill.TINY_MODEL_ID, str(root))
    return root


@pytest.fixture(scope="session")
def tiny_path(tiny_root, distill):
    return distill.resolve_model_path(distill.TINY_MODEL_ID, str(tiny_root))


def run_script(*args, env=None, timeout=300):
    """Run the script as a user does: a fresh python process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # Ctrl-C reaches the script as it does in a terminal, also where the tests themselves run with SIGINT ignored
    # (started with & from a script): Python raises KeyboardInterrupt only if SIGINT was not ignored when it started.
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run_process(*args, env=None, timeout=300):
    """main() in a process of its own that skips the interpreter's start and the imports (MainProcess), for runs a
    test kills with SIGKILL; answered as run_script answers."""
    return run_main_process(list(args), env, timeout)


def tiny_args(root, *extra):
    return ["--preset", "tiny", f"--OUTPUT_ROOT={root}", f"--PROMPTS_JSONL={root}/prompts.jsonl", *extra]


def run_main(distill, *args, env=None):
    """The script's main() in this process, as run_script runs it in a new one but without the interpreter's start
    (most of a tiny run's time), answered as run_script answers: returncode, stdout, stderr. Ctrl-C and SIGTERM sent by
    the script's fault points reach it as they would a process of its own; the signal handlers and the environment
    are restored after. (SIGKILL needs run_process; several processes and settings read at import, run_script.)"""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    saved_env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update(env or {})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = distill.main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
