"""Annotation: a VLM describes each mined pair, an LLM turns that into instructions."""
