"""Generate's domain: its flow (service), context assembly, prompt registry and LLM gateway."""
