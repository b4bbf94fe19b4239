"""Annotator backends behind one interface: openai (HTTP), hf (local), template."""
