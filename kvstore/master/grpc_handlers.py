"""The master's methods as gRPC handlers (sync, or grpc.aio with the calls that wait on
daemons or etcd off the event loop), each resolving its caller's principal and turning
``Rejected`` into the call's status."""

from __future__ import annotations

import asyncio

import grpc

from kvstore.master import auth
from kvstore.master.invoker import METHODS, OFF_LOOP_METHODS, make_invoker
from kvstore.master.service import MasterService
from kvstore.master.tenancy import CLUSTER
from kvstore.master.validation import Rejected
from kvstore.v1 import master_pb2 as pb


def make_handlers(service: MasterService, clock, metrics, *, asynchronous: bool,
                  authenticator=None):
    """A ``grpc.GenericRpcHandler`` for every method, sync or async. With a tenanted
    ``authenticator`` (``auth.Authenticator``) each call's principal is resolved from its
    metadata (UNAUTHENTICATED when refused); otherwise every call is the cluster
    principal's (the token interceptor, if any, has already checked it)."""
    handlers = {}
    if authenticator is None or not authenticator.tenanted:
        authenticator = None
    for name in METHODS:
        request_class = getattr(pb, f"{name}Request")
        response_class = getattr(pb, f"{name}Response")
        invoke = make_invoker(service, name, clock, metrics, "grpc")
        if asynchronous and name in OFF_LOOP_METHODS:
            # NOTE: these wait for daemons' confirmations or etcd: off the event loop, or one
            # slow daemon (or etcd) would stall every call
            fn = _async_in_executor(invoke, response_class, authenticator)
        elif asynchronous:
            fn = _make_async(_grpc_adapter(invoke, response_class, authenticator))
        else:
            fn = _grpc_adapter(invoke, response_class, authenticator)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler("kvstore.v1.Master", handlers)


def _caller_of(context, authenticator):
    """The call's principal: the cluster's without a tenanted ``authenticator``; raises
    Rejected (UNAUTHENTICATED) for a token it refuses."""
    if authenticator is None:
        return CLUSTER
    caller = authenticator.principal_of_metadata(context.invocation_metadata())
    if caller is None:
        raise Rejected(grpc.StatusCode.UNAUTHENTICATED, auth.MESSAGE)
    return caller


def _grpc_adapter(invoke, response_class, authenticator=None):
    """Turns ``Rejected`` into the call's gRPC status (the reply body is then dropped)."""

    def handler(request, context):
        try:
            return invoke(request, _caller_of(context, authenticator))
        except Rejected as exc:
            context.set_code(exc.code)
            context.set_details(exc.message)
            return response_class()

    return handler


def _make_async(fn):
    async def handler(request, context):
        return fn(request, context)
    return handler


def _async_in_executor(invoke, response_class, authenticator=None):
    """Like ``_grpc_adapter`` for grpc.aio, running ``invoke`` on the default executor (the
    principal is resolved and the status set on the event loop, where the context lives)."""
    async def handler(request, context):
        try:
            caller = _caller_of(context, authenticator)
            return await asyncio.get_running_loop().run_in_executor(None, invoke, request,
                                                                    caller)
        except Rejected as exc:
            context.set_code(exc.code)
            context.set_details(exc.message)
            return response_class()
    return handler
