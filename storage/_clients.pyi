# Types of the parts of python-swiftclient and aiobotocore that storage/ uses (see _clients.py).
# Only what the backends call is declared; optional arguments are keyword-only here because
# the backends pass them by name.

from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol, TypeVar, overload
from urllib.parse import ParseResult

import aiohttp
import requests

_T = TypeVar("_T")

Headers = dict[str, str]

# ---------------------------------------------------------------------- aiobotocore

class AIOHTTPSession:
    async def _get_session(self, proxy_url: str | None) -> aiohttp.ClientSession: ...

# ---------------------------------------------------------------------- swiftclient

logger_settings: dict[str, Any]

class ClientException(Exception):
    msg: str
    http_status: int | None
    @classmethod
    def from_response(
        cls, resp: requests.Response, msg: str | None = None, body: bytes | None = None
    ) -> ClientException: ...

class _Response(requests.Response):
    """requests' response, given an httplib face by ``HTTPConnection.getresponse``."""

    status: int
    def getheader(self, name: str, default: str | None = None) -> str | None: ...
    def read(self, amt: int | None = None) -> bytes: ...

class HTTPConnection:
    request_session: requests.Session
    requests_args: dict[str, Any]
    resp: requests.Response | None
    def request(
        self,
        method: str,
        full_path: str,
        data: bytes | str | None = None,
        headers: Headers | None = None,
    ) -> requests.Response: ...
    def getresponse(self) -> _Response: ...
    def close(self) -> None: ...

def http_connection(
    url: str,
    *,
    cacert: str | None = None,
    insecure: bool = False,
    timeout: float | tuple[float, float] | None = None,
) -> tuple[ParseResult, HTTPConnection]: ...
def put_object(
    url: str,
    token: str | None = None,
    container: str | None = None,
    name: str | None = None,
    contents: bytes | IO[bytes] | None = None,
    **kwargs: Any,
) -> str: ...

class _AuthSession(Protocol):
    """What a ``Connection(session=...)`` asks of its session (keystoneauth's ``Session``)."""

    def get_endpoint(self, **kwargs: Any) -> str | None: ...
    def get_token(self, **kwargs: Any) -> str | None: ...
    def invalidate(self, *args: Any) -> bool: ...

class ObjectBody(Iterator[bytes]):
    """A streamed object: its chunks, and ``close()`` to release the connection early."""

    def __next__(self) -> bytes: ...
    def close(self) -> None: ...

class Connection:
    http_conn: tuple[ParseResult, HTTPConnection] | None
    def __init__(
        self,
        *,
        session: _AuthSession,
        os_options: dict[str, str | None],
        retries: int,
        starting_backoff: float,
        cacert: str | None,
        insecure: bool,
        timeout: tuple[float, float],
    ) -> None: ...
    def http_connection(self, url: str | None = None) -> tuple[ParseResult, HTTPConnection]: ...
    def _retry(
        self,
        reset_func: Callable[..., None] | None,
        func: Callable[..., _T],
        *args: Any,
        **kwargs: Any,
    ) -> _T: ...
    def close(self) -> None: ...
    def get_capabilities(self) -> dict[str, Any]: ...
    def head_container(self, container: str) -> Headers: ...
    def put_container(self, container: str, *, headers: Headers | None = None) -> None: ...
    def get_container(
        self,
        container: str,
        *,
        marker: str | None = None,
        limit: int | None = None,
        prefix: str | None = None,
    ) -> tuple[Headers, list[dict[str, Any]]]: ...
    def head_object(self, container: str, obj: str) -> Headers: ...
    @overload
    def get_object(
        self,
        container: str,
        obj: str,
        *,
        resp_chunk_size: None = None,
        query_string: str | None = None,
        headers: Headers | None = None,
    ) -> tuple[Headers, bytes]: ...
    @overload
    def get_object(
        self,
        container: str,
        obj: str,
        *,
        resp_chunk_size: int,
        query_string: str | None = None,
        headers: Headers | None = None,
    ) -> tuple[Headers, ObjectBody]: ...
    def put_object(
        self,
        container: str,
        obj: str,
        contents: bytes | IO[bytes],
        *,
        content_length: int | None = None,
        etag: str | None = None,
        content_type: str | None = None,
        headers: Headers | None = None,
        query_string: str | None = None,
    ) -> str: ...
    def delete_object(
        self, container: str, obj: str, *, query_string: str | None = None
    ) -> None: ...
