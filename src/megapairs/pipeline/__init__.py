"""Stages and runners."""
