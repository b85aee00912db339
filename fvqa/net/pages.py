"""Source pages -> (title, main text) with trafilatura, for the question generator."""

from __future__ import annotations

import html as html_lib
import re

_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def decode_html(data: bytes, content_type: str | None = None) -> str:
    """Bytes -> text using the declared charset, else UTF-8, else Latin-1 (never fails)."""
    charset = None
    if content_type and "charset=" in content_type.lower():
        charset = content_type.lower().split("charset=", 1)[1].split(";")[0].strip().strip('"')
    for enc in (charset, "utf-8"):
        if enc:
            try:
                return data.decode(enc)
            except (LookupError, UnicodeDecodeError):
                continue
    return data.decode("latin-1")


def extract_page(html: str, *, max_chars: int = 20_000) -> tuple[str | None, str | None]:
    """(title, main text) of an HTML page; None where nothing could be extracted."""
    import trafilatura

    try:
        text = trafilatura.extract(html, include_comments=False, favor_recall=True)
        meta = trafilatura.extract_metadata(html)
    except Exception:  # noqa: BLE001 - trafilatura/lxml raise assorted errors on hostile markup
        text, meta = None, None
    title = getattr(meta, "title", None) if meta is not None else None
    if not title:
        m = _TITLE.search(html[:200_000])
        title = html_lib.unescape(m.group(1)).strip() if m else None
    return title or None, (text[:max_chars] if text else None)
