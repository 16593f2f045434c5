"""Process-wide tuning applied once when a process has started (after the rule catalog is loaded): the API at
start-up, each worker process when Celery has forked it."""

from __future__ import annotations

import gc
import logging

from config.settings import get_settings

log = logging.getLogger("ehr_alerts.process")


def freeze_startup_heap() -> int:
    """Apply ``EHR_ALERTS_GC_YOUNG_THRESHOLD``, then move every object alive now (imported modules, FHIR
    models, the rule catalog) to the interpreter's permanent generation, so later full garbage collections
    skip them (``EHR_ALERTS_GC_FREEZE_AT_START``).

    Measured on the dev machine: a full collection of the started API took 44-70 ms, a pause every
    in-flight CDS call waits for; after the freeze it scans only what requests leave behind. In the workers,
    full collections over the catalog and the fact cache took about 10 % of the CPU per event
    (bench/README.md, bench_stream.py). Returns the number of objects frozen (0 when the setting is off)."""
    settings = get_settings()
    if settings.gc_young_threshold:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(settings.gc_young_threshold, older, oldest)
    if not settings.gc_freeze_at_start:
        return 0
    gc.collect()  # free start-up garbage first, so it is not kept forever
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("start-up heap frozen for the garbage collector", extra={"objects": frozen})
    return frozen
