"""The stages of bench/gpu_check.py, in the order they run, and the interface each stage module offers.

Each stage is a module `gpu_stages.<name>` with
    TITLE               the report's section title
    run(ctx)            the work, in its own process: items recorded through `ctx` (`_context.StageContext`)
    render(data) -> str the report's markdown section from the stage's record
    summary(data) -> str one line for the report's summary table

This file holds only the table below (standard library only): the parent process reads it
without importing torch or loading the extension that the first stage may rebuild.
"""
from typing import NamedTuple

# Exit status of a stage process whose CUDA context broke (an illegal address, say): every later
# CUDA call there would fail too, so the parent starts a fresh process for the remaining items.
BROKEN_CONTEXT = 3
# The logs written beside the report (the device machine returns at most 8 files from $OUT).
LOG_FILES = {"stages": "stages.log", "build": "build.log", "sanitizer": "sanitizer.log"}


class Stage(NamedTuple):
    """A stage's module name, its share of the time budget and the least time worth starting it with."""

    name: str
    weight: float
    min_s: float


# Run order: most informative first. The numbering (2. correctness ... 6. decomposition)
# is kept in the report; the sanitizer part of 2. runs last, in whatever time remains. A stage's
# time limit is its weight's share of the time left when it starts, so the time an early stage
# leaves unused goes to the later ones.
STAGES = (
    Stage("build", 1.2, 5.0),
    Stage("correctness", 0.22, 8.0),
    Stage("kernel_bench", 0.26, 10.0),
    Stage("dispatch", 0.08, 8.0),
    Stage("throughput", 0.22, 10.0),
    Stage("decomposition", 0.10, 8.0),
    Stage("sanitizer", 0.12, 10.0),
)
