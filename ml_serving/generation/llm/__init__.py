"""The only package that imports litellm: provider path, pooled client, retries, cooldowns."""
