"""POST/GET /v1/datasets: a real ImageFolder zip is stored; every unsafe zip is refused, storing nothing."""
from __future__ import annotations

import dataclasses
import io
import stat
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.api.conftest import error_of, make_zip


def upload(client, data: bytes, name: str | None = None, filename: str = "digits.zip"):
    form = {"file": (io.BytesIO(data), filename)}
    if name is not None:
        form["name"] = name
    return client.post("/v1/datasets", data=form, content_type="multipart/form-data")


def assert_nothing_stored(client, settings) -> None:
    """No files under storage datasets/, no row in the datasets table, an empty listing."""
    root = Path(settings.storage) / "datasets"
    assert not root.exists() or not any(root.iterdir()), list(root.rglob("*"))
    engine = sa.create_engine(settings.db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM datasets")).scalar() == 0
    finally:
        engine.dispose()
    assert client.get("/v1/datasets").get_json()["datasets"] == []


@pytest.mark.parametrize("top", ["", "digits/"])
def test_upload_imagefolder_zip(client, api_settings, digits_entries, top):
    resp = upload(client, make_zip(digits_entries, top), name="digits-small")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    ds = resp.get_json()
    assert set(ds) >= {"id", "name", "classes", "counts", "num_images", "size", "created_at"}
    assert ds["name"] == "digits-small" and ds["classes"] == ["0", "1", "2"]
    assert ds["counts"] == {"0": 4, "1": 3, "2": 2} and ds["num_images"] == 9
    assert ds["size"] == sum(len(v) for v in digits_entries.values())
    assert resp.headers["Location"].endswith(f"/v1/datasets/{ds['id']}")
    stored = Path(api_settings.storage) / "datasets" / ds["id"]
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*.png")) == sorted(digits_entries)
    assert client.get(f"/v1/datasets/{ds['id']}").get_json() == ds
    assert [d["id"] for d in client.get("/v1/datasets").get_json()["datasets"]] == [ds["id"]]
    # an uploaded dataset id is a valid data.dataset of a train job
    job = client.post("/v1/jobs", json={"kind": "train", "config": {"data": {"dataset": ds["id"]}}})
    assert job.status_code == 202, job.get_data(as_text=True)


def test_macos_junk_is_ignored_and_name_defaults(client, digits_entries):
    entries = {**digits_entries, "__MACOSX/0/._img0.png": b"junk", ".DS_Store": b"junk"}
    resp = upload(client, make_zip(entries), filename="my digits.zip")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.get_json()["num_images"] == 9 and resp.get_json()["name"]


def _symlink_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("1/link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _bomb_zip(entries: dict[str, bytes], megabytes: int = 200) -> bytes:
    """A real bomb: ``megabytes`` of zeros deflate to ~1/1000 of that; written in chunks (small memory)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        with zf.open("1/bomb.png", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(megabytes):
                f.write(block)
    return buf.getvalue()


def _lying_header_zip(entries: dict[str, bytes]) -> bytes:
    """The central directory claims 10 bytes for an entry that inflates to 3 MB."""
    data = bytearray(make_zip({**entries, "1/liar.png": bytes(3 << 20)}))
    cd = bytes(data).rfind(b"PK\x01\x02")  # the last central-directory header is the liar's
    data[cd + 24:cd + 28] = (10).to_bytes(4, "little")  # uncompressed size field
    return bytes(data)


def _truncated_png(entries):
    good = entries["0/" + sorted(k[2:] for k in entries if k.startswith("0/"))[0]]
    return good[: len(good) // 2]


BAD_ZIPS = {
    "dotdot": (lambda e: make_zip({**e, "../evil.png": e[next(iter(e))]}), "../evil.png", "escapes"),
    "nested dotdot": (lambda e: make_zip({**e, "0/../../evil.png": b"x"}), "0/../../evil.png", "escapes"),
    "absolute": (lambda e: make_zip({**e, "/tmp/evil.png": b"x"}), "/tmp/evil.png", "absolute"),
    "symlink": (_symlink_zip, "1/link.png", "symbolic link"),
    "bomb": (_bomb_zip, "1/bomb.png", "compression ratio"),
    "lying header": (_lying_header_zip, "1/liar.png", ""),
    "non-image extension": (lambda e: make_zip({**e, "1/notes.txt": b"hello"}), "1/notes.txt", "not an image"),
    "text named png": (lambda e: make_zip({**e, "1/fake.png": b"hello, not a png"}), "1/fake.png", "not an image"),
    "truncated image": (lambda e: make_zip({**e, "1/cut.png": _truncated_png(e)}), "1/cut.png", "truncated"),
    "one class": (lambda e: make_zip({k: v for k, v in e.items() if k.startswith("0/")}), "*", "at least 2"),
    "empty class": (lambda e: make_zip({**e, "3/": b""}), "3/", "no images"),
    "too deep": (lambda e: make_zip({**e, "1/sub/deep.png": e[next(iter(e))]}), "1/sub/deep.png", "<class>/<image>"),
    "top-level file": (lambda e: make_zip({**e, "loose.png": e[next(iter(e))]}), "loose.png", "<class>/<image>"),
}


@pytest.mark.parametrize("case", list(BAD_ZIPS))
def test_bad_zip_is_refused_naming_the_entry(client, api_settings, digits_entries, case):
    build, entry, word = BAD_ZIPS[case]
    err = error_of(upload(client, build(digits_entries)), 422)
    assert err["code"] == "invalid_dataset"
    assert entry in {d["entry"] for d in err["details"]}, err
    assert word in err["message"] + str(err["details"])
    assert_nothing_stored(client, api_settings)


def test_pixel_bomb_image_is_refused(client, api_settings, digits_entries):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (2000, 2000)).save(buf, "PNG")  # 4M pixels > the test limit of 512*512, a few KB
    err = error_of(upload(client, make_zip({**digits_entries, "1/huge.png": buf.getvalue()})), 422)
    assert err["details"][0]["entry"] == "1/huge.png" and "pixels" in err["details"][0]["message"]
    assert_nothing_stored(client, api_settings)


def test_limits_on_total_size_and_file_count(app, client, api_settings, digits_entries):
    from web import create_app

    small = dataclasses.replace(api_settings, max_dataset_unpacked_bytes=500, max_dataset_files=5)
    other = create_app(small)
    try:
        err = error_of(upload(other.test_client(), make_zip(digits_entries)), 422)
        assert "limit is 5" in err["message"]
        small = dataclasses.replace(small, max_dataset_files=50)
        other.extensions["kiln"].close()
        other = create_app(small)
        err = error_of(upload(other.test_client(), make_zip(digits_entries)), 422)
        assert "limit is 500" in err["message"]
    finally:
        other.extensions["kiln"].close()
    assert_nothing_stored(client, api_settings)


def test_too_many_entries_refused_before_parsing(client, api_settings, digits_entries):
    many = {**digits_entries, **{f"d{i}/": b"" for i in range(2 * api_settings.max_dataset_files + 1001)}}
    err = error_of(upload(client, make_zip(many)), 422)
    assert "entries" in err["message"]
    assert_nothing_stored(client, api_settings)


@pytest.mark.parametrize("data, status", [(b"this is not a zip at all", 422), (b"PK\x03\x04broken", 422)])
def test_non_zip_upload(client, api_settings, data, status):
    err = error_of(upload(client, data), status)
    assert "zip" in err["message"]
    assert_nothing_stored(client, api_settings)


def test_upload_request_errors(client, api_settings, digits_entries):
    assert error_of(client.post("/v1/datasets", data={"other": "x"}, content_type="multipart/form-data"),
                    400)["code"] == "missing_file"
    assert error_of(client.post("/v1/datasets", json={"file": "x"}), 415)
    err = error_of(upload(client, make_zip(digits_entries), name="../bad name"), 422)
    assert err["details"][0]["field"] == "name"
    big = io.BytesIO(bytes(api_settings.max_request_bytes + 1))
    assert error_of(client.post("/v1/datasets", data={"file": (big, "big.zip")},
                                content_type="multipart/form-data"), 413)
    assert_nothing_stored(client, api_settings)


def test_raw_zip_body_upload(client, digits_entries):
    resp = client.post("/v1/datasets?name=raw", data=make_zip(digits_entries), content_type="application/zip")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.get_json()["name"] == "raw"


def test_unknown_dataset_is_404(client):
    assert error_of(client.get("/v1/datasets/" + "f" * 32), 404)["code"] == "not_found"
    assert error_of(client.delete("/v1/datasets"), 405)


@pytest.mark.parametrize("multipart", [False, True])
def test_chunked_upload_over_the_limit_is_413(app, client, api_settings, multipart):
    """No Content-Length (chunked): the stream is cut at max_request_bytes and answered 413."""
    from werkzeug.test import EnvironBuilder

    from tests.api.test_jobs import _call

    payload = bytes(api_settings.max_request_bytes + 4096)
    if multipart:
        builder = EnvironBuilder(path="/v1/datasets", method="POST",
                                 data={"file": (io.BytesIO(payload), "big.zip")})
    else:
        builder = EnvironBuilder(path="/v1/datasets", method="POST", data=payload, content_type="application/zip")
    env = builder.get_environ()
    body = env["wsgi.input"].read()
    env.pop("CONTENT_LENGTH", None)
    env.update({"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True, "HTTP_TRANSFER_ENCODING": "chunked"})
    status, out = _call(app, env)
    assert status.startswith("413"), (status, out[:300])
    assert b'"payload_too_large"' in out
    assert_nothing_stored(client, api_settings)
