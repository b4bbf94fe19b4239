"""Encoders named by strings and built by one factory; the embed stage."""
