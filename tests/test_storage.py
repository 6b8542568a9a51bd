"""storage.Location: one code path for a local folder and an S3 bucket (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pickle

import pytest

from robint_ray.storage import Location, copy_tree


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return Location(tmp_path / "out")
    return Location(request.getfixturevalue("s3_server")() + "/run")


def test_write_read_list_delete(root):
    assert not root.exists() and root.list() == []
    (root / "a" / "result.json").write_json({"x": 1})
    (root / "b.txt").write_text("hello")
    assert (root / "a" / "result.json").read_json() == {"x": 1}
    assert (root / "b.txt").read_text() == "hello" and (root / "b.txt").is_file()
    assert root.exists() and (root / "a").exists() and not (root / "a").is_file()
    assert root.list() == ["a", "b.txt"]  # no temporary file is left beside the targets
    (root / "a").delete()
    assert root.list() == ["b.txt"] and not (root / "a" / "result.json").exists()
    with pytest.raises(FileNotFoundError):
        (root / "missing").read_bytes()


def test_overwrite_is_whole_and_pickles_as_its_uri(root):
    target = root / "x.bin"
    target.write_bytes(b"1" * 1000)
    target.write_bytes(b"2" * 10)
    assert target.read_bytes() == b"2" * 10
    back = pickle.loads(pickle.dumps(target))
    assert back == target and back.read_bytes() == b"2" * 10


def test_local_dir_uploads_and_local_copy_downloads(root, tmp_path):
    with (root / "figs").local_dir() as d:
        (d / "sub").mkdir()
        (d / "sub" / "p.png").write_bytes(b"png")
        (d / "q.txt").write_text("q")
    assert (root / "figs" / "sub" / "p.png").read_bytes() == b"png"
    with (root / "figs").local_copy() as local:
        assert (local / "sub" / "p.png").read_bytes() == b"png" and (local / "q.txt").read_text() == "q"
    copy_tree(root / "figs", Location(tmp_path / "copy"))
    assert (tmp_path / "copy" / "sub" / "p.png").read_bytes() == b"png"


def test_a_failed_block_uploads_nothing(root):
    with pytest.raises(ZeroDivisionError):
        with (root / "w.bin").open_write() as f:
            f.write(b"half")
            1 / 0
    assert not (root / "w.bin").exists()
    with (root / "w.bin").open_write() as f:
        f.write(b"whole")
    assert (root / "w.bin").read_bytes() == b"whole"


def test_paths_and_uris():
    assert Location("s3://b/p/").uri == "s3://b/p"
    assert str(Location("s3://b/p") / "q" / "r.json") == "s3://b/p/q/r.json"
    assert Location("s3://b/p/q").parent == Location("s3://b/p") and Location("s3://b/p/q").name == "q"
    assert not Location("s3://b").is_local and Location("rel/dir").is_local
    assert Location("rel/dir").local_path.is_absolute()


def test_ray_train_storage_is_the_same_store(s3_server):
    uri = s3_server()
    path, filesystem = Location(uri + "/run").for_ray_train()
    assert path == uri.removeprefix("s3://") + "/run" and type(filesystem).__name__ == "S3FileSystem"
    filesystem.create_dir(path + "/x")
    with filesystem.open_output_stream(path + "/x/f") as f:
        f.write(b"ok")
    assert (Location(uri) / "run" / "x" / "f").read_bytes() == b"ok"


@pytest.mark.ray
def test_preflight_on_one_node(ray_local, s3_server, tmp_path):
    """A single node checks in-process: a writable place passes at once and keeps nothing of the check;
    a bucket that does not exist fails with one line that names the location."""
    import time

    from robint_ray.errors import InputError
    from robint_ray.storage import preflight

    started = time.perf_counter()
    preflight(tmp_path / "new" / "run")
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "new").exists()  # the folders the check made are gone again
    bucket = s3_server()
    preflight(bucket + "/run")
    assert (Location(bucket) / "run").list() == []  # the check's markers are gone
    with pytest.raises(InputError, match=r"s3://no-such-bucket-robint/run: cannot write and read there") as caught:
        preflight("s3://no-such-bucket-robint/run")
    assert "\n" not in str(caught.value)
