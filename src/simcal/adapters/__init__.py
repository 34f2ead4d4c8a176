"""Adapters: small wrappers that turn another framework's simulation into a simcal model."""
