"""Token authentication: a server interceptor that refuses, with UNAUTHENTICATED, every call
that does not carry ``authorization: Bearer <token>`` metadata. The token is checked with
``kvstore._wire.tokens_equal`` (constant time), as on the fast path and the data plane.
Installed only when the master has a token."""

from __future__ import annotations

import grpc

from kvstore._wire import tokens_equal

_MESSAGE = "missing or wrong token: send metadata 'authorization: Bearer <token>'"
_SCHEME = b"Bearer "


def _authorized(token: str, metadata) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            given = (value if isinstance(value, str) else value.decode("latin-1")).encode(
                "utf-8", "replace")
            return given.startswith(_SCHEME) and tokens_equal(token, given[len(_SCHEME):])
    return False


def _deny(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


async def _deny_async(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


class TokenInterceptor(grpc.ServerInterceptor):
    """For the thread-pool server."""

    def __init__(self, token: str):
        self._token = token
        self._deny = grpc.unary_unary_rpc_method_handler(_deny)

    def intercept_service(self, continuation, handler_call_details):
        if _authorized(self._token, handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        return self._deny


class AsyncTokenInterceptor(grpc.aio.ServerInterceptor):
    """For the grpc.aio server."""

    def __init__(self, token: str):
        self._token = token
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_async)

    async def intercept_service(self, continuation, handler_call_details):
        if _authorized(self._token, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        return self._deny
