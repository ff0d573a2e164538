"""Domain tests: features, model, registries, prompts, context, training, the LLM gateway over
real HTTP to fakes. No gRPC server here; the root conftest's fixtures are the only shared ones."""
