"""Token authentication: a server interceptor that refuses, with UNAUTHENTICATED, every call
that does not carry ``authorization: Bearer <token>`` metadata. The comparison is constant
time. Installed only when the master has a token."""

from __future__ import annotations

import hmac

import grpc

_MESSAGE = "missing or wrong token: send metadata 'authorization: Bearer <token>'"


def _authorized(expected: bytes, metadata) -> bool:
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else value.decode("latin-1")
            return hmac.compare_digest(text.encode("utf-8", "replace"), expected)
    return False


def _deny(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


async def _deny_async(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


class TokenInterceptor(grpc.ServerInterceptor):
    """For the thread-pool server."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._deny = grpc.unary_unary_rpc_method_handler(_deny)

    def intercept_service(self, continuation, handler_call_details):
        if _authorized(self._expected, handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        return self._deny


class AsyncTokenInterceptor(grpc.aio.ServerInterceptor):
    """For the grpc.aio server."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_async)

    async def intercept_service(self, continuation, handler_call_details):
        if _authorized(self._expected, handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        return self._deny
