"""Benchmark the local search index and the search service on a synthetic corpus.

    python bench/bench_search.py                  # 1M passages, 1M image vectors (~10 minutes on 2 cores)
    python bench/bench_search.py --quick          # 20k passages, 60k image vectors
    python bench/bench_search.py --only vectors   # just the 1M-vector ANN part

Lines printed: `name: ours=<v> anchor=<v> ratio=<v>` (ratio = anchor / ours for latencies, so > 1
means ours is faster; ours / anchor for throughputs). Anchors, measured in the same run:
* text search: a brute-force scan that scores every passage (the same BM25 weights as a passage x term
  matrix times the query vector, touching every posting, then a full sort) instead of bm25s's
  query-term columns + top-k selection;
* image vector search: what `LocalIndex` uses at that many vectors (the faiss IVF index of
  fvqa.search.ann at `ann_nprobe`, above `ann_min_vectors`; else the exact scan) against the exact
  cosine scan (`top_k_cosine`), which is also the recall@5 reference. The vectors are synthetic:
  embedding 1M real images on 2 CPU cores takes days (throughput is measured on real images below).
  Uniform random vectors would be an unrealistic worst case for ANN (no neighbourhoods at all), so
  they are CLIP-like instead (`clip_like_vectors`): a 1024-component Gaussian mixture in a 64-d latent
  space, mapped into 512-d, plus a shared mean direction and isotropic noise, normalised onto the
  sphere; components overlap, so neighbours straddle IVF cells and nprobe matters. Queries are
  held-out points of the same distribution (not perturbed corpus vectors: those are easier);
* service: the same requests through the service with the cache disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def line(name: str, ours: float, anchor: float, *, lower_is_better: bool = True, unit: str = "") -> None:
    ratio = (anchor / ours if lower_is_better else ours / anchor) if ours and anchor else float("nan")
    print(f"{name}: ours={ours:.4g}{unit} anchor={anchor:.4g}{unit} ratio={ratio:.3g}", flush=True)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def synth_corpus(path: Path, n: int, rng: np.random.Generator, words: int = 40, vocab: int = 60_000) -> list[str]:
    """Write n passages of Zipf-distributed pseudo-words; return the vocabulary."""
    names = [f"w{np.base_repr(i, 36).lower()}" for i in range(vocab)]
    vocab_arr = np.asarray(names, dtype=object)
    with path.open("w") as fh:
        for start in range(0, n, 50_000):
            m = min(50_000, n - start)
            ids = (rng.zipf(1.15, size=(m, words)) - 1) % vocab
            for j in range(m):
                text = " ".join(vocab_arr[ids[j]])
                fh.write(json.dumps({"url": f"https://synth.test/{start + j}", "title": f"passage {start + j}",
                                     "text": text + "."}) + "\n")
    return names


def bench_text(tmp: Path, n: int, rng: np.random.Generator, n_queries: int) -> Path:
    import scipy.sparse as sp

    from fvqa.search.local_index import LocalIndex, build_index

    corpus = tmp / "pages.jsonl"
    t0 = time.perf_counter()
    synth_corpus(corpus, n, rng)
    print(f"# generated {n} passages in {time.perf_counter() - t0:.1f}s", flush=True)
    stats = build_index(corpus, None, tmp / "index")
    print(f"# text index: {stats.pages} pages, built in {stats.seconds:.1f}s, {stats.bytes_on_disk / 1e6:.1f} MB",
          flush=True)
    ix = LocalIndex(tmp / "index")
    # known-item queries: 4 rarer words of a random passage
    queries, targets = [], []
    with corpus.open() as fh:
        picks = set(rng.choice(n, size=n_queries, replace=False).tolist())
        for i, raw in enumerate(fh):
            if i in picks:
                words = json.loads(raw)["text"].rstrip(".").split()
                rare = sorted(set(words), key=lambda w: int(w[1:], 36), reverse=True)[:4]
                queries.append(" ".join(rare))
                targets.append(i)
    lat, found = [], 0
    for q, t in zip(queries, targets, strict=True):
        s = time.perf_counter()
        res = ix.search_pages(q, 5)
        lat.append(time.perf_counter() - s)
        found += any(pid == t for pid, _ in res)
    summ = []
    for q in queries[:50]:
        s = time.perf_counter()
        ix.text_search(q, q, k=5)
        summ.append(time.perf_counter() - s)

    # brute-force anchor: the same BM25 weights as a passage x term matrix, multiplied by the query
    # vector: every posting of every passage is touched (a full scan), then all scores are sorted
    bm = ix._bm25
    n_docs, n_terms = int(bm.scores["num_docs"]), len(bm.scores["indptr"]) - 1
    mat = sp.csc_matrix((bm.scores["data"], bm.scores["indices"], bm.scores["indptr"]),
                        shape=(n_docs, n_terms)).tocsr()
    brute = []
    for q in queries[:50]:
        s = time.perf_counter()
        qvec = np.zeros(n_terms, dtype=np.float32)
        qvec[[bm.vocab_dict[w] for w in q.split() if w in bm.vocab_dict]] = 1.0
        scores = mat @ qvec  # touches every posting of every passage: a full scan
        np.argsort(-scores)[:5]
        brute.append(time.perf_counter() - s)
    print(f"# text known-item recall@5: {found}/{len(queries)}", flush=True)
    line(f"text_search_p50_ms[{n}]", 1000 * pct(lat, 50), 1000 * pct(brute, 50), unit="ms")
    line(f"text_search_p95_ms[{n}]", 1000 * pct(lat, 95), 1000 * pct(brute, 95), unit="ms")
    print(f"# text_search incl. extractive summaries of 5 pages: p50={1000 * pct(summ, 50):.1f}ms "
          f"p95={1000 * pct(summ, 95):.1f}ms", flush=True)
    print(f"text_index_build_s[{n}]: ours={stats.seconds:.1f} anchor=nan ratio=nan", flush=True)
    print(f"text_index_size_mb[{n}]: ours={stats.bytes_on_disk / 1e6:.1f} anchor={corpus.stat().st_size / 1e6:.1f} "
          f"ratio={stats.bytes_on_disk / corpus.stat().st_size:.3g}  # anchor = raw corpus jsonl", flush=True)
    return tmp / "index"


def clip_like_vectors(n: int, rng: np.random.Generator, dim: int = 512, latent: int = 64,
                      components: int = 1024) -> Callable[[int], np.ndarray]:
    """A sampler of CLIP-like unit vectors (see the module docstring); `sample(m)` -> (m, dim) float32.

    Random pairs have cosine ~0.1 and a held-out point's nearest neighbour ~0.8 at 1M points, near
    what ViT-B-32 gives on photos; the mixture's components overlap (spread 0.7 of the centres' scale).
    """
    mean = rng.standard_normal(dim).astype(np.float32)
    mean *= 8 / np.linalg.norm(mean)
    proj = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((components, latent), dtype=np.float32)

    def sample(m: int) -> np.ndarray:
        z = centres[rng.integers(0, components, m)] + 0.7 * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ proj + mean + 0.02 * rng.standard_normal((m, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return sample


def _rss_mb() -> float:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def bench_vectors(tmp: Path, n: int, rng: np.random.Generator, n_queries: int = 200, k: int = 5) -> None:
    """Image vector search at `n` vectors: LocalIndex's choice (ANN or exact) vs the exact scan, recall@k."""
    from fvqa.search.ann import AnnIndex
    from fvqa.search.config import LocalConfig
    from fvqa.search.local_index import top_k_cosine

    cfg = LocalConfig()
    sample = clip_like_vectors(n, rng)
    t0 = time.perf_counter()
    mat = np.empty((n, 512), dtype=np.float32)
    for start in range(0, n, 50_000):
        mat[start:start + 50_000] = sample(min(50_000, n - start))
    queries = sample(n_queries)  # held out
    print(f"# generated {n} CLIP-like 512-d vectors in {time.perf_counter() - t0:.1f}s "
          f"({mat.nbytes / 1e6:.0f} MB float32)", flush=True)
    exact_lat, truth, top1 = [], [], []
    for q in queries:
        s = time.perf_counter()
        idx, scores = top_k_cosine(mat, q, k)
        exact_lat.append(time.perf_counter() - s)
        truth.append(set(idx.tolist()))
        top1.append(float(scores[0]))
    print(f"# mean cosine of a query's nearest neighbour: {np.mean(top1):.3f}; median of random pairs: "
          f"{float(np.median(queries @ mat[:10_000].T)):.3f}", flush=True)
    if n < cfg.ann_min_vectors:  # LocalIndex scans exactly here: compare that with a full sort
        full = []
        for q in queries:
            s = time.perf_counter()
            np.argsort(-(mat @ q))[:k]
            full.append(time.perf_counter() - s)
        print(f"# {n} < ann_min_vectors={cfg.ann_min_vectors}: exact scan (anchor: the same with a full sort)")
        line(f"image_vector_search_p50_ms[{n}]", 1000 * pct(exact_lat, 50), 1000 * pct(full, 50), unit="ms")
        line(f"image_vector_search_p95_ms[{n}]", 1000 * pct(exact_lat, 95), 1000 * pct(full, 95), unit="ms")
        return
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    built = AnnIndex.build(mat)
    build_s = time.perf_counter() - t0
    rss_build = _rss_mb() - rss0
    built.save(tmp / "ann.faiss")
    del built
    ann = AnnIndex.load(tmp / "ann.faiss", expected=n, dim=512)  # as LocalIndex opens it: memory-mapped
    size_mb = (tmp / "ann.faiss").stat().st_size / 1e6

    def run(nprobe: int) -> tuple[list[float], float]:
        lat, hits = [], 0
        for q, t in zip(queries, truth, strict=True):
            s = time.perf_counter()
            ids, _ = ann.search(q, k, nprobe)
            lat.append(time.perf_counter() - s)
            hits += len(t & set(ids.tolist()))
        return lat, hits / (k * len(queries))

    run(cfg.ann_nprobe)  # warm the memory-mapped lists
    for nprobe in (8, 16, 64, 128):
        lat, rec = run(nprobe)
        print(f"# nprobe={nprobe}: p50={1000 * pct(lat, 50):.2f}ms p95={1000 * pct(lat, 95):.2f}ms "
              f"recall@{k}={rec:.3f}", flush=True)
    lat, rec = run(cfg.ann_nprobe)
    print(f"# ANN: faiss IVF, nlist={ann.nlist}, nprobe={cfg.ann_nprobe} (config default), fp16 codes; "
          f"build {build_s:.1f}s, RSS +{rss_build:.0f} MB while building", flush=True)
    line(f"image_vector_search_p50_ms[{n}]", 1000 * pct(lat, 50), 1000 * pct(exact_lat, 50), unit="ms")
    line(f"image_vector_search_p95_ms[{n}]", 1000 * pct(lat, 95), 1000 * pct(exact_lat, 95), unit="ms")
    print(f"image_vector_recall_at_{k}[{n}]: ours={rec:.3f} anchor=1 ratio={rec:.3f}", flush=True)
    print(f"image_ann_build_s[{n}]: ours={build_s:.1f} anchor=nan ratio=nan", flush=True)
    print(f"image_ann_size_mb[{n}]: ours={size_mb:.0f} anchor={mat.nbytes / 1e6:.0f} ratio={size_mb * 1e6 / mat.nbytes:.3g}"
          "  # anchor = the float32 vectors (image_vectors.npy)", flush=True)


def bench_images(tmp: Path, n_vectors: int, n_real: int) -> Path:
    from fvqa.demo.world import make_world
    from fvqa.search.clip import ClipEmbedder
    from fvqa.search.config import LocalConfig
    from fvqa.search.local_index import LocalIndex, build_index

    # real images end to end (demo world pictures, fvqa-tiny CLIP): build + query latency
    world = make_world(tmp / "world", seed=1, n_entities=max(2, n_real // 2))
    cfg = LocalConfig(clip_model="fvqa-tiny")
    emb = ClipEmbedder("fvqa-tiny")
    stats = build_index(world / "web/pages.jsonl", world / "web/images.jsonl", tmp / "img_index", config=cfg,
                        embedder=emb)
    ix = LocalIndex(tmp / "img_index", embedder=emb)
    rows = [json.loads(r) for r in (world / "web/images.jsonl").read_text().splitlines()][: min(100, stats.images)]
    from PIL import Image

    lat, ok = [], 0
    for r in rows:
        img = Image.open(world / "web" / r["path"])
        img.load()
        s = time.perf_counter()
        hits = ix.image_search(img, 5)
        lat.append(time.perf_counter() - s)
        ok += hits[0].title == r["title"]
    print(f"# image index on {stats.images} real images (fvqa-tiny): built in {stats.seconds:.1f}s "
          f"({stats.images / stats.seconds:.0f} img/s incl. decode+thumbnail), known-item top-1 {ok}/{len(rows)}, "
          f"query p50={1000 * pct(lat, 50):.1f}ms p95={1000 * pct(lat, 95):.1f}ms (embed + search + thumbnails)",
          flush=True)
    try:
        big = ClipEmbedder("ViT-B-32")
        imgs = [Image.open(world / "web" / r["path"]).convert("RGB") for r in rows[:16]]
        big.embed(imgs[:2])
        s = time.perf_counter()
        big.embed(imgs)
        rate = len(imgs) / (time.perf_counter() - s)
        print(f"# ViT-B-32 embedding: {rate:.1f} img/s on this machine -> ~{n_vectors / rate / 60:.0f} min to embed "
              f"{n_vectors} images", flush=True)
    except Exception as exc:  # noqa: BLE001 - informational only
        print(f"# ViT-B-32 throughput not measured: {exc}")
    return tmp / "img_index"


def bench_service(tmp: Path, index: Path, n_queries: int, seconds: float) -> None:
    import sqlite3

    import uvicorn

    from fvqa.search.client import SearchClient
    from fvqa.search.config import SearchConfig
    from fvqa.search.local_index import LocalIndex
    from fvqa.search.service import create_app
    from fvqa.search.tools import SearchTools

    ix = LocalIndex(index)

    titles = [t for (t,) in sqlite3.connect(index / "pages.sqlite").execute(
        f"SELECT text FROM pages ORDER BY random() LIMIT {n_queries}")]
    queries = [" ".join(t.split()[:4]) for t in titles]

    def run(cache: bool) -> float:
        cfg = SearchConfig.model_validate({"backend": "local", "cache": {"enabled": cache},
                                           "service": {"text_concurrency": 8}})
        tools = SearchTools(cfg, ix, cache_dir=tmp / f"cache_{cache}")
        server = uvicorn.Server(uvicorn.Config(create_app(tools), host="127.0.0.1", port=0, log_level="error"))
        th = threading.Thread(target=server.run, daemon=True)
        th.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        client = SearchClient(url)
        for q in queries:  # warm-up (fills the cache when enabled)
            client.text_search(q, q)
        done = 0
        stop = time.perf_counter() + seconds
        lock = threading.Lock()

        def worker(i: int) -> None:
            nonlocal done
            j = i
            while time.perf_counter() < stop:
                client.text_search(queries[j % len(queries)], queries[j % len(queries)])
                j += 7
                with lock:
                    done += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(worker, range(8)))
        qps = done / (time.perf_counter() - t0)
        server.should_exit = True
        th.join(5)
        return qps

    cached, uncached = run(True), run(False)
    line("service_text_qps_cached_8_clients", cached, uncached, lower_is_better=False, unit="/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small corpus (seconds, for CI)")
    ap.add_argument("--passages", type=int, default=None)
    ap.add_argument("--vectors", type=int, default=None)
    ap.add_argument("--only", choices=["text", "vectors", "images", "service"], action="append",
                    help="run only these parts (repeatable); default: all")
    args = ap.parse_args()
    n_pass = args.passages or (20_000 if args.quick else 1_000_000)
    n_vec = args.vectors or (60_000 if args.quick else 1_000_000)
    parts = set(args.only or ["text", "vectors", "images", "service"])
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        t0 = time.perf_counter()
        index = bench_text(tmp, n_pass, rng, n_queries=100 if args.quick else 200) if parts & {"text", "service"} else None
        if "vectors" in parts:
            bench_vectors(tmp, n_vec, rng)
        if "images" in parts:
            bench_images(tmp, n_vec, n_real=40 if args.quick else 200)
        if index is not None and "service" in parts:
            bench_service(tmp, index, n_queries=50, seconds=3 if args.quick else 8)
        print(f"# total {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
