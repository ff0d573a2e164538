"""Score's domain: named features (shared with training), the numpy model, the registry."""
