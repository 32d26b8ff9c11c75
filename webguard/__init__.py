"""HTTP hardening shared by the manager (``broker``) and the agent (``agent``).

- :mod:`webguard.server`: the aiohttp protocol guarded against slow and oversized requests (a
  deadline for the headers and for the body, a cap on open connections, JSON answers without
  echo for requests the HTTP parser refuses) and ``run``, which serves an app with it.
- :mod:`webguard.throttle`: counting failed logins per user and per client address.
- :mod:`webguard.middleware`: JSON-only bodies for changes, CORS for configured origins.
- :mod:`webguard.body`: reading a JSON body, with one typed :class:`~webguard.body.BodyError`
  that each service renders in its own error format.

It depends on aiohttp only, so that both services can use it.
"""
