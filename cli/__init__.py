"""`osb-backup`: the command-line tool of the backup manager's /v1 API."""
