"""Corpus ingestion: readers for each input format, image validation, the ingest stage."""
