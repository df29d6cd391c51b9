"""Integrations with feature-flag SDKs; each needs its SDK installed (an optional extra)."""
