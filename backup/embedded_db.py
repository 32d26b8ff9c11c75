"""The embedded MongoDB-wire-compatible server (SecantusDB) run as a child process.

Used when no ``MONGODB_URL`` is configured, so that one command runs everything on a fresh
machine, and by the test suite. Production points ``MONGODB_URL`` at a real replica set.

On a data directory the server accepts only its owner: it runs with ``--auth`` (SCRAM-SHA-256)
and has one user, ``manager``, whose password is generated on first start into
``<state_dir>/database-password`` (mode 0600). SecantusDB offers no Unix socket, and its own
way to create the first user is to start it once without authentication; instead the user is
written into the stopped database's files directly (:func:`provision_user`), so the server
is never reachable without authentication, not even on first start or when a data directory
of an earlier version (no user) is first started again. The server never sees the password
(only the SCRAM keys derived from it), and nothing about it is put on a command line: the
server reads its settings from a file. The directories are 0700 and the files 0600.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

USER = "manager"
PASSWORD_FILE = "database-password"
CONFIG_FILE = "database.toml"
_MECHANISM = "SCRAM-SHA-256"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class EmbeddedDatabaseError(RuntimeError):
    """The embedded database could not be started; the message says why and what to do, in
    one line."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_command() -> list[str]:
    exe = shutil.which("secantusd-py", path=str(Path(sys.executable).parent)) or shutil.which(
        "secantusd-py"
    )
    if exe is None:
        raise RuntimeError("secantusd-py not found: install the SecantusDB package")
    return [exe]


def _private_dir(path: Path) -> None:
    """``path`` created if missing, and readable by its owner only (also when it existed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _restrict_tree(root: Path) -> None:
    """Take group and other permissions off everything under ``root``: data directories
    written by earlier versions (before the server ran with umask 077) are 0644."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                path.chmod(stat.S_IMODE(mode) & 0o700)


def _read_or_create_password(path: Path) -> str:
    if path.exists():
        path.chmod(0o600)
        value = path.read_text().strip()
        if value:
            return value
        path.unlink()
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def provision_user(storage_path: Path, user: str, password: str) -> bool:
    """Make ``user`` (role ``root``) with ``password`` exist in the stopped database at
    ``storage_path``, writing its record into the data files directly. Whether it had to be
    written (missing, or another password).

    This uses SecantusDB's storage layer (``Storage.add_user``) and the record that its
    ``createUser`` command writes, because the server offers no other way to create a user
    that does not leave it open without authentication for a moment. The version is pinned
    in pyproject.toml, and the tests start a manager on it, so a change shows at once."""
    from secantus.auth import StoredCredentials, derive_credentials
    from secantus.storage import Storage

    old_umask = os.umask(0o077)  # the database files it creates on first start: 0600
    try:
        db = Storage(
            str(storage_path),
            durable=True,
            enable_oplog=False,
            ttl_sweep_seconds=0,
            cache_size="32M",
        )
    except Exception as exc:  # WiredTiger's errors have no common class
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
        raise EmbeddedDatabaseError(
            f"the database files in {storage_path} cannot be opened ({type(exc).__name__}: "
            f"{reason}); if another process uses them, stop it, else restore the directory "
            "from a copy"
        ) from None
    finally:
        os.umask(old_umask)
    try:
        record = db.get_user("admin", user)
        if record is not None and _MECHANISM in (record.get("credentials") or {}):
            stored = StoredCredentials.from_doc(record["credentials"], mechanism=_MECHANISM)
            again = derive_credentials(
                password,
                iterations=stored.iteration_count,
                salt=stored.salt,
                mechanism=_MECHANISM,
                username=user,
            )
            if secrets.compare_digest(again.stored_key, stored.stored_key) and any(
                r.get("role") == "root" for r in record.get("roles") or []
            ):
                return False
        credentials = derive_credentials(password, mechanism=_MECHANISM, username=user)
        db.add_user(
            "admin",
            user,
            {
                "_id": f"admin.{user}",
                "user": user,
                "db": "admin",
                "credentials": credentials.to_doc(),
                "roles": [{"role": "root", "db": "admin"}],
                "mechanisms": [_MECHANISM],
            },
            replace=True,
        )
        return True
    finally:
        db.close()


def _storage_path(data_dir: Path) -> Path:
    """Where the data files are. Earlier versions ran the server in ``data_dir`` with the same
    relative path, so with the default ``DATA_DIR`` (``data``) they wrote to
    ``data/db/data/db``: that is kept where it is, rather than starting on an empty one."""
    if not data_dir.is_absolute():
        legacy = data_dir / data_dir
        if (legacy / "WiredTiger").exists() and not (data_dir / "WiredTiger").exists():
            return legacy.resolve()
    return data_dir.resolve()


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel kill the child when the thread that starts it (the
    main thread: ``start`` only asks from there) dies, ``kill -9`` included, so that the
    database never outlives the manager and keeps its data directory locked. SIGKILL, not
    SIGTERM: the server's own SIGTERM handler was seen to hang in its shutdown, left serving
    forever with nobody to stop it; every acknowledged commit is already on disk
    (``sync_on_commit``), so the next start only recovers from the journal. A clean stop
    still sends SIGTERM itself (:meth:`EmbeddedMongo.stop`). Linux only; elsewhere the next
    start finds and stops a database left running."""
    if not sys.platform.startswith("linux") or (
        threading.current_thread() is not threading.main_thread()
    ):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _proc_args(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _parent_and_state(pid: int) -> tuple[int, str]:
    stat_line = Path(f"/proc/{pid}/stat").read_text()
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    try:
        return _parent_and_state(pid)[1] not in ("Z", "X")
    except (OSError, IndexError, ValueError):
        return False


def _servers_on(storage: Path, config: Path) -> list[int]:
    """Pids of SecantusDB servers running on ``storage`` (started with our configuration file,
    or by earlier versions with ``--storage-path``). Read from ``/proc``; elsewhere none."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    targets = {os.path.realpath(storage), os.path.realpath(config)}
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = _proc_args(int(entry.name))
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if not any(Path(a).name.startswith("secantusd") for a in args[:2]):
            continue
        for flag in ("--config", "--storage-path"):
            if flag in args[:-1]:
                value = args[args.index(flag) + 1]
                if os.path.realpath(os.path.join(cwd, value)) in targets:
                    found.append(int(entry.name))
                    break
    return found


def _a_manager(pid: int) -> bool:
    """Whether ``pid`` is a running manager (``python -m broker``, ``osb-backup-manager``)."""
    try:
        args = _proc_args(pid)
    except OSError:
        return False
    return "osb-backup-manager" in " ".join(args) or any(
        a == "broker" and args[i - 1] == "-m" for i, a in enumerate(args) if i
    )


def _stop_left_running(storage: Path, config: Path, grace: float = 15.0) -> list[int]:
    """Stop the servers a manager that died left running on ``storage`` (SIGTERM, then
    SIGKILL after ``grace`` seconds), so that the data files can be opened again. One whose
    parent is a manager still running is that manager's: refused, not stopped."""
    leftovers = _servers_on(storage, config)
    for pid in leftovers:
        try:
            parent, _ = _parent_and_state(pid)
        except (OSError, IndexError, ValueError):
            continue
        if parent != os.getpid() and _a_manager(parent):
            raise EmbeddedDatabaseError(
                f"the database in {storage} is in use by another running manager "
                f"(pid {parent}): stop it first, or give this one a data directory of its own"
            )
    for pid in leftovers:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _alive(pid):
                break
        if _alive(pid):
            raise EmbeddedDatabaseError(
                f"a database left running on {storage} (pid {pid}) does not stop: "
                "stop it by hand, then start again"
            )
    return leftovers


class EmbeddedMongo:
    """A SecantusDB server on loopback with its data in ``data_dir`` (``None``: in memory,
    without authentication: for benchmarks only).

    ``state_dir`` holds the generated password and the server's configuration file; it
    defaults to ``data_dir``. The manager keeps them in ``DATA_DIR`` (its data in
    ``DATA_DIR/db``)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        port: int | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.state_dir = Path(state_dir) if state_dir is not None else self.data_dir
        self.port = port or _free_port()
        self.password: str | None = None
        self.storage_path: Path | None = None
        # Pids of databases a previous manager left running here, stopped by start().
        self.stopped_leftovers: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The connection string, with the credential when the server requires one: keep it
        out of logs."""
        base = f"127.0.0.1:{self.port}/?directConnection=true"
        if self.password is None:
            return f"mongodb://{base}"
        return (
            f"mongodb://{USER}:{quote(self.password, safe='')}@{base}"
            f"&authSource=admin&authMechanism={_MECHANISM}"
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _configure(self) -> list[str]:
        """Directories, password, user and configuration file; the server's command line."""
        if self.data_dir is None:
            return [
                *_server_command(),
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--storage-path", ":memory:",
                "--log-level", "WARNING",
            ]  # fmt: skip
        assert self.state_dir is not None
        _private_dir(self.state_dir)
        _private_dir(self.data_dir)
        _restrict_tree(self.data_dir)
        self.storage_path = storage = _storage_path(self.data_dir)
        config = (self.state_dir / CONFIG_FILE).resolve()
        self.stopped_leftovers = _stop_left_running(storage, config)
        self.password = _read_or_create_password(self.state_dir / PASSWORD_FILE)
        provision_user(storage, USER, self.password)
        # All settings in a file of ours: an explicit --config also turns off the server's
        # search for ./secantusd.toml, ~/.secantus/ and /etc/secantus/, whose settings could
        # otherwise weaken these.
        text = (
            "[server]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f"storage_path = {json.dumps(str(storage))}\n"
            'log_level = "WARNING"\n'
            "auth = true\n"
            # Every commit's log synced before it is acknowledged, not only the writes that
            # ask for j:true (the service's do): a power loss loses no acknowledged write. On
            # the service's writes it costs nothing measurable (benchmarks/embedded_durability.py).
            "[storage]\n"
            "sync_on_commit = true\n"
        )
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        config.chmod(0o600)
        return [*_server_command(), "--config", str(config)]

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it answers (authenticated, so it is ours), or
        :class:`EmbeddedDatabaseError`."""
        if self._proc is not None and self._proc.poll() is None:
            return
        try:
            cmd = self._configure()
        except OSError as exc:
            raise EmbeddedDatabaseError(
                f"cannot prepare the database directory {exc.filename or self.data_dir} "
                f"({exc.strerror or type(exc).__name__}): check that it is a directory this "
                "user owns and can write"
            ) from None
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE if os.environ.get("EMBEDDED_DB_QUIET") else None,
                cwd=str(self.data_dir) if self.data_dir else None,
                umask=0o077,  # data files readable by their owner only
                start_new_session=True,  # a Ctrl-C to us is handled by us, then we stop it
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            raise EmbeddedDatabaseError(
                f"cannot run the database server {cmd[0]} ({exc.strerror}): install the "
                "service again (make install)"
            ) from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code, self._proc = self._proc.returncode, None
                raise EmbeddedDatabaseError(
                    f"the database server stopped on start (exit status {code}; its own "
                    "messages are above): see them, and check that the port is free and the "
                    "data directory intact"
                )
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedDatabaseError(
            f"the database server did not answer on 127.0.0.1:{self.port} within "
            f"{timeout:.0f} s: see its messages above, and check the machine's load"
        )

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        if self.password is None:
            return True
        import pymongo  # the manager's driver; only needed here

        client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
            self.url, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
        )
        try:
            client.admin.command("ping")
            return True
        except pymongo.errors.PyMongoError:
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> EmbeddedMongo:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
