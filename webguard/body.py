"""Reading a request's JSON body, the same way for every service.

The manager's ``/v1`` API, its OSB endpoints and the agent read bodies here and differ only in
how they answer a :class:`BodyError`: each surface keeps its own error codes and statuses. The
error's sentence names what is wrong and where, never any of the body itself, so that a
secret sent in a broken body cannot come back in the answer or reach a log.
"""

from __future__ import annotations

import json
from enum import StrEnum

from aiohttp import web


class BodyProblem(StrEnum):
    """What is wrong with a request body."""

    MISSING = "missing"  # no body, or only whitespace
    NOT_JSON = "not_json"  # not JSON text (or a number too long to read)
    TOO_DEEP = "too_deep"  # nested deeper than the decoder follows
    NOT_OBJECT = "not_object"  # JSON, but not an object where one is required


class BodyError(Exception):
    """A request body that cannot be used: its :class:`BodyProblem` and a sentence saying why,
    which quotes nothing of the body."""

    def __init__(self, problem: BodyProblem, description: str) -> None:
        super().__init__(description)
        self.problem = problem
        self.description = description


def parse_json(raw: bytes) -> object:
    """``raw`` decoded as JSON (UTF-8, -16 or -32), or a :class:`BodyError`."""
    if not raw.strip():
        raise BodyError(BodyProblem.MISSING, "A JSON request body is required.")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        # The decoder's own message is a fixed phrase ("Expecting value"); its position is
        # given, the document it holds is not.
        raise BodyError(
            BodyProblem.NOT_JSON,
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}.",
        ) from None
    except UnicodeDecodeError:
        # Its message would quote a byte of the body.
        raise BodyError(
            BodyProblem.NOT_JSON, "The request body is not valid JSON: it is not Unicode text."
        ) from None
    except RecursionError:
        raise BodyError(BodyProblem.TOO_DEEP, "The request body is nested too deeply.") from None
    except ValueError:  # an integer longer than Python converts (sys.get_int_max_str_digits)
        raise BodyError(
            BodyProblem.NOT_JSON, "The request body is not valid JSON: a number is too long."
        ) from None


async def read_json(request: web.BaseRequest) -> object:
    """The request's body decoded as JSON, or a :class:`BodyError`. That the body is declared
    JSON (``Content-Type``) is checked before, by :mod:`webguard.middleware`."""
    return parse_json(await request.read())


async def read_json_object(request: web.BaseRequest) -> dict[str, object]:
    """The request's body as a JSON object, or a :class:`BodyError` (``NOT_OBJECT`` for any
    other JSON value)."""
    data = await read_json(request)
    if not isinstance(data, dict):
        raise BodyError(BodyProblem.NOT_OBJECT, "The request body must be a JSON object.")
    return data
