"""Test support shipped with Strongroom: the backend contract suite."""
