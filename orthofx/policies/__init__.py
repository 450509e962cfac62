"""Preset policies shipped with orthofx (YAML package data); list them with ``orthofx.policy.presets()``."""
