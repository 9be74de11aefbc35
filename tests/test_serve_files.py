import hashlib
import io

import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore

LIMIT = 64 * 1024
CONFIG = {"models": {"m": {"remote": "http://127.0.0.1:9/v1"}}, "knowledge": {"max_upload_bytes": LIMIT}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    config = parse_config({**CONFIG, "knowledge": {**CONFIG["knowledge"], "files_dir": str(root / "blobs")}})
    app = create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), {})
    with TestClient(app) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        yield tc, client, root


def test_upload_retrieve_content_delete(served):
    tc, client, root = served
    data = "# Notes\nÉtude de cas.\n".encode() * 50
    f = client.files.create(file=("notes.md", io.BytesIO(data)), purpose="assistants")
    assert f.id.startswith("file-") and f.object == "file" and f.bytes == len(data)
    assert (f.filename, f.purpose, f.status) == ("notes.md", "assistants", "processed")
    assert client.files.retrieve(f.id).model_dump() == f.model_dump()
    assert client.files.content(f.id).read() == data
    blob = root / "blobs" / hashlib.sha256(data).hexdigest()  # stored under its content hash
    assert blob.read_bytes() == data
    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.deleted) == (f.id, True) and not blob.exists()
    with pytest.raises(openai.NotFoundError) as err:
        client.files.retrieve(f.id)
    assert err.value.body["code"] == "not_found"


def test_metadata_lives_in_the_fleets_own_database_file(served):
    tc, client, root = served
    client.files.create(file=("x.txt", io.BytesIO(b"x")), purpose="user_data")
    import apsw

    db = apsw.Connection(str(root / "fleet.db"))
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"kb_files", "kb_chunks", "kb_store_files", "requests"} <= tables


def test_list_by_purpose_with_pages(served):
    tc, client, _ = served
    ids = [
        client.files.create(file=(f"{i}.txt", io.BytesIO(f"page {i}".encode())), purpose="batch").id
        for i in range(3)
    ]
    page = client.files.list(purpose="batch", limit=2, order="asc")
    assert [f.id for f in page.data] == ids[:2] and page.has_more
    rest = client.files.list(purpose="batch", limit=2, order="asc", after=ids[1])
    assert [f.id for f in rest.data] == ids[2:] and not rest.has_more
    newest = client.files.list(purpose="batch", limit=1)  # desc by default
    assert newest.data[0].id == ids[-1]
    assert all(f.purpose == "batch" for f in client.files.list(purpose="batch"))


def test_an_upload_past_the_limit_is_413(served):
    tc, client, _ = served
    with pytest.raises(openai.APIStatusError) as err:
        client.files.create(file=("big.txt", io.BytesIO(b"x" * (LIMIT + 1))), purpose="assistants")
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"json": {"file": "abc", "purpose": "assistants"}}, "multipart/form-data"),
        ({"data": {"purpose": "assistants"}, "files": {"other": ("a.txt", b"a")}}, "unknown field 'other'"),
        ({"data": {"purpose": "assistants"}}, "multipart/form-data"),
        ({"data": {"purpose": "training"}, "files": {"file": ("a.txt", b"a")}}, "purpose must be one of"),
        ({"files": {"file": ("a.txt", b"a")}}, "purpose must be one of"),
        (
            {"data": {"purpose": "assistants", "file": "not a file"}, "files": {"x": ("a", b"")}},
            "unknown field",
        ),
    ],
)
def test_bad_uploads_are_400(served, kwargs, fragment):
    tc, _, _ = served
    r = tc.post("/v1/files", **kwargs)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"]


def test_unknown_ids_and_bad_paging_are_openai_errors(served):
    tc, _, _ = served
    for method, path in [
        ("get", "/v1/files/file-nope"),
        ("get", "/v1/files/file-nope/content"),
        ("delete", "/v1/files/file-nope"),
    ]:
        r = getattr(tc, method)(path)
        assert r.status_code == 404 and r.json()["error"]["param"] == "file_id"
    assert tc.get("/v1/files", params={"limit": 0}).json()["error"]["param"] == "limit"
    assert tc.get("/v1/files", params={"order": "up"}).status_code == 400
    assert tc.get("/v1/files", params={"before": "file-x"}).json()["error"]["param"] == "before"
