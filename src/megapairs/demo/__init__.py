"""The offline demo: a generated captioned corpus and a summary of what the pipeline made."""
