"""Benchmark the local search index and the search service on a synthetic corpus.

    python bench/bench_search.py            # 1M passages, 100k image vectors (a few minutes)
    python bench/bench_search.py --quick    # 20k passages, 10k image vectors

Lines printed: `name: ours=<v> anchor=<v> ratio=<v>` (ratio = anchor / ours for latencies, so > 1
means ours is faster; ours / anchor for throughputs). Anchors, measured in the same run:
* text search: a brute-force scan that scores every passage (the same BM25 weights as a passage x term
  matrix times the query vector, touching every posting, then a full sort) instead of bm25s's
  query-term columns + top-k selection;
* image search: exact cosine with a full sort of all scores instead of our partial selection
  (the 100k vectors are synthetic unit vectors: embedding 100k real images on 2 CPU cores takes
  longer than this benchmark may; embedding throughput is measured separately on real images);
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


def bench_images(tmp: Path, n_vectors: int, rng: np.random.Generator, n_real: int) -> Path:
    from fvqa.demo.world import make_world
    from fvqa.search.clip import ClipEmbedder
    from fvqa.search.config import LocalConfig
    from fvqa.search.local_index import LocalIndex, build_index, top_k_cosine

    # vector search at scale (synthetic unit vectors, 512-d as ViT-B-32)
    mat = rng.standard_normal((n_vectors, 512), dtype=np.float32)
    mat /= np.linalg.norm(mat, axis=1, keepdims=True)
    np.save(tmp / "vecs.npy", mat)
    mm = np.load(tmp / "vecs.npy", mmap_mode="r")
    mm = np.asarray(mm)
    qs = mat[rng.choice(n_vectors, size=100, replace=False)]
    ours, anchor, hit = [], [], 0
    for q in qs:
        s = time.perf_counter()
        idx, _ = top_k_cosine(mm, q, 20)
        ours.append(time.perf_counter() - s)
        s = time.perf_counter()
        full = np.argsort(-(mm @ q))[:20]
        anchor.append(time.perf_counter() - s)
        hit += int(idx[0] == full[0])
    assert hit == len(qs), "partial selection disagrees with the full sort"
    line(f"image_vector_search_p50_ms[{n_vectors}]", 1000 * pct(ours, 50), 1000 * pct(anchor, 50), unit="ms")
    line(f"image_vector_search_p95_ms[{n_vectors}]", 1000 * pct(ours, 95), 1000 * pct(anchor, 95), unit="ms")

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
    args = ap.parse_args()
    n_pass = args.passages or (20_000 if args.quick else 1_000_000)
    n_vec = args.vectors or (10_000 if args.quick else 100_000)
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        t0 = time.perf_counter()
        index = bench_text(tmp, n_pass, rng, n_queries=100 if args.quick else 200)
        bench_images(tmp, n_vec, rng, n_real=40 if args.quick else 200)
        bench_service(tmp, index, n_queries=50, seconds=3 if args.quick else 8)
        print(f"# total {time.perf_counter() - t0:.0f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
