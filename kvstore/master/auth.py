"""Token authentication, and the one place that says who a call comes from.

``Authenticator.principal`` maps the token a caller presented (gRPC metadata
``authorization: Bearer <token>``, or the fast path's hello) to its ``tenancy.Principal``:
the cluster principal for the master's ``--token`` (or anyone, on a master without a token),
a tenant's principal for a tenant's token (``--tenants``), None for anything else (the call
is refused with UNAUTHENTICATED). Tokens are compared in constant time
(``kvstore._wire.tokens_equal``), every candidate always, as on the data plane.

With a token the gRPC server refuses unauthenticated calls with an interceptor, before their
request is read (``TokenInterceptor``); with tenants the handler adapter resolves the
principal again per call (``principal_of_metadata``), since an interceptor cannot hand it to
the handler.
"""

from __future__ import annotations

import grpc

from kvstore._wire import data_plane_token, tokens_equal
from kvstore.master.tenancy import CLUSTER, Principal

MESSAGE = "missing or wrong token: send metadata 'authorization: Bearer <token>'"
_SCHEME = b"Bearer "


class Authenticator:
    """Who holds which token: the cluster token (``token``) and each tenant's."""

    def __init__(self, token: str | None, tenants=()):
        self.token = token
        self.tenanted = bool(tenants)
        self._principals = tuple((t.token, Principal(t.name, t)) for t in tenants)
        self.data_token = data_plane_token(token) if tenants else ""

    def principal(self, given: bytes | None) -> Principal | None:
        """The principal presenting token ``given`` (None: none), or None if refused."""
        if not self.token:
            return CLUSTER
        if given is None:
            return None
        found = CLUSTER if tokens_equal(self.token, given) else None
        for token, principal in self._principals:     # NOTE: no early exit: constant time
            if tokens_equal(token, given) and found is None:
                found = principal
        return found

    def principal_of_metadata(self, metadata) -> Principal | None:
        """``principal`` of the token in gRPC call ``metadata``."""
        return self.principal(_bearer(metadata))


def _bearer(metadata) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            given = (value if isinstance(value, str) else value.decode("latin-1")).encode(
                "utf-8", "replace")
            return given[len(_SCHEME):] if given.startswith(_SCHEME) else None
    return None




def _deny(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)


async def _deny_async(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)


class TokenInterceptor(grpc.ServerInterceptor):
    """For the thread-pool server: refuses a call whose token no principal holds, before
    its request is read."""

    def __init__(self, authenticator: Authenticator):
        self._authorized = authenticator.principal_of_metadata
        self._deny = grpc.unary_unary_rpc_method_handler(_deny)

    def intercept_service(self, continuation, handler_call_details):
        if self._authorized(handler_call_details.invocation_metadata) is not None:
            return continuation(handler_call_details)
        return self._deny


class AsyncTokenInterceptor(grpc.aio.ServerInterceptor):
    """For the grpc.aio server (as ``TokenInterceptor``)."""

    def __init__(self, authenticator: Authenticator):
        self._authorized = authenticator.principal_of_metadata
        self._deny = grpc.unary_unary_rpc_method_handler(_deny_async)

    async def intercept_service(self, continuation, handler_call_details):
        if self._authorized(handler_call_details.invocation_metadata) is not None:
            return await continuation(handler_call_details)
        return self._deny
