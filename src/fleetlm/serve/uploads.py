"""Multipart uploads (files, audio): the body counted against a limit as it arrives, the file part spooled."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message

from fleetlm.serve.errors import BadRequest, PayloadTooLarge, RequestTimeout

if TYPE_CHECKING:
    from fleetlm.serve.app import Gateway


async def read_multipart(gw: Gateway, request: Request, *, limit: int, how_to: str,
                         max_fields: int) -> FormData:
    """The multipart body as Starlette's FormData (its file part spooled to disk by Starlette, not kept in
    memory). Over `limit` bytes, declared or counted, is a 413; not multipart is a 400 saying `how_to`
    send it; a body that stalls past body_timeout_s is a 408."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(how_to)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is {declared} bytes; the limit is {limit}", param="file")
    received = 0

    async def counted_receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes", param="file")
        return message

    counted = Request(request.scope, receive=counted_receive)
    try:
        return await asyncio.wait_for(counted.form(max_files=1, max_fields=max_fields),
                                      timeout=gw.config.body_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeout(f"the upload did not arrive within {gw.config.body_timeout_s:g} s") from None
    except StarletteHTTPException as exc:  # the multipart parser's own complaints
        raise BadRequest(f"malformed multipart body: {exc.detail}") from None
