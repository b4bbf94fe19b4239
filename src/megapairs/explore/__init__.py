"""The explorer: a local web app to see, search and curate a run's triplets
(`megapairs explore`), and composed search over the corpus (`megapairs search`)."""
