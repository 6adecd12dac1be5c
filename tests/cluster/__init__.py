"""Harness for tests that need regmirror as a cluster runs it: the shipped image, built for real."""
