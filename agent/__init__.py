"""The per-instance backup agent: runs DBA scripts and moves backups to and from storage."""

__version__ = "0.1.0"
