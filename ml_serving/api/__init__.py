"""The gRPC surface (server, per-RPC layer, servicer, metrics, client, workers, security)."""

# The only package that imports grpc or the generated _proto modules.
