"""k-nearest-neighbour search per channel with FAISS; the neighbours stage."""
