"""Server reflection that shows the operator's services to operator keys only.

grpc_reflection's servicer answers from the whole descriptor pool: any caller could list the operator
services or fetch admin.proto by file or symbol name. This one lists them, and serves a file that
declares them (or depends on one that does), only to a call carrying a valid operator key
(`authorization: Bearer <operator key>`, checked by the RPC interceptor, processor/rpc.py); to any
other caller they are NOT_FOUND, as a name that does not exist.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as pb
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha.reflection import aio as reflection_aio

from processor import rpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ServerReflection"].full_name


def _files_with(pool, service_names) -> frozenset[str]:
    names = set()
    for name in service_names:
        try:
            names.add(pool.FindFileContainingSymbol(name).name)
        except KeyError:
            pass
    return frozenset(names)


def _closure(descriptor, seen: set[str]) -> set[str]:
    seen.add(descriptor.name)
    for dependency in descriptor.dependencies:
        if dependency.name not in seen:
            _closure(dependency, seen)
    return seen


class FilteringReflectionServicer(reflection_aio.ReflectionServicer):
    """ReflectionServicer whose answers leave out the operator services unless the caller is an operator."""

    def __init__(self, service_names, hidden_service_names, pool=None):
        self._descriptors = pool or descriptor_pool.Default()
        super().__init__(service_names, pool=self._descriptors)
        self._public_names = tuple(sorted(n for n in service_names if n not in hidden_service_names))
        self._hidden_files = _files_with(self._descriptors, hidden_service_names)

    async def ServerReflectionInfo(self, request_iterator, context):
        caller = rpc.principal.get()
        operator = caller is not None and caller.kind == "operator"
        async for response in super().ServerReflectionInfo(request_iterator, context):
            if not operator:
                response = self._filtered(response)
            yield response

    def _filtered(self, response: pb.ServerReflectionResponse) -> pb.ServerReflectionResponse:
        if response.HasField("list_services_response"):
            return pb.ServerReflectionResponse(
                list_services_response=pb.ListServiceResponse(
                    service=[pb.ServiceResponse(name=name) for name in self._public_names]
                ),
                original_request=response.original_request,
            )
        if response.HasField("file_descriptor_response"):
            request = response.original_request
            try:
                if request.HasField("file_by_filename"):
                    descriptor = self._descriptors.FindFileByName(request.file_by_filename)
                elif request.HasField("file_containing_symbol"):
                    descriptor = self._descriptors.FindFileContainingSymbol(request.file_containing_symbol)
                else:  # by extension: answered only if no hidden file is among those sent
                    descriptor = None
            except KeyError:
                descriptor = None
            files = _closure(descriptor, set()) if descriptor is not None else None
            if files is None or files & self._hidden_files:
                return pb.ServerReflectionResponse(
                    error_response=pb.ErrorResponse(error_code=5, error_message=b"Not found"),  # 5: NOT_FOUND
                    original_request=request,
                )
        return response


def enable(service_names, server, pool=None) -> None:
    """Adds the filtering reflection service to an aio server (instead of reflection.enable_server_reflection)."""
    servicer = FilteringReflectionServicer(service_names, rpc.OPERATOR_SERVICES, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
