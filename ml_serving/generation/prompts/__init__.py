"""Versioned prompt templates, their content-hash lock file and its check command."""
