"""Strongroom's built-in backends. Each imports even when its library is missing."""
