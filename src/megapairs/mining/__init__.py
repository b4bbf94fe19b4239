"""Pair mining: similarity windows, channel union, targets per query, hard negatives."""
