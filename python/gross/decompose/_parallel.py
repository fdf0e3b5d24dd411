"""Runs many independent BTDs, in this process or spread over CPU worker processes."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from .weight import btd


def _init_worker(threads):
    # Each worker gets its share of the cores; more threads per process only contend.
    torch.set_num_threads(threads)


def _run(job):
    return btd(**job)


def _cost(job):
    """Rough relative cost of a BTD job, for largest-first scheduling: the weight's size."""
    return job["weight"].numel()


def run_btds(jobs, workers=1, progress=False, desc="decompose", unit="BTD", steps=None):
    """`btd(**job)` for every job (dicts of btd's arguments), results in the jobs' order.

    With `workers` > 1 and every job on the CPU, the jobs run in that many spawned processes,
    each with 1/workers of this process's torch threads, largest weights first (so the last job
    to finish is a small one). Otherwise they run here, one after another. The progress bar
    advances by `steps[i]` (default 1) when job i finishes, in `unit`s: e.g. a layer's share.
    """
    from tqdm import tqdm

    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    steps = steps or [1] * len(jobs)
    on_cpu = all(torch.device(job.get("device") or job["weight"].device).type == "cpu" for job in jobs)
    fractional = any(step != int(step) for step in steps)
    bar = tqdm(total=round(sum(steps), 6), desc=desc, unit=unit, disable=not progress,
               bar_format="{l_bar}{bar}| {n:.2f}/{total:.0f} {unit}s [{elapsed}<{remaining}]" if fractional else None)
    if workers == 1 or len(jobs) < 2 or not on_cpu:
        results = []
        for job, step in zip(jobs, steps):
            results.append(_run(job))
            bar.update(step)
        bar.close()
        return results
    results = [None] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda i: -_cost(jobs[i]))
    threads = max(1, torch.get_num_threads() // workers)
    # spawn, not fork: a forked child would inherit this process's OpenMP and MKL thread pools.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run, jobs[i]): i for i in order}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(steps[futures[future]])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            bar.close()
    return results
