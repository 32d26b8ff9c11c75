# Sourced by every stage script of this set, so that the same scripts run unchanged under
# our agent and under the Go osb-backup-agent (docs/agent-protocol.md, "The scripts"):
# positional arguments first, then what our agent adds to the environment; nothing is taken
# from an inherited environment (the Go agent hands a script only the request's parameters
# when there are any: no PATH, no HOME, no directories).

# A fixed PATH, never the caller's (bash would otherwise use its built-in one, with '.').
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
if [ -n "${AGENT_SECRETS_FILE:-}" ]; then . "$AGENT_SECRETS_FILE"; fi

# The agent's directories: ours exports them (and BACKUP_DIRECTORY / RESTORE_FILE); the Go
# agent does not when the request has parameters. Then `agent.conf` beside the scripts, if
# the operator wrote one (directory_backup=..., directory_restore=..., PATH=...), else the
# BOSH defaults both agents use.
set_directories() {
    _backup=${directory_backup:-}
    _restore=${directory_restore:-}
    if [ -r "$here/agent.conf" ]; then . "$here/agent.conf"; fi
    directory_backup=${_backup:-${directory_backup:-/var/vcap/store/backup-agent/backup}}
    directory_restore=${_restore:-${directory_restore:-/var/vcap/store/backup-agent/restore}}
}

# A job id names a directory: one plain path component (the Go agent does not check it).
job_directory() { # base job_id
    case "$2" in
    "" | . | .. | */* | -*) echo "unusable job id" >&2; exit 2 ;;
    esac
    printf '%s/%s' "$1" "$2"
}

# backup / restore: host username password database filename job_id compression key.
# Our agent passes '-' in place of the password and the key and exports them instead
# (BACKUP_PASSWORD, ENCRYPTION_KEY); the Go agent passes them here. "none": no key.
db_arguments() {
    if [ "$#" -lt 8 ]; then echo "expected 8 arguments, got $#" >&2; exit 2; fi
    db_host=$1 db_user=$2 db_password=$3 db_name=$4 file_name=$5 job_id=$6
    compression=$7 encryption_key=$8
    if [ "$db_password" = - ] && [ -n "${BACKUP_PASSWORD+set}" ]; then
        db_password=$BACKUP_PASSWORD
    fi
    if [ "$encryption_key" = - ]; then encryption_key=${ENCRYPTION_KEY:-}; fi
    if [ "$encryption_key" = none ]; then encryption_key=""; fi
    db_port=${BACKUP_PORT:-$default_port}
    if [ -n "$encryption_key" ]; then
        echo "these scripts do not encrypt: let our agent encrypt (transform.encryption)," \
            "or use a plan without encryption" >&2
        exit 2
    fi
}

# The backup file's directory: ours made it; the Go agent did not (nor does it remove it).
backup_directory() {
    if [ -n "${BACKUP_DIRECTORY:-}" ]; then
        printf '%s' "$BACKUP_DIRECTORY"
        return
    fi
    set_directories
    job_directory "$directory_backup" "$job_id"
}

# The downloaded file: ours names it (RESTORE_FILE); the Go agent puts it under the name
# it was stored as in <directory_restore>/<job_id>/.
restore_file() {
    if [ -n "${RESTORE_FILE:-}" ]; then
        printf '%s' "$RESTORE_FILE"
        return
    fi
    case "$file_name" in "" | . | .. | */*) echo "unusable file name" >&2; exit 2 ;; esac
    set_directories
    printf '%s/%s' "$(job_directory "$directory_restore" "$job_id")" "$file_name"
}

# The backup file's name without extension: the suggested YYYY_MM_DD_HH_MM_<host>_<database>,
# reduced to [A-Za-z0-9._-] (the Go agent does not reduce host and database names).
backup_file_name() {
    case "$file_name" in "" | . | ..) echo "unusable file name" >&2; exit 2 ;; esac
    printf '%s' "$file_name" | tr -c 'A-Za-z0-9._-' _
}
