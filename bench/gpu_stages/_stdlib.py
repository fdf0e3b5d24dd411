"""Standard-library helpers of bench/gpu_check.py and its stages (the parent imports nothing else):
a command that may hang run under a time limit, and a source file loaded as a module."""
import importlib.util
import os
import signal
import subprocess
import time


def run_logged(cmd, log_path, timeout_s, env=None, cwd=None):
    """Run cmd in its own process group with stdout and stderr appended to log_path (under a
    header line naming it); the whole group (a build's compilers, a sanitizer's target) is killed
    at the time limit.

    Returns (exit status, or None if it was killed at `timeout_s`; the output it wrote).
    """
    with open(log_path, "a") as log:
        log.write(f"\n===== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    with open(log_path, errors="replace") as log:
        log.seek(offset)
        return rc, log.read()


def load_source(name, path):
    """The Python file at `path` as a module named `name`, without importing its package."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
