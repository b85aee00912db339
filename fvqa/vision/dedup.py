"""Exact (sha256) and near-duplicate (perceptual hash) detection across everything seen in a run.

A perceptual hash survives re-encoding and resizing, so the same photo crawled from two sites is
caught; the Hamming-distance threshold is configurable (0 = identical hash, -1 = off).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import imagehash
import numpy as np
from PIL import Image


def phash_hex(image: Image.Image) -> str:
    """64-bit DCT perceptual hash as 16 hex characters."""
    return str(imagehash.phash(image))


def sha256_hex(data: bytes) -> str:
    """Content hash used by the workspace image store."""
    return hashlib.sha256(data).hexdigest()


@dataclass
class DedupIndex:
    """What has been kept so far: sha256 -> owner, and phashes with their owners.

    `owner` is a short label for the reject detail ("concept metaclip-000012 (http://...)").
    """

    max_distance: int = 4
    _sha: dict[str, str] = field(default_factory=dict)
    _hashes: list[int] = field(default_factory=list)
    _owners: list[str] = field(default_factory=list)
    _array: np.ndarray | None = None

    def check(self, sha256: str, phash: str) -> tuple[str, str] | None:
        """(reason, owner) if this image duplicates one already kept, else None."""
        if sha256 in self._sha:
            return "exact duplicate", self._sha[sha256]
        if self.max_distance < 0 or not self._hashes:
            return None
        if self._array is None or len(self._array) != len(self._hashes):
            self._array = np.array(self._hashes, dtype=np.uint64)
        dist = np.bitwise_count(self._array ^ np.uint64(int(phash, 16)))
        best = int(np.argmin(dist))
        if int(dist[best]) <= self.max_distance:
            return f"near-duplicate (phash distance {int(dist[best])})", self._owners[best]
        return None

    def add(self, sha256: str, phash: str | None, owner: str) -> None:
        """Remember a kept image."""
        self._sha.setdefault(sha256, owner)
        if phash:
            self._hashes.append(int(phash, 16))
            self._owners.append(owner)
