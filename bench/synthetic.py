"""Clustered synthetic embeddings for benchmarks, written as finished embed parts.

Each channel is a mixture of Gaussians on its unit sphere: cluster centres sit
around a few "topic" centres (so clusters have near siblings, as real
embeddings do), cluster sizes are skewed (log-normal weights) and each cluster
has its own spread, so within-cluster cosines range over ~0.74-0.92 and
straddle a (0.8, 0.96) mining window. A small share of images are near-copies
of another image (cosine > 0.96). Channels share each image's cluster with
probability `shared`, so their neighbour lists overlap without being equal.
Everything is seeded; parts are generated one at a time, so memory stays at
one part whatever the size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megapairs.embeddings import embed_stage_name, l2_normalise, write_shard
from megapairs.runs import RunDir, part_name
from megapairs.schemas import record_id


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and shape of a synthetic corpus's embeddings."""

    size: int
    dims: dict[str, int]  # channel name -> vector dimension
    clusters: int = 3000
    topics: int = 64
    topic_spread: float = 1.0  # cluster centre = topic + spread * unit noise
    sigma: tuple[float, float] = (0.3, 0.6)  # per-cluster noise scale range
    shared: float = 0.7  # chance a channel keeps the image's common cluster
    near_copies: float = 0.02  # share of images that near-copy another image
    shard_size: int = 100_000
    seed: int = 0


def _labels(spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The cluster of every image in every channel."""
    weights = rng.lognormal(sigma=1.0, size=spec.clusters)
    weights /= weights.sum()
    common = rng.choice(spec.clusters, size=spec.size, p=weights).astype(np.int32)
    labels = {}
    for channel in spec.dims:
        own = rng.choice(spec.clusters, size=spec.size, p=weights).astype(np.int32)
        labels[channel] = np.where(rng.random(spec.size) < spec.shared, common, own)
    return labels


def _centres(spec: SyntheticSpec, dim: int, rng: np.random.Generator) -> np.ndarray:
    topics = l2_normalise(rng.standard_normal((spec.topics, dim)))
    topic_of = rng.integers(0, spec.topics, spec.clusters)
    noise = rng.standard_normal((spec.clusters, dim)) * (spec.topic_spread / np.sqrt(dim))
    return l2_normalise(topics[topic_of] + noise)


def _part_vectors(
    centres: np.ndarray,
    sigmas: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    copies: float,
) -> np.ndarray:
    dim = centres.shape[1]
    scale = (sigmas[labels] / np.sqrt(dim)).astype(np.float32)[:, None]
    vectors = rng.standard_normal((len(labels), dim), dtype=np.float32) * scale
    vectors += centres[labels]
    vectors = l2_normalise(vectors)
    copied = np.flatnonzero(rng.random(len(labels)) < copies)
    sources = rng.integers(0, len(labels), len(copied))
    jitter = rng.standard_normal((len(copied), dim), dtype=np.float32) * (0.15 / np.sqrt(dim))
    vectors[copied] = vectors[sources] + jitter
    return vectors


def write_synthetic_run(run: RunDir, spec: SyntheticSpec) -> list[str]:
    """Write every channel's parts as finished `embed.<channel>` parts; return part names."""
    rng = np.random.default_rng(spec.seed)
    labels = _labels(spec, rng)
    starts = range(0, spec.size, spec.shard_size)
    for number_c, (channel, dim) in enumerate(spec.dims.items()):
        channel_rng = np.random.default_rng([spec.seed, number_c])
        centres = _centres(spec, dim, channel_rng).astype(np.float32)
        sigmas = channel_rng.uniform(*spec.sigma, spec.clusters)
        for number, start in enumerate(starts):
            part_labels = labels[channel][start : start + spec.shard_size]
            part_rng = np.random.default_rng([spec.seed, number_c, number])
            vectors = _part_vectors(centres, sigmas, part_labels, part_rng, spec.near_copies)
            ids = np.array([record_id(number, i) for i in range(len(vectors))], dtype=np.int64)
            write_shard(run, channel, part_name(number), ids, vectors)
            run.mark_done(embed_stage_name(channel), part_name(number), {"embedded": len(ids)})
    return [part_name(i) for i in range(len(starts))]
