import grpc
import pytest

from shared import errors


@pytest.mark.parametrize(
    "cls,status",
    [
        (errors.InvalidArgument, 400),
        (errors.FailedPrecondition, 400),
        (errors.OutOfRange, 400),
        (errors.NotFound, 404),
        (errors.AlreadyExists, 409),
        (errors.ResourceExhausted, 429),
        (errors.Unavailable, 503),
        (errors.DeadlineExceeded, 504),
        (errors.Unauthenticated, 401),
        (errors.Internal, 500),
    ],
)
def test_each_error_maps_to_its_http_status(cls, status):
    assert errors.http_status(cls.code) == status


def test_every_grpc_code_has_an_http_status():
    assert set(errors.GRPC_TO_HTTP) == set(grpc.StatusCode)


class _Err(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self):
        return "queue full"


def test_rpc_error_becomes_the_matching_service_error():
    e = errors.from_rpc_error(_Err())
    assert isinstance(e, errors.ResourceExhausted) and e.message == "queue full"
