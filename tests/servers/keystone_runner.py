"""The test Keystone's process: run by ``tests/servers/keystone.py`` with the interpreter of
``.venv-keystone`` (OpenStack Keystone brings its own pins of SQLAlchemy, Flask and oslo.*, so it
does not share the project's venv).

On its first start it does what ``keystone-manage db_sync``, ``fernet_setup``,
``credential_setup`` and ``bootstrap`` do, in this one process (each command alone spends about
two seconds importing Keystone), then serves Keystone's public WSGI application on loopback with
a threaded server (Swift's ``authtoken`` and the stores under test call it concurrently).

Usage: ``python -P keystone_runner.py CONF_DIR`` (reads ``CONF_DIR/runner.json``: the port, the
configuration file, and for the first start the bootstrap password and public URL).
"""

from __future__ import annotations

import getpass
import grp
import json
import os
import signal
import sys
import warnings

warnings.filterwarnings("ignore")  # eventlet's and oslo's deprecation notices, at import


def _setup(config_file: str, bootstrap: dict[str, str]) -> None:
    """The ``keystone-manage`` steps of a new deployment, each as the CLI runs it."""
    from keystone.cmd import cli
    from keystone.common import provider_api
    from keystone.conf import CONF

    owner = ["--keystone-user", getpass.getuser()]
    owner += ["--keystone-group", grp.getgrgid(os.getgid()).gr_name]
    steps = [
        ["db_sync"],
        ["fernet_setup", *owner],  # token and receipt key repositories
        ["credential_setup", *owner],
        [
            "bootstrap",
            "--bootstrap-password",
            bootstrap["password"],
            "--bootstrap-public-url",
            bootstrap["public_url"],
            "--bootstrap-region-id",
            bootstrap["region"],
        ],
    ]
    for step in steps:
        cli.main(argv=["keystone-manage", "--config-file", config_file, *step])
        # The CLI parses the configuration and registers its managers once per process:
        # forget both for the next step, and for the server.
        CONF.reset()
        CONF.unregister_opt(cli.command_opt)
        provider_api.ProviderAPIs._clear_registry_instances()


def main(conf_dir: str) -> None:
    with open(os.path.join(conf_dir, "runner.json")) as f:
        cfg = json.load(f)
    config_file: str = cfg["config_file"]
    if cfg.get("bootstrap") and not os.path.exists(cfg["bootstrap"]["done"]):
        _setup(config_file, cfg["bootstrap"])
        with open(cfg["bootstrap"]["done"], "w") as f:
            f.write("done\n")

    # The WSGI application reads its configuration from here, and parses sys.argv.
    os.environ["OS_KEYSTONE_CONFIG_FILES"] = config_file
    sys.argv = sys.argv[:1]
    from keystone.server import wsgi
    from werkzeug.serving import make_server

    app = wsgi.initialize_public_application()
    server = make_server("127.0.0.1", int(cfg["port"]), app, threaded=True)

    def stop(*_: object) -> None:
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("keystone ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1])
