"""Small hostile inputs must not cost much: pickles that allocate, open files or render huge strings,
and YAML alias bombs / duplicated keys, are each refused with one clear line, quickly."""

from __future__ import annotations

import io
import pickle
import time
from pathlib import Path

import pytest
from PIL import Image

from fvqa.errors import ConfigError
from fvqa.protocol.unpickle import UnsafePickleError, safe_loads

# ------------------------------------------------------------------------------------------------
# pickles
# ------------------------------------------------------------------------------------------------

GIB = 2**30


def _refused(data: bytes, match: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(UnsafePickleError, match=match) as info:
        safe_loads(data)
    assert time.perf_counter() - t0 < 5
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data", [
    b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00@\x85R.",  # bytearray(2**30), 30 bytes
    b"cbuiltins\nbytes\n(J\x00\x00\x00@tR.",  # bytes(2**30)
    b"ccopy_reg\n_reconstructor\n(c__builtin__\nbytearray\nc__builtin__\nbytearray\nJ\x00\x00\x00@tR.",
])
def test_no_buffer_from_an_int(data: bytes) -> None:
    assert len(data) < 100
    _refused(data, r"refused (bytearray|bytes|copyreg)")


def test_str_of_a_self_sharing_list_is_refused() -> None:
    # str() of [[["x"*100]*100]*100] (built through the memo) would be ~100 MB from ~700 bytes
    data = (b"\x80\x02cbuiltins\nstr\n" b"]q\x00(X\x64\x00\x00\x00" + b"x" * 100 + b"q\x01" + b"h\x01" * 99 + b"e0"
            b"]q\x02(" + b"h\x00" * 100 + b"e0" b"]q\x03(" + b"h\x02" * 100 + b"e" b"\x85R.")
    assert len(data) < 1_000 and len(pickle.loads(data[:-3] + b".")[0][0]) == 100
    _refused(data, r"refused str\(\) of a list")


def test_repeated_copies_of_one_big_list_hit_the_budget() -> None:
    n, copies = 100_000, 400  # each list(L) would book 800 KB: 320 MB from ~2.5 MB of pickle
    data = (b"\x80\x02]q\x00(" + b"K\x01" * n + b"e]q\x01(" + b"cbuiltins\nlist\nq\x02h\x00\x85R"
            + b"h\x02h\x00\x85R" * (copies - 1) + b"e.")
    _refused(data, r"builds more than \d+ bytes")


def test_a_pickle_cannot_open_a_local_image_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(secret)
    for module, name in [("PIL.PngImagePlugin", "PngImageFile"), ("PIL.ImageFile", "ImageFile"),
                         ("PIL.JpegImagePlugin", "JpegImageFile")]:
        data = f"c{module}\n{name}\n(V{secret}\ntR.".encode()
        with pytest.raises(UnsafePickleError, match="refused"):
            safe_loads(data)


def test_an_image_state_cannot_ask_for_a_huge_buffer() -> None:
    data = pickle.dumps(Image.new("L", (2, 2)), protocol=2).replace(b"K\x02K\x02\x86", b"M\x00\xffM\x00\xff\x86")
    _refused(data, r"refused a 65280x65280 L PIL image")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_images_and_plain_data_still_load(protocol: int) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    buf.seek(0)
    png = Image.open(buf)
    png.load()
    data = {"imgs": [png, Image.new("P", (4, 4), 3)], "b": b"xx\xff", "ba": bytearray(b"abc"), "s": {1, 2},
            "f": frozenset({3}), "z": 1 + 2j, "e": b""}
    out = safe_loads(pickle.dumps(data, protocol=protocol))
    assert out["imgs"][0].size == (40, 30) and out["imgs"][0].convert("RGB").getpixel((0, 0)) == (1, 2, 3)
    assert out["imgs"][1].mode == "P"
    assert {k: v for k, v in out.items() if k != "imgs"} == {k: v for k, v in data.items() if k != "imgs"}


def test_replay_refuses_non_string_titles_instead_of_rendering_them(tmp_path: Path) -> None:
    from fvqa.search.replay import ReplayBackend
    from fvqa.search.types import QueryImage, SearchError

    inner = ["x" * 100] * 100
    nested = [[inner] * 100] * 100  # str() of this is ~100 MB; the pickle is tiny thanks to the memo
    path = tmp_path / "cache.pkl"
    path.write_bytes(pickle.dumps({
        "bomb": {"tool_returned_web_title_list": [nested]},
        "long": {"tool_returned_web_title_list": ["t" * 10_000], "tool_returned_images_urls": ["u" * 10_000]},
    }, protocol=4))
    assert path.stat().st_size < 30_000
    backend = ReplayBackend([path])
    with pytest.raises(SearchError, match="other than strings"):
        backend.image_search(QueryImage(data=b"", sha256="", data_id="bomb"), 5)
    hit = backend.image_search(QueryImage(data=b"", sha256="", data_id="long"), 5)[0]
    assert len(hit.title) == 1_000 and len(hit.url) == 4_096


# ------------------------------------------------------------------------------------------------
# YAML
# ------------------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    from fvqa.configfile import read_yaml

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert len(BOMB) < 500
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bomb\.yaml.*aliases expand to more than"):
        read_yaml(path)
    assert time.perf_counter() - t0 < 5


def test_small_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    from fvqa.configfile import read_yaml

    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\nlist: [*b, *b]\n")
    assert read_yaml(path) == {"base": {"x": 1, "y": 2}, "other": {"x": 1, "y": 3},
                               "list": [{"x": 1, "y": 2}, {"x": 1, "y": 2}]}


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    from fvqa.configfile import read_yaml

    path = tmp_path / "rec.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="alias refers to a node that contains it"):
        read_yaml(path)


def test_duplicated_key_names_the_key_and_line(tmp_path: Path) -> None:
    from fvqa.config import load_config

    path = tmp_path / "dup.yaml"
    path.write_text("workspace: w\ncrawl:\n  max_side: 512\n  max_side: 256\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml at line 4, column 3: duplicate key 'max_side' "
                                          r"\(first given at line 3\)"):
        load_config(path)


def test_unparsable_set_value_is_one_line() -> None:
    from fvqa.config import load_config

    for value in ["[", "[\udcff", "\udcff"]:  # \udcff: a non-UTF-8 byte in argv
        with pytest.raises(ConfigError, match=r"--set workspace: the value is not valid YAML") as info:
            load_config(None, [f"workspace={value}"])
        assert "\n" not in str(info.value)


def test_cli_config_show_on_a_bomb_exits_2_with_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fvqa.cli import app

    (tmp_path / "bomb.yaml").write_text(BOMB)
    res = CliRunner().invoke(app, ["config", "show", "-c", str(tmp_path / "bomb.yaml")])
    assert isinstance(res.exception, ConfigError) and "aliases expand" in str(res.exception)
