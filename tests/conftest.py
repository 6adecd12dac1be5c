"""Fixtures for real components: a registry, containerd nodes, crictl, and a real control plane."""

pytest_plugins = ["tests.harness.fixtures"]
