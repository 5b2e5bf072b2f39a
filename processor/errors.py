"""The one table from domain outcome codes to gRPC status codes."""
import grpc

from processor.domain import Code

STATUS = {
    Code.OK: grpc.StatusCode.OK,
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

if set(STATUS) != set(Code):  # checked at import, so a new Code cannot ship without its status
    raise ImportError("errors.STATUS lacks a gRPC status for " + str(set(Code) - set(STATUS)))


def grpc_status(code: Code) -> grpc.StatusCode:
    return STATUS[code]
