"""Typed application keys: what the app holds for its handlers and its background parts.

Keys that belong to one part of the service and hold that part's own types stay beside it
(the OSB catalog in ``broker.osb``, the API's authorizer in ``broker.api``, the metrics
registry in ``broker.metrics``); every key shared across modules is declared here.
"""

from __future__ import annotations

from aiohttp import web

from backup.database import Database
from backup.restore_points import StoreOpener
from backup.retention import RetentionSweeper
from backup.runner import JobRunner, RunnerSettings
from backup.secrets import SecretBox
from broker.config import Settings
from scheduler import Scheduler, SchedulerSettings
from webguard.throttle import Throttle

SETTINGS = web.AppKey("settings", Settings)
DATABASE = web.AppKey("database", Database)
SECRETS = web.AppKey("secrets", SecretBox)
AUTH_THROTTLE = web.AppKey("auth_throttle", Throttle)
# How the service opens the object store of a destination.
STORE_OPENER: web.AppKey[StoreOpener] = web.AppKey("store_opener")
REQUEST_ID = web.RequestKey("request_id", str)

# The background parts of a replica (broker.background).
REPLICA_ID = web.AppKey("replica_id", str)
RUNNER_SETTINGS = web.AppKey("runner_settings", RunnerSettings)
SCHEDULER_SETTINGS = web.AppKey("scheduler_settings", SchedulerSettings)
# The runner's and the sweeper's own connection pool (RUNNER_DB_CONNECTIONS).
WORK_DATABASE = web.AppKey("work_database", Database)
SWEEPER = web.AppKey("retention_sweeper", RetentionSweeper)
RUNNER = web.AppKey("job_runner", JobRunner)
SCHEDULER = web.AppKey("scheduler", Scheduler)
