"""The Purifier sidecar: an Open Inference Protocol (KServe v2) gRPC proxy that defends every
confidence vector (installed as `purifier_server`; the library `purifier` never imports it)."""
