"""Image checks for crawled candidates: decode and normalise, dedup, CLIP verification."""
