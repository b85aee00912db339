"""Replay of upstream's image-search cache pickles, read with an unpickler that cannot run code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
from PIL import Image

from fvqa.protocol import render_image_results
from fvqa.protocol.unpickle import UnsafePickleError, safe_load
from fvqa.search.config import SearchConfig
from fvqa.search.tools import make_search_tools
from fvqa.search.types import SearchError


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cache(path: Path, protocol: int) -> Path:
    data = {
        "fvqa_train_1": {
            "tool_returned_web_title_list": [f"Lighthouse page {i}" for i in range(6)],
            "tool_returned_images_urls": [f"https://img.example/{i}.jpg" for i in range(6)],
            "tool_returned_images": [Image.new("RGB", (30, 30), (40 * i, 0, 0)) for i in range(6)],
        },
        "fvqa_train_2": {
            "tool_returned_web_title_list": ["Only a title"],
            "tool_returned_images_urls": ["https://img.example/x.jpg"],
        },
        "fvqa_train_bad": {"something": "else"},
    }
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_well_formed_cache_replays_by_data_id(tmp_path: Path, protocol: int) -> None:
    path = _cache(tmp_path / "fvqa_train_image_search_results_cache.pkl", protocol)
    cfg = SearchConfig.model_validate({"backend": "replay", "replay": {"paths": [str(path)]}})
    tools = make_search_tools(cfg, cache_dir=tmp_path / "c")
    hits = tools.image_search(None, data_id="fvqa_train_1")
    assert [h.title for h in hits] == [f"Lighthouse page {i}" for i in range(5)]
    text, images = render_image_results(hits)
    assert len(images) == 5 and images[2].getpixel((5, 5))[0] in range(75, 86)  # JPEG-ish red 80
    only = tools.image_search(None, data_id="fvqa_train_2")
    assert only[0].title == "Only a title" and only[0].thumbnail is None
    with pytest.raises(SearchError, match="no cached image-search result for data_id 'fvqa_test_9'"):
        tools.image_search(None, data_id="fvqa_test_9")
    with pytest.raises(SearchError, match="has no 'tool_returned_web_title_list'"):
        tools.image_search(None, data_id="fvqa_train_bad")


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"evil{protocol}.pkl"
        path.write_bytes(pickle.dumps({"fvqa_train_1": {"x": Evil(marker)}}, protocol=protocol))
        with pytest.raises(UnsafePickleError, match=r"refused to load global (posix|os|nt)\.system"):
            safe_load(path)
    assert not marker.exists()
    cfg = SearchConfig.model_validate({"backend": "replay", "replay": {"paths": [str(tmp_path / "evil2.pkl")]}})
    with pytest.raises(UnsafePickleError):
        make_search_tools(cfg, cache_dir=tmp_path / "c")
    assert not marker.exists()


def test_garbage_and_wrong_shape_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(UnsafePickleError, match="not a readable pickle"):
        safe_load(tmp_path / "junk.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    cfg = SearchConfig.model_validate({"backend": "replay", "replay": {"paths": [str(tmp_path / "list.pkl")]}})
    with pytest.raises(Exception, match="expected a dict keyed by data_id"):
        make_search_tools(cfg, cache_dir=tmp_path / "c")
