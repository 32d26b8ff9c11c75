"""The names this package takes from client libraries that ship no type information
(python-swiftclient, aiobotocore): imported here once, and typed in ``_clients.pyi`` beside
this file with the types they really have, so that the backends type-check against them."""

from aiobotocore.httpsession import AIOHTTPSession
from swiftclient.client import (
    Connection,
    HTTPConnection,
    http_connection,
    logger_settings,
    put_object,
)
from swiftclient.client import _ObjectBody as ObjectBody
from swiftclient.exceptions import ClientException

Headers = dict[str, str]
"""Request and response headers as swiftclient takes and gives them (names lower-cased)."""

__all__ = [
    "AIOHTTPSession",
    "ClientException",
    "Connection",
    "HTTPConnection",
    "Headers",
    "ObjectBody",
    "http_connection",
    "logger_settings",
    "put_object",
]
