"""Approximate nearest-neighbour search over the local index's image vectors (faiss IVF).

One job: build, save, load and query an inverted-file index over unit-norm CLIP vectors, so image
search at a million images costs a few milliseconds instead of a full scan. faiss `IndexIVFScalarQuantizer`
(fp16 codes, inner product): k-means on a sample of the vectors picks `nlist` centroids, every vector is
stored (at half the bytes of float32) in its centroid's list, and a query scans the `nprobe` nearest lists.
We chose IVF over HNSW (usearch) because a user builds this on a laptop-sized CPU: IVF builds 1M x 512
vectors in well under a minute on 2 cores, where an HNSW graph took ~1,000 vectors/s (over 15 minutes);
query latency and recall are comparable once `nprobe` is tuned. faiss is imported lazily: small corpora
(searched exactly) never load it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from fvqa.errors import FvqaError

KIND = "faiss-ivf-sq-fp16"
TRAIN_PER_LIST = 40  # k-means sample = 40 vectors per centroid (faiss warns below 39)
KMEANS_ITERATIONS = 20
SEED = 1234


class AnnIndexError(FvqaError):
    """The ANN file is missing, unreadable or does not match the index's vectors."""


def default_nlist(n: int) -> int:
    """Number of inverted lists for `n` vectors: ~sqrt(n) (faiss's rule of thumb), at least 1."""
    return max(1, min(int(round(math.sqrt(n))), n // TRAIN_PER_LIST or 1))


class AnnIndex:
    """A faiss IVF index over unit vectors; `search` returns (row ids, cosine scores), best first."""

    def __init__(self, index: Any) -> None:
        self._index = index

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def nlist(self) -> int:
        return int(self._index.nlist)

    @classmethod
    def build(cls, matrix: np.ndarray, *, nlist: int | None = None, seed: int = SEED) -> AnnIndex:
        """Train k-means on a seeded sample of `matrix` rows, then add every row (row i gets id i)."""
        import faiss

        n, dim = matrix.shape
        if n == 0:
            raise AnnIndexError("cannot build an ANN index over zero vectors")
        nlist = nlist or default_nlist(n)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # we size the sample; tiny corpora need no warning
        rng = np.random.default_rng(seed)
        n_train = min(n, nlist * TRAIN_PER_LIST)
        sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
        index.train(np.ascontiguousarray(matrix[sample], dtype=np.float32))
        for start in range(0, n, 100_000):  # chunks: a float16/memory-mapped matrix is never copied whole
            index.add(np.ascontiguousarray(matrix[start:start + 100_000], dtype=np.float32))
        return cls(index)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, *, expected: int, dim: int) -> AnnIndex:
        """Open `path` memory-mapped; AnnIndexError if it is missing, unreadable or for other vectors."""
        import faiss

        if not path.is_file():
            raise AnnIndexError(f"ANN index file {path} is missing")
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
        except RuntimeError as exc:
            why = re.sub(r"^Error in .*? at \S+:\d+: ", "", str(exc).strip()) or type(exc).__name__
            raise AnnIndexError(f"ANN index file {path} is unreadable ({why[:200]})") from exc
        if int(index.ntotal) != expected or int(index.d) != dim or not hasattr(index, "nprobe"):
            raise AnnIndexError(f"ANN index file {path} holds {index.ntotal} x {index.d} vectors, "
                                f"the index has {expected} x {dim}")
        return cls(index)

    def search(self, query: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k rows by inner product: (row ids, scores), best first (fewer if lists run short)."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=min(nprobe, self.nlist))  # per call: safe across threads
        scores, ids = self._index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k,
                                         params=params)
        keep = ids[0] >= 0
        return ids[0][keep].astype(np.int64), scores[0][keep]
