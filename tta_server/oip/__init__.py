"""The Open Inference Protocol v2 (KServe v2 / Triton): REST under /v2 (`rest`), gRPC `inference.GRPCInferenceService`
(`grpc_server`, started only when TTA_GRPC_PORT is set), both on `core` (docs/API.md, "Open Inference Protocol")."""
