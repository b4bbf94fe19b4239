"""The exported triplet dataset in the MegaPairs schema: export, validate, stats."""
