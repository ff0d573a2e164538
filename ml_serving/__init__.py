"""ml-serving: contract-first gRPC inference service (Score with numpy, Generate with LiteLLM)."""
