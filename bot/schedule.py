"""The retrain schedule: every `training.schedule_hours`, retrain by itself when
at least `training.schedule_min_corrections` approved corrections are waiting that were
approved since the last run that finished (so a run the gate rejected, or one that failed on a
correction it names, is not repeated on the same corrections every tick; an admin's /retrain may
retry it at once)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

from bot.retrain import RetrainRefused, RetrainResult, Retrainer
from bot.store import RunStatus, RunTrigger

log = logging.getLogger(__name__)

SECONDS_PER_HOUR = 3600.0
# Runs that ended on what they were given: the schedule waits for a newly approved correction
# rather than repeat one (a crashed or cancelled run is retried).
FINISHED = (RunStatus.SUCCEEDED, RunStatus.REJECTED, RunStatus.FAILED)


async def scheduled_retrain_once(retrainer: Retrainer, min_corrections: int) -> Optional[RetrainResult]:
    """One tick: retrain if enough corrections wait; None when it did not run."""
    last = await retrainer.store.last_run()
    since = last["started_at"] if last and last["status"] in FINISHED else None
    waiting = await retrainer.store.count_untrained_approved(approved_after=since)
    if waiting < max(1, min_corrections) or retrainer.running:
        log.info("schedule: %d approved corrections waiting (need %d); not retraining", waiting, min_corrections)
        return None
    try:
        return await retrainer.retrain(trigger=RunTrigger.SCHEDULE, started_by=None)
    except RetrainRefused as exc:
        log.info("schedule: retrain refused: %s", exc)
        return None


async def run_schedule(
    retrainer: Retrainer,
    hours: float,
    min_corrections: int,
    announce: Callable[[RetrainResult], Awaitable[None]],
) -> None:
    """Loop forever (until cancelled); `announce` posts each result (e.g. to the admin channel)."""
    if hours <= 0:
        return
    while True:
        await asyncio.sleep(hours * SECONDS_PER_HOUR)
        try:
            result = await scheduled_retrain_once(retrainer, min_corrections)
            if result is not None:
                await announce(result)
        except asyncio.CancelledError:
            raise
        except Exception:  # the schedule must survive one bad tick
            log.exception("scheduled retrain failed")
