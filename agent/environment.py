"""Which request parameters may become environment variables of the DBA scripts.

A parameter is tenant input (OSB provision / update parameters, relayed by the manager), and
the scripts run as the agent's user: a name that a shell, the dynamic loader, libc or an
interpreter acts on (``BASH_ENV``, ``LD_PRELOAD``, ``PYTHONSTARTUP``, ...) would run the
tenant's code there, and a name the agent sets itself (``BACKUP_*``, ``AGENT_SECRETS_FILE``,
...) would change what the scripts read. Those names are refused, case-insensitively.

This is the one definition of the refused names. The manager validates provision parameters
with it too (``backup/registration.py`` imports this module: a pure module of constants and
functions, standard library only, so the domain takes on no agent machinery by it).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

# Patterns (fnmatch, compared upper-case) with why each group is refused; the reason is
# shown to whoever sent the name.
_INTERPRETED: dict[str, tuple[str, ...]] = {
    "a shell interprets it": (
        "BASH*",  # BASH_ENV, BASH_FUNC_x%%, BASHOPTS, BASH_XTRACEFD, BASH_LOADABLES_PATH...
        "ENV",
        "KSH_ENV",
        "ZDOTDIR",
        "SHELLOPTS",
        "POSIXLY_CORRECT",
        "PS1",
        "PS2",
        "PS3",
        "PS4",
        "PROMPT_COMMAND",
        "IFS",
        "CDPATH",
        "GLOBIGNORE",
        "EXECIGNORE",
        "FIGNORE",
        "HISTFILE",
        "INPUTRC",
        "MAIL",
        "MAILPATH",
        "SHELL",
        "SHLVL",
        "PWD",
        "OLDPWD",
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "TMPDIR",
        "TMP",
        "TEMP",
    ),
    # glibc's own list of variables it ignores in set-user-id programs (UNSECURE_ENVVARS),
    # and the locale, which selects files libc loads.
    "the dynamic loader or libc interprets it": (
        "LD_*",
        "DYLD_*",
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_*",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_*",
        "RES_OPTIONS",
        "TZDIR",
        "LANG",
        "LANGUAGE",
        "LC_*",
    ),
    "an interpreter or a tool the scripts call interprets it": (
        "PYTHON*",
        "PERL*",
        "RUBY*",
        "GEM_*",
        "NODE_*",
        "NPM_CONFIG_*",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "LUA_*",
        "TCL*",
        "GIT_*",
        "PAGER",
        "MANPAGER",
        "EDITOR",
        "VISUAL",
        "BROWSER",
        "LESS*",
        "*_ASKPASS",
        "SSH_*",
        "PSQLRC",  # psql runs it (and it may run shell commands with \!)
        "PSQL_*",  # PSQL_PAGER, PSQL_EDITOR: commands
        "LIBMYSQL_*",  # LIBMYSQL_PLUGINS / _PLUGIN_DIR load shared objects
        "MARIADB_PLUGIN_DIR",
        "MYSQL_PLUGIN_DIR",
        "MYSQL_HISTFILE",
        "REDISCLI_HISTFILE",
        "REDISCLI_RCFILE",
    ),
    "it redirects the scripts' network or TLS trust": (
        "*_PROXY",  # http_proxy, HTTPS_PROXY, ALL_PROXY, NO_PROXY
        "OPENSSL_*",  # OPENSSL_CONF can load engines (shared objects)
        "SSL_CERT_*",
        "SSLKEYLOGFILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "KRB5*",  # KRB5_CONFIG can load plugins
        "GNUTLS_*",
    ),
    "the agent sets it itself": (
        "BACKUP_*",
        "RESTORE_*",
        "AGENT_*",
        "S3_*",
        "SWIFT_*",
        "CLIENT_*",
        "JOB_ID",
        "COMPRESSION",
        "ENCRYPTION_KEY",
        # the agent's settings (agent/config.py), which configure it through its environment
        "DIRECTORY_BACKUP",
        "DIRECTORY_RESTORE",
        "SCRIPTS_PATH",
        "ALLOWED_TO_DELETE_FILES",
        "SKIP_STORAGE",
        "DEFAULT_S3_ENDPOINT",
        "MAX_JOB_NUMBER",
        "STATE_DIRECTORY",
        "STAGE_TIMEOUT_SECONDS",
        "LOG_LIMIT_BYTES",
        "JOB_RETENTION_SECONDS",
        "TLS_*",
        "SECRETS_VIA",
        "POSITIONAL_SECRETS",
        "ALLOWED_PARAMETERS",
        "SCRIPT_ENV_*",
        "HTTP_*",
        "AUTH_FAILURE_*",
    ),
}

FROM_MANAGER = frozenset({"BACKUP_PORT"})
"""Names the manager itself adds to a request (the instance's ``database.port``): our agent
accepts them, the manager refuses them from a tenant."""


def refusal(name: str, *, allow: Iterable[str] = ()) -> str | None:
    """Why ``name`` may not be a script parameter, or ``None`` if it may. ``allow`` lists
    exact names (any case) to accept although they are in the agent's own family (the agent
    passes :data:`FROM_MANAGER`)."""
    if not ENV_NAME.match(name):
        return "it is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 128)"
    upper = name.upper()
    if upper in {a.upper() for a in allow}:
        return None
    for reason, patterns in _INTERPRETED.items():
        if any(fnmatch.fnmatchcase(upper, p) for p in patterns):
            return reason
    return None


def refused_patterns() -> list[str]:
    """Every refused pattern (for documentation and tests)."""
    return [p for patterns in _INTERPRETED.values() for p in patterns]


def parse_patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """A comma-separated list of names or fnmatch patterns, upper-cased; empty items
    dropped."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(i.strip().upper() for i in items if i.strip())


def allowed(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` matches one of the (upper-cased) ``patterns``, case-insensitively."""
    upper = name.upper()
    return any(fnmatch.fnmatchcase(upper, p) for p in patterns)


def describe(name: str, reason: str) -> str:
    """The message for a refused parameter; the name is cut short, the value never shown."""
    shown = name if len(name) <= 64 else name[:64] + "..."
    return f"parameter {shown!r} is refused: {reason}"
