"""Stages and runners."""

# The runners `build_runner` knows, by CLI name (kept here so the CLI needs no heavy import).
RUNNERS = ("local", "ray")
