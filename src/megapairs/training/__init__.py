"""Contrastive training of MMRet retrievers: losses, negatives, gradient caching, trainer."""
