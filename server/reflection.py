"""gRPC server reflection (grpc.reflection.v1alpha) that resolves every service the sidecar advertises.

The OIP stubs live in a private descriptor pool (proto/generate.py: tritonclient registers the
same `inference.*` names in protobuf's default pool), while grpc.health.v1 and the reflection
service register theirs in the default pool. A reflection servicer reads one pool, so one holding
only the OIP file lists `grpc.health.v1.Health` but cannot describe it (grpcurl: "Symbol not
found"). `reflection_pool` builds a pool with all three files; `enable_reflection` serves it.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from purifier_server._proto import grpc_service_pb2 as pb

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool with the OIP, grpc.health.v1 and reflection files (none imports another)."""
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool


def enable_reflection(server, oip_service: str) -> None:
    """Serve reflection on `server` for the OIP service, health and reflection itself."""
    names = (oip_service, HEALTH_SERVICE, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=reflection_pool())
