"""Cross-cutting: JSON logs with a request id, OpenTelemetry tracing."""
