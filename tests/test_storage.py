"""storage.Location: one code path for a local folder and an S3 bucket (moto's server on 127.0.0.1)."""

from __future__ import annotations

import pickle

import pytest

from robint_ray.errors import InputError
from robint_ray.storage import Location


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


def test_paths_and_uris(tmp_path):
    assert Location("s3://bkt/p/").uri == "s3://bkt/p"
    assert str(Location("s3://bkt/p") / "q" / "r.json") == "s3://bkt/p/q/r.json"
    assert Location("s3://bkt/p/q").parent == Location("s3://bkt/p") and Location("s3://bkt/p/q").name == "q"
    assert Location("s3://bkt/p").parent == Location("s3://bkt")
    assert not Location("s3://bkt").is_local and Location("rel/dir").is_local
    assert Location("rel/dir").local_path.is_absolute()
    # file:// is the local path it names (a space written as %20), in every respect
    target = tmp_path / "a b" / "out"
    assert Location(f"file://{tmp_path}/a%20b/out/") == Location(target) == Location(f"file://localhost{target}")
    (Location(f"file://{target}") / "x.json").write_json({"x": 1})
    assert (target / "x.json").read_text() == '{\n  "x": 1\n}'


@pytest.mark.parametrize(
    "where, message",
    [
        ("gs://bkt/x", "unsupported storage scheme gs://"),
        ("s3a://bkt/x", "unsupported storage scheme s3a://"),
        ("hdfs://host/x", "unsupported storage scheme hdfs://"),
        ("S3://bkt/x", "write the scheme in lower case (s3://...)"),
        ("File:///tmp/x", "write the scheme in lower case (file://...)"),
        ("s3://bkt/k?region=eu-west-1", "takes no query string"),
        ("s3://bkt/k#part", "takes no query string"),
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("s3://My_Bucket/x", "'My_Bucket' is not a bucket name"),
        ("s3:/bkt/x", "not a storage URI"),  # what Path("s3://bkt/x") makes of a URI
        ("file://relative/x", "file:///ABSOLUTE/PATH"),
    ],
)
def test_uris_robint_cannot_use_are_one_line_errors_at_once(where, message):
    with pytest.raises(InputError) as caught:
        Location(where)
    assert message in str(caught.value) and str(caught.value).startswith(where + ": ")
    assert "\n" not in str(caught.value)


def test_a_store_that_refuses_connections_is_one_line_within_seconds(monkeypatch):
    """Nothing listens on the endpoint: `reachable` (what every command asks of --out first) fails in
    one line, after pyarrow's few quick retries, not the long ones of the work itself."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    for key, value in {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(InputError, match=r"^s3://bkt/x: the store does not answer \(") as caught:
        Location("s3://bkt/x").reachable()
    assert "\n" not in str(caught.value) and time.monotonic() - started < 30


def test_a_missing_bucket_is_one_line(s3_server):
    with pytest.raises(InputError, match=r"^s3://no-such-bucket-robint/x: no bucket 'no-such-bucket-robint'"):
        Location("s3://no-such-bucket-robint/x").reachable()
    assert Location(s3_server() + "/x").reachable()


def test_the_s3_filesystem_keeps_its_retries_when_pickled(s3_server):
    """Ray Train ships the storage filesystem to its workers by pickling it; pyarrow's own pickling of
    an S3FileSystem drops the retry strategy, ours rebuilds it (and carries no credentials)."""
    from robint_ray import storage

    path, filesystem = Location(s3_server() + "/run").for_ray_train()
    back = pickle.loads(pickle.dumps(filesystem))
    assert type(back) is type(filesystem) and back.made_with == filesystem.made_with
    assert back.made_with == (s3_server.endpoint, "us-east-1")
    assert b"testing" not in pickle.dumps(filesystem)  # the fixture's access key
    assert storage.S3_ATTEMPTS >= 5 and storage.S3_REQUEST_TIMEOUT_S > 3  # more patient than the SDK's defaults
    with back.open_output_stream(path + "/f") as f:
        f.write(b"ok")
    assert (Location("s3://" + path) / "f").read_bytes() == b"ok"


def test_inputs_in_storage_are_downloaded_once_per_node(s3_server, tmp_path, monkeypatch):
    from robint_ray.storage import local_input

    monkeypatch.setenv("ROBINT_CACHE", str(tmp_path / "cache"))
    data = Location(s3_server()) / "data"
    (data / "set" / "a.txt").write_text("a")
    (data / "set" / "sub" / "b.txt").write_text("b")
    first = local_input(data.uri + "/set")
    assert (first / "a.txt").read_text() == "a" and (first / "sub" / "b.txt").read_text() == "b"
    (first / "a.txt").write_text("local")  # a second call reuses the copy ...
    assert local_input(f"{data.uri}/set") == first and (first / "a.txt").read_text() == "local"
    (data / "set" / "a.txt").write_text("new")  # ... until the store's copy changes
    again = local_input(f"{data.uri}/set")
    assert again != first and (again / "a.txt").read_text() == "new"
    assert local_input(tmp_path / "x") == tmp_path / "x" and local_input(f"file://{tmp_path}/x") == tmp_path / "x"
    with pytest.raises(InputError, match="not found"):
        local_input(data.uri + "/missing.npz")


def test_ray_train_storage_is_the_same_store(s3_server):
    uri = s3_server()
    path, filesystem = Location(uri + "/run").for_ray_train()
    assert path == uri.removeprefix("s3://") + "/run" and filesystem.type_name == "s3"
    filesystem.create_dir(path + "/x")
    with filesystem.open_output_stream(path + "/x/f") as f:
        f.write(b"ok")
    assert (Location(uri) / "run" / "x" / "f").read_bytes() == b"ok"


@pytest.mark.ray
def test_preflight_on_one_node(ray_local, s3_server, tmp_path):
    """A single node checks in-process: a writable place passes at once and keeps nothing of the check;
    a bucket that does not exist fails with one line that names the location."""
    import time

    from robint_ray.cluster import storage_preflight as preflight
    from robint_ray.errors import InputError

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
