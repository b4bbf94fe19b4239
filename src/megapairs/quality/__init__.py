"""The quality gate (`score` stage): every annotated instruction scored by a composed
retriever (round trip, shortcuts, false negatives) and, optionally, judged by a VLM."""
