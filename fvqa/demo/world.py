"""A small, seeded, offline "world" in the official file formats, so every stage runs without keys.

It holds fictional entities of the eight knowledge types, each with procedurally drawn images (varied,
never identical), an HTML page of facts, a MetaCLIP-style vocabulary with head and tail counts, a
caption pool, a Wiki6M-style page corpus with an image manifest (for the local search index) and
InfoSeek-format question files. A few deliberately broken inputs (a malformed JSON line, a missing
image, a corrupt file, HTML served as .jpg) show how rejects look.
"""

from __future__ import annotations

import html
import io
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

from fvqa.schema import KnowledgeType

HEAD_THRESHOLD = 20_000

# knowledge type -> (noun used in names and questions, unit noun for the numeric fact, unit)
CATEGORIES: dict[str, tuple[str, str, str]] = {
    KnowledgeType.Place: ("tower", "height", "metres"),
    KnowledgeType.Nature: ("finch", "wingspan", "centimetres"),
    KnowledgeType.People: ("sculptor", "number of works", "works"),
    KnowledgeType.Arts: ("sonata", "length", "minutes"),
    KnowledgeType.Industry: ("locomotive", "top speed", "km/h"),
    KnowledgeType.Science: ("crystal", "density", "g/cm3"),
    KnowledgeType.Entities: ("lantern", "weight", "kilograms"),
    KnowledgeType.Events: ("festival", "attendance", "visitors"),
}
COUNTRIES = [
    "France", "Japan", "Brazil", "Kenya", "Norway", "Peru", "India", "Canada", "Egypt", "Italy",
    "Chile", "Spain", "Vietnam", "Poland", "Mexico", "Ghana", "Turkey", "Greece", "Nepal", "Ireland",
]
SYLLABLES = ["ka", "lo", "mer", "vin", "dra", "sol", "te", "bri", "nor", "qua", "zen", "ul", "fa",
             "ri", "mo", "sta", "pel", "gra", "hu", "ix", "or", "ven", "ca", "thi"]
FILLER_ENTRIES = ["red", "blue sky", "portrait", "a", "1999", "12", "...", "!!", "x", "of the",
                  "street at night", "wooden table", "river bank", "mountain view", "old map"]


@dataclass
class Entity:
    """A fictional entity with facts that questions can be asked about."""

    entity_id: str
    name: str
    knowledge_type: str
    noun: str
    country: str
    year: int
    maker: str
    measure_name: str
    measure_value: float
    unit: str
    count: int  # MetaCLIP-style match count (popularity)

    @property
    def url(self) -> str:
        return f"http://demo.fvqa.local/wiki/{self.entity_id}"


def _name(rng: random.Random, used: set[str]) -> str:
    """A fresh name of 2-3 syllables; 4 once those run short (only paper-scale worlds get there)."""
    misses = 0
    while True:
        longest = 3 if misses < 20 else 4
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, longest))).capitalize()
        if word not in used:
            used.add(word)
            return word
        misses += 1


def _entities(rng: random.Random, n: int) -> list[Entity]:
    used: set[str] = set()
    types = list(CATEGORIES)
    out = []
    for i in range(n):
        ktype = types[i % len(types)]
        noun, measure, unit = CATEGORIES[ktype]
        # a heavy-tailed popularity: some head concepts (>= 20k matches), most in the tail, a few zero
        roll = rng.random()
        if roll < 0.3:
            count = rng.randint(HEAD_THRESHOLD, 400_000)
        elif roll < 0.95:
            count = int(10 ** rng.uniform(0, 4.2))
        else:
            count = 0
        out.append(
            Entity(
                entity_id=f"Q{100000 + i}",
                name=f"{_name(rng, used)} {noun}",
                knowledge_type=str(ktype),
                noun=noun,
                country=rng.choice(COUNTRIES),
                year=rng.randint(1700, 2020),
                maker=f"{_name(rng, used)} {_name(rng, used)}",
                measure_name=measure,
                measure_value=round(rng.uniform(5, 900), 1),
                unit=unit,
                count=count,
            )
        )
    return out


def render_image(entity: Entity, variant: int, size: int = 256) -> bytes:
    """Draw a distinct picture for (entity, variant): seeded shapes over a seeded gradient."""
    rng = random.Random(f"{entity.entity_id}-{variant}")
    base = random.Random(entity.entity_id)  # shared palette keeps an entity's images related
    c1 = tuple(base.randint(0, 255) for _ in range(3))
    c2 = tuple(base.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / size
        draw.line([(0, y), (size, y)], fill=tuple(int(a * (1 - t) + b * t) for a, b in zip(c1, c2, strict=True)))
    kind = list(CATEGORIES).index(entity.knowledge_type)
    for _ in range(rng.randint(4, 9)):
        x0, y0 = rng.randint(0, size - 40), rng.randint(0, size - 40)
        x1, y1 = x0 + rng.randint(20, 120), y0 + rng.randint(20, 120)
        color = tuple(rng.randint(0, 255) for _ in range(3))
        if kind % 3 == 0:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind % 3 == 1:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=color)
    if variant % 2:
        img = img.filter(ImageFilter.GaussianBlur(1.5))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def _page(entity: Entity) -> tuple[str, str, str]:
    """(summary, content, html) of an entity's page."""
    summary = (
        f"{entity.name} is a {entity.noun} from {entity.country}, known since {entity.year}."
    )
    content = " ".join(
        [
            summary,
            f"It was created by {entity.maker} in {entity.year}.",
            f"Its {entity.measure_name} is {entity.measure_value:g} {entity.unit}.",
            f"Visitors and researchers from {entity.country} often describe the {entity.noun} in detail.",
            f"The {entity.noun} appears in many photographs and catalogues.",
        ]
    )
    body = "".join(f"<p>{html.escape(s)}.</p>" for s in content.split(". ") if s)
    page = (
        f"<!doctype html><html><head><title>{html.escape(entity.name)}</title></head><body>"
        f"<nav>Home | Random | About</nav><article><h1>{html.escape(entity.name)}</h1>{body}</article>"
        f"<footer>Demo world page</footer></body></html>"
    )
    return summary, content, page


def _write_jsonl(path: Path, rows: list[dict] | list[str]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row, ensure_ascii=False))
            fh.write("\n")


def _infoseek_rows(entities: list[Entity], rng: random.Random) -> list[dict]:
    rows = []
    for i, e in enumerate(entities):
        qs = [
            (f"Which country is this {e.noun} from?", [e.country], [e.country], "String"),
            (f"In which year did this {e.noun} first appear?", [str(e.year)], [str(e.year)], "Time"),
            (
                f"What is the {e.measure_name} of this {e.noun} in {e.unit}?",
                [f"{e.measure_value:g}"],
                {"wikidata": e.measure_value,
                 "range": [round(e.measure_value * 0.9, 2), round(e.measure_value * 1.1, 2)]},
                "Numerical",
            ),
        ]
        for j, (question, answer, answer_eval, qtype) in enumerate(qs):
            if rng.random() < 0.5:
                continue
            rows.append(
                dict(
                    data_id=f"infoseek_train_{i:05d}{j}",
                    image_id=f"oven_{e.entity_id}_{j}",
                    question=question,
                    answer=answer,
                    answer_eval=answer_eval,
                    data_split="train",
                    entity_id=e.entity_id,
                    entity_text=e.name,
                    question_type=qtype,
                    variant=2 + j,
                )
            )
    return rows


def _filler_vocab(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """`n` distinct lowercase words and 2-3 word phrases: MetaCLIP-sized vocabularies for scale runs."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(max(1, n // 3))} - taken)
    out: list[str] = []
    seen = set(taken)
    for word in words[: n // 3]:
        seen.add(word)
        out.append(word)
    while len(out) < n:
        phrase = " ".join(rng.choices(words, k=rng.choice((2, 2, 3))))
        if phrase not in seen:
            seen.add(phrase)
            out.append(phrase)
    return out


def _filler_captions(rng: random.Random, vocab: list[str], n: int) -> list[dict]:
    """Alt-text-like captions over the filler vocabulary (punctuation included: matching normalises it)."""
    rows = []
    for i in range(n):
        words = rng.choices(vocab, k=rng.randint(4, 14))
        caption = " ".join(words) + rng.choice((".", "", "!", ", photo."))
        rows.append(dict(url=f"http://demo.fvqa.local/img/{i}.jpg", caption=caption,
                         page_url=f"http://demo.fvqa.local/p/{i}"))
    return rows


def _infoseek_rows_scaled(entities: list[Entity], n: int) -> Iterator[dict]:
    """Exactly `n` InfoSeek rows cycling over entities and question kinds (images shared per kind),
    for paper-scale runs (InfoSeek's train file has ~1M rows over far fewer images)."""
    phrasings = ("", " Answer briefly.", " Give the answer only.", " Please answer.")
    for k in range(n):
        e = entities[k % len(entities)]
        j = (k // len(entities)) % 3
        tail = phrasings[(k // (3 * len(entities))) % len(phrasings)]
        question, answer, answer_eval, qtype = (
            (f"Which country is this {e.noun} from?{tail}", [e.country], [e.country], "String"),
            (f"In which year did this {e.noun} first appear?{tail}", [str(e.year)], [str(e.year)], "Time"),
            (f"What is the {e.measure_name} of this {e.noun} in {e.unit}?{tail}", [f"{e.measure_value:g}"],
             {"wikidata": e.measure_value,
              "range": [round(e.measure_value * 0.9, 2), round(e.measure_value * 1.1, 2)]}, "Numerical"),
        )[j]
        yield dict(data_id=f"infoseek_train_{k:07d}", image_id=f"oven_{e.entity_id}_{j}", question=question,
                   answer=answer, answer_eval=answer_eval, data_split="train", entity_id=e.entity_id,
                   entity_text=e.name, question_type=qtype, variant=2 + j)


def _write_infoseek(root: Path, entities: list[Entity], rng: random.Random, n_rows: int | None) -> int:
    """The train file and its withkb/qtype companions, streamed (a 1M-row file never sits in memory),
    with one malformed line halfway and the last row's image missing, to show those rejects."""
    if n_rows is None:
        rows: Iterable[dict] = _infoseek_rows(entities, rng)
        n_rows = len(rows)  # type: ignore[arg-type]
    else:
        rows = _infoseek_rows_scaled(entities, n_rows)
    by_id = {e.entity_id: e for e in entities}
    base_keys = ("data_id", "image_id", "question", "answer", "answer_eval", "data_split")
    drawn: set[str] = set()
    last_image = None
    d = root / "infoseek"
    with (d / "infoseek_train.jsonl").open("w", encoding="utf-8") as main, \
            (d / "infoseek_train_withkb.jsonl").open("w", encoding="utf-8") as withkb, \
            (d / "infoseek_train_qtype.jsonl").open("w", encoding="utf-8") as qtype:
        for k, r in enumerate(rows):
            if k == n_rows // 2:
                main.write('{"data_id": "infoseek_train_broken", "question": \n')  # malformed line
            base = {key: r[key] for key in base_keys}
            main.write(json.dumps(base, ensure_ascii=False) + "\n")
            withkb.write(json.dumps({**base, "entity_id": r["entity_id"], "entity_text": r["entity_text"]},
                                    ensure_ascii=False) + "\n")
            qtype.write(json.dumps({"data_id": r["data_id"], "question_type": r["question_type"]}) + "\n")
            if r["image_id"] not in drawn:
                drawn.add(r["image_id"])
                (d / f"images/{r['image_id']}.jpg").write_bytes(render_image(by_id[r["entity_id"]], r["variant"]))
            last_image = r["image_id"]
        if n_rows == 0:
            main.write('{"data_id": "infoseek_train_broken", "question": \n')
    if last_image is not None:  # one row whose image is missing, to show the reject
        (d / f"images/{last_image}.jpg").unlink()
    return n_rows


def make_world(root: Path | str, *, seed: int = 0, n_entities: int = 240, vocab_size: int | None = None,
               captions: int | None = None, infoseek_rows: int | None = None) -> Path:
    """Write the demo world into `root` (deterministic for a seed) and return its path.

    `vocab_size`, `captions` and `infoseek_rows` grow the MetaCLIP vocabulary (filler entries, never
    counted, so concepts still come from the entities), the caption pool and the InfoSeek train file
    to those sizes, for scale benchmarks; left unset, the world is the small demo one."""
    root = Path(root)
    rng = random.Random(seed)
    entities = _entities(rng, n_entities)
    for sub in ("metaclip", "web/images", "web/pages", "infoseek/images"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    # MetaCLIP vocabulary (JSON list of strings) + counts (dict entry -> count)
    entries = [e.name for e in entities] + FILLER_ENTRIES
    counts = {e.name: e.count for e in entities}
    counts.update({f: rng.randint(0, 50_000) for f in FILLER_ENTRIES})
    scale_rng = random.Random(f"{seed}-scale")  # separate stream: the small world stays as it was
    filler: list[str] = []
    if vocab_size is not None and vocab_size > len(entries):
        filler = _filler_vocab(scale_rng, vocab_size - len(entries), set(entries))
        entries += filler
        counts.update(dict.fromkeys(filler, 0))
    (root / "metaclip/metadata.json").write_text(json.dumps(entries, ensure_ascii=False))
    (root / "metaclip/entry_counts.json").write_text(json.dumps(counts, ensure_ascii=False))

    # the local web: pages (Wiki6M-style), html files, images + manifest, a caption pool
    pages, manifest, pool = [], [], []
    for e in entities:
        summary, content, page_html = _page(e)
        (root / f"web/pages/{e.entity_id}.html").write_text(page_html, encoding="utf-8")
        pages.append(dict(wikidata_id=e.entity_id, wikipedia_title=e.name, wikipedia_content=content,
                          wikipedia_summary=summary, wikipedia_image_url=f"{e.url}/image0.jpg",
                          url=e.url, html_path=f"pages/{e.entity_id}.html"))
        for v in range(2):
            rel = f"images/{e.entity_id}_{v}.jpg"
            (root / "web" / rel).write_bytes(render_image(e, v))
            manifest.append(dict(path=rel, wikidata_id=e.entity_id, title=e.name,
                                 url=f"{e.url}/image{v}.jpg", page_url=e.url))
        for _ in range(min(6, 1 + e.count // 40_000)):
            pool.append(dict(url=f"{e.url}/image0.jpg", caption=f"A photo of the {e.name}, {e.country}.",
                             page_url=e.url))
    # broken candidates the crawler must reject with reasons
    (root / "web/images/corrupt.jpg").write_bytes(render_image(entities[0], 0)[:300])
    (root / "web/images/not_an_image.jpg").write_bytes(b"<html><body>404 not found</body></html>")
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(tiny, format="PNG")
    (root / "web/images/tiny.png").write_bytes(tiny.getvalue())
    for bad, e in (("corrupt.jpg", entities[0]), ("not_an_image.jpg", entities[1]), ("tiny.png", entities[2])):
        manifest.append(dict(path=f"images/{bad}", wikidata_id=e.entity_id, title=e.name,
                             url=f"{e.url}/{bad}", page_url=e.url))
    _write_jsonl(root / "web/pages.jsonl", pages)
    _write_jsonl(root / "web/images.jsonl", manifest)
    if captions is not None and captions > len(pool):
        pool += _filler_captions(scale_rng, filler or FILLER_ENTRIES, captions - len(pool))
    pq.write_table(pa.Table.from_pylist(pool), root / "web/caption_pool.parquet")

    # InfoSeek-format files
    n_rows = _write_infoseek(root, entities, rng, infoseek_rows)

    (root / "entities.jsonl").write_text(
        "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in entities), encoding="utf-8"
    )
    info = dict(seed=seed, n_entities=n_entities, n_infoseek=n_rows, n_pages=len(pages),
                n_images=len(manifest), head_threshold=HEAD_THRESHOLD)
    if vocab_size is not None or captions is not None or infoseek_rows is not None:
        info.update(n_vocab=len(entries), n_captions=len(pool))
    (root / "world.json").write_text(json.dumps(info, indent=2))
    return root
