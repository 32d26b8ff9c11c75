"""The scheduler: turns due plans into jobs, exactly one job per fire, safely across replicas.

``broker.background`` starts one per replica::

    scheduler = Scheduler(store, load_scheduler_settings(), replica_id=replica_id)
    await scheduler.start()   # the loop runs until stop()
    ...
    await scheduler.stop()

See ``scheduler.loop`` and docs/scheduling.md.
"""

from scheduler.loop import Scheduler, SchedulerObserver, SchedulerStats, fire_job_id
from scheduler.settings import SchedulerSettings, load_scheduler_settings

__all__ = [
    "Scheduler",
    "SchedulerObserver",
    "SchedulerSettings",
    "SchedulerStats",
    "fire_job_id",
    "load_scheduler_settings",
]
