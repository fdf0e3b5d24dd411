"""One way to run a command that may hang: its own process group, output appended to a log, the whole
group killed at the time limit (a build's compilers, a sanitizer's target). Standard library only."""
import os
import signal
import subprocess
import time


def run_logged(cmd, log_path, timeout_s, env=None, cwd=None):
    """Run cmd with stdout and stderr appended to log_path, under a header line naming it.

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
