"""The only package that imports litellm: route config, the gateway, the offline provider."""
