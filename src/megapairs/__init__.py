"""MegaPairs: massive data synthesis for universal multimodal retrieval."""

__version__ = "0.1.0"
