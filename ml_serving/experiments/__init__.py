"""Experiments over Generate's prompt versions: config, assignment, bandit, shadow, decision log."""
