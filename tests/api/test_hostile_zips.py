"""Hostile dataset zips: corrupt streams, lying directories, many small bombs, slow and busy uploads.

Each is refused with a 4xx naming the entry (or "*" for the archive), before the bytes it
would cost are spent; property tests (hypothesis) mutate real zips and build odd ones: the
checker answers with a dataset or a 4xx, never another exception, and never writes more
than the budget it checked.
"""
from __future__ import annotations

import dataclasses
import io
import struct
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from tests.conftest import running_app
from tests.api.conftest import error_of, make_zip
from tests.api.test_datasets import assert_nothing_stored, upload
from worker import zipcheck
from worker.errors import KilnError


def _entry_data_offset(data: bytes, name: str) -> int:
    """Where the compressed bytes of ``name`` start (after its local header)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo(name)
    n, m = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + n + m


def _corrupt_entry(entries: dict[str, bytes], method: int, name: str = "1/broken.png") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, value in entries.items():
            zf.writestr(key, value)
        zf.writestr(zipfile.ZipInfo(name), bytes(range(256)) * 40, compress_type=method)
    data = bytearray(buf.getvalue())
    start = _entry_data_offset(bytes(data), name) + (9 if method == zipfile.ZIP_LZMA else 0)  # past LZMA's props
    data[start:start + 32] = b"\xff" * 32
    return bytes(data)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA, zipfile.ZIP_BZIP2],
                         ids=["deflate", "lzma", "bzip2"])
def test_corrupt_compressed_entry_is_422_naming_it(client, api_settings, digits_entries, method):
    err = error_of(upload(client, _corrupt_entry(digits_entries, method)), 422)
    assert err["code"] == "invalid_dataset"
    [detail] = [d for d in err["details"] if d["entry"] == "1/broken.png"]
    assert "cannot be extracted" in detail["message"]
    assert_nothing_stored(client, api_settings)


def test_zip64_end_record_spanning_disks_is_422(client, api_settings, digits_entries):
    data = make_zip(digits_entries)
    end = data.rfind(b"PK\x05\x06")
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, 0, 2)  # a zip64 locator: "2 disks in all"
    err = error_of(upload(client, data[:end] + locator + data[end:]), 422)
    assert err["code"] == "not_a_zip" and "disk" in err["message"]
    assert_nothing_stored(client, api_settings)


def test_central_directory_outside_the_file_is_422(client, digits_entries):
    data = bytearray(make_zip(digits_entries))
    end = bytes(data).rfind(b"PK\x05\x06")
    data[end + 12:end + 16] = (10**9).to_bytes(4, "little")  # size of the central directory
    err = error_of(upload(client, bytes(data)), 422)
    assert err["code"] == "not_a_zip" and "outside the file" in err["message"]


def test_a_lying_entry_count_is_caught_before_zipfile_reads_the_directory(client, api_settings, monkeypatch):
    """The end record says 3 entries; the directory holds 1200 records (the limit allows 1100).
    zipfile would build an object for each whatever the count says: it must never be asked."""
    entries = {f"{i % 2}/{i}.png": b"" for i in range(1200)}
    data = bytearray(make_zip(entries))
    end = bytes(data).rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = struct.pack("<HH", 3, 3)
    monkeypatch.setattr(zipcheck.zipfile, "ZipFile", lambda *a, **k: pytest.fail("zipfile.ZipFile was called"))
    err = error_of(upload(client, bytes(data)), 422)
    assert "central directory holds more than" in err["message"] and "says 3" in err["message"]
    assert_nothing_stored(client, api_settings)


def test_many_small_entries_cannot_bomb_the_scratch_disk(client, api_settings, digits_entries, monkeypatch):
    """40 entries of 1 MiB of zeros each (each under the per-entry ratio floor) unpack to 40 MiB from
    ~40 KB: the total ratio refuses it before a byte is inflated (with the floor at 8 MiB here, as the
    test's file limit is 50; 2000 such entries would ask 2 GiB of the default settings)."""
    monkeypatch.setattr(zipcheck, "extract", lambda *a, **k: pytest.fail("extract was called"))
    monkeypatch.setattr(zipcheck, "TOTAL_RATIO_FLOOR", 8 << 20)
    bombs = {f"{i % 2}/zero{i}.bmp": bytes(1 << 20) for i in range(40)}
    data = make_zip({**digits_entries, **bombs})
    assert len(data) < 200_000
    err = error_of(upload(client, data), 422)
    assert err["details"][0]["entry"] == "*" and "ratio" in err["message"]
    assert_nothing_stored(client, api_settings)


def test_the_total_ratio_floor_lets_small_flat_datasets_through(api_settings, digits_entries, tmp_path):
    """Flat-colour images compress a thousandfold; a dataset under TOTAL_RATIO_FLOOR is fine."""
    from PIL import Image

    flat = io.BytesIO()
    Image.new("L", (500, 500), color=7).save(flat, "BMP")  # 250 KB that deflates to a few hundred bytes
    entries = {**digits_entries, **{f"{i % 3}/flat{i}.bmp": flat.getvalue() for i in range(20)}}
    tree, counts, size = zipcheck.check_and_extract(io.BytesIO(make_zip(entries)), api_settings, tmp_path)
    assert sum(counts.values()) == 29 and size > 5_000_000


def test_other_image_formats_are_refused(client, digits_entries):
    """Only ml.images.FORMATS are decoded: a GIF (or EPS, which runs Ghostscript) named .png is not one."""
    from PIL import Image

    gif = io.BytesIO()
    Image.new("L", (8, 8)).save(gif, "GIF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    err = error_of(upload(client, make_zip({**digits_entries, "1/a.png": gif.getvalue(), "1/b.png": eps})), 422)
    problems = {d["entry"]: d["message"] for d in err["details"]}
    assert set(problems) == {"1/a.png", "1/b.png"} and all("not an image" in m for m in problems.values())


def test_busy_process_answers_429_before_reading_the_body(app, client, api_settings, digits_entries):
    slots = zipcheck.upload_slots(api_settings)
    held = [slots.slot() for _ in range(slots.workers)]
    for cm in held:
        cm.__enter__()
    try:
        resp = upload(client, make_zip(digits_entries))
        err = error_of(resp, 429)
        assert err["code"] == "too_many_uploads" and int(resp.headers["Retry-After"]) > 0
    finally:
        for cm in held:
            cm.__exit__(None, None, None)
    assert upload(client, make_zip(digits_entries)).status_code == 201


def test_a_check_past_its_time_limit_stops_and_is_413(api_settings, digits_entries, monkeypatch):
    """dataset_check_timeout_s is the knob under test."""
    stopped = threading.Event()

    def slow_verify(plan, tree, settings, stop=None):
        assert stop is not None and stop.wait(10), "the pool thread was never told to stop"
        stopped.set()
        zipcheck._check_stop(stop)

    monkeypatch.setattr(zipcheck, "verify_images", slow_verify)
    with running_app(dataclasses.replace(api_settings, dataset_check_timeout_s=0.3)) as app:
        client = app.test_client()
        err = error_of(upload(client, make_zip(digits_entries)), 413)
        assert err["code"] == "upload_too_slow" and stopped.is_set()
        assert_nothing_stored(client, api_settings)
    incoming = Path(api_settings.storage) / ".incoming"
    assert not any(incoming.iterdir())  # the scratch folder went with it


# ---------------------------------------------------------------- properties (hypothesis)

SMALL = dict(max_dataset_files=20, max_dataset_unpacked_bytes=4 << 20, max_compression_ratio=200.0,
             max_image_pixels=512 * 512)
PROPS = hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _check(settings, data: bytes):
    """check_and_extract on ``data``: ("ok", counts, size, written) or ("refused", status, None, written)."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            tree, counts, size = zipcheck.check_and_extract(io.BytesIO(data), settings, Path(scratch))
            outcome = ("ok", counts, size)
        except KilnError as exc:
            assert 400 <= exc.status < 500, (exc.status, exc.message)
            assert exc.details, exc.message  # every refusal names an entry (or "*")
            outcome = ("refused", exc.status, None)
        written = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
    return (*outcome, written)


def _budget(settings, data: bytes) -> int:
    return min(settings.max_dataset_unpacked_bytes,
               max(zipcheck.TOTAL_RATIO_FLOOR, int(settings.max_compression_ratio * len(data))))


@pytest.fixture(scope="module")
def base_zip():
    from sklearn.datasets import load_digits

    from tests.api.conftest import digit_png

    images = load_digits().images
    return make_zip({f"{c}/{i}.png": digit_png(images[i]) for c in "ab" for i in range(3)})


@PROPS
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_any_mutated_zip_is_a_dataset_or_a_4xx(base_zip, tmp_path_factory, edits, cut):
    settings = _settings(tmp_path_factory)
    data = bytearray(base_zip)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[:cut % (len(data) + 1)]
    status, _, size, written = _check(settings, bytes(data))
    assert written <= _budget(settings, bytes(data))
    if status == "ok":
        assert size <= written


NAMES = st.one_of(
    st.sampled_from(["a/x.png", "b/y.png", "a/", "../a/x.png", "/abs.png", "a\\b.png", "a/../../x.png",
                     "__MACOSX/a/._x.png", "a/.hidden.png", "c:/x.png", "a/b/c.png", "a/x.gif", "x.png"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
)
ENTRY = st.tuples(NAMES, st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                          zipfile.ZIP_LZMA]),
                  st.one_of(st.binary(max_size=64), st.sampled_from(["png", "zeros", "gif"])))


def _content(kind, png: bytes) -> bytes:
    if kind == "png":
        return png
    if kind == "zeros":
        return bytes(2 << 20)  # deflates a thousandfold
    if kind == "gif":
        return b"GIF89a" + bytes(20)
    return kind


@PROPS
@given(entries=st.lists(ENTRY, max_size=12))
def test_any_built_zip_is_a_dataset_or_a_4xx(base_zip, tmp_path_factory, entries):
    settings = _settings(tmp_path_factory)
    with zipfile.ZipFile(io.BytesIO(base_zip)) as zf:
        png = zf.read(zf.namelist()[0])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        seen = set()
        for name, method, kind in entries:
            if name in seen:
                continue
            seen.add(name)
            zf.writestr(zipfile.ZipInfo(name), _content(kind, png), compress_type=method)
    data = buf.getvalue()
    status, counts, size, written = _check(settings, data)
    assert written <= _budget(settings, data)
    if status == "ok":
        assert len(counts) >= 2 and all(n > 0 for n in counts.values())


def _settings(factory):
    from configs import Settings

    return dataclasses.replace(Settings.for_home(factory.mktemp("zips") / "var"), **SMALL)
