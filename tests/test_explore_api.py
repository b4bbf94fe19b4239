"""The explorer's JSON API on a real demo run, through FastAPI's TestClient: every endpoint,
bad input answered with a clear 4xx, and the server still serving after each."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from megapairs.explore.app import TOKEN_HEADER, ExplorerSettings, create_app
from megapairs.runs import RunDir

TOKEN = "test-token-123"
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def run_copy(explore_demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo run this module may write flags and thumbnails into."""
    target = tmp_path_factory.mktemp("explore-api") / "run"
    shutil.copytree(explore_demo_run, target)
    return target


def make_client(run: Path, **settings) -> TestClient:
    chosen = ExplorerSettings(token=TOKEN, user="tester", **settings)
    return TestClient(create_app(RunDir(run), chosen), base_url=LOCAL)


@pytest.fixture(scope="module")
def client(run_copy: Path) -> TestClient:
    return make_client(run_copy)


def first_pair(client: TestClient, **params) -> dict:
    answer = client.get("/api/pairs", params={"limit": 1, **params})
    assert answer.status_code == 200, answer.text
    return answer.json()["rows"][0]


def still_serving(client: TestClient) -> None:
    assert client.get("/api/pairs", params={"limit": 1}).status_code == 200


def test_page_is_served_with_its_token_and_no_external_asset(client):
    page = client.get("/")
    assert page.status_code == 200
    assert f'content="{TOKEN}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/app.css"):
        answer = client.get(asset)
        assert answer.status_code == 200
        assert "https://" not in answer.text and "//cdn" not in answer.text


def test_openapi_page_is_self_hosted(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/swagger/swagger-ui-bundle.js" in docs.text
    assert client.get("/swagger/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/api/pairs", "/api/search", "/api/flags", "/api/image/{record_id}"} <= set(
        spec["paths"]
    )


def test_pairs_page_counts_every_pair_of_the_run(client, run_copy):
    run = RunDir(run_copy)
    mined = sum(c["pairs"] for c in run.part_counts("mine").values())
    answer = client.get("/api/pairs", params={"limit": 7}).json()
    assert answer["total"] == mined
    assert len(answer["rows"]) == 7
    row = answer["rows"][0]
    assert row["status"] == "annotated" and row["num_instructions"] >= 3
    assert row["pair_id"] == f"{row['query_id']}-{row['target_id']}"
    second = client.get("/api/pairs", params={"limit": 7, "offset": 7}).json()["rows"]
    assert {r["pair_id"] for r in second}.isdisjoint(r["pair_id"] for r in answer["rows"])


def test_filters_by_channel_combination_scores_and_sorting(client):
    channels = client.get("/api/pairs", params={"limit": 1}).json()["channels"]
    caption = next(c for c in channels if c == "caption")
    found = client.get(
        "/api/pairs", params={"channel": caption, "sort": f"-score:{caption}", "limit": 500}
    ).json()
    assert found["total"] > 0
    assert all(caption in row["channels"] for row in found["rows"])
    scores = [r["channel_scores"][r["channels"].index(caption)] for r in found["rows"]]
    assert scores == sorted(scores, reverse=True)
    low = scores[len(scores) // 2]
    ranged = client.get(
        "/api/pairs", params={"score": f"{caption}:{low}:", "channel": caption, "limit": 500}
    ).json()
    assert 0 < ranged["total"] < found["total"] + 1
    assert all(r["channel_scores"][r["channels"].index(caption)] >= low for r in ranged["rows"])
    only = client.get("/api/pairs", params={"combo": caption, "limit": 500}).json()
    assert all(r["channels"] == [caption] for r in only["rows"])


def test_text_search_and_instruction_count_filters(client):
    row = first_pair(client)
    word = row["first_instruction"].split()[-1]
    found = client.get("/api/pairs", params={"q": word.upper(), "limit": 500}).json()
    assert found["total"] >= 1
    assert row["pair_id"] in {r["pair_id"] for r in found["rows"]} or found["total"] > 500
    none = client.get("/api/pairs", params={"q": "zzqx-no-such-words"}).json()
    assert none["total"] == 0 and none["rows"] == []
    many = client.get("/api/pairs", params={"min_instructions": 6, "limit": 500}).json()
    assert all(r["num_instructions"] >= 6 for r in many["rows"])


@pytest.mark.parametrize(
    "params",
    [
        {"channel": "no_such_channel"},
        {"score": "caption:abc:"},
        {"score": "caption"},
        {"sort": "color"},
        {"limit": "0"},
        {"limit": "many"},
        {"offset": "-3"},
        {"status": "done"},
        {"flagged": "maybe"},
        {"bogus": "1"},
    ],
)
def test_malformed_filters_are_a_400_naming_the_problem(client, params):
    answer = client.get("/api/pairs", params=params)
    assert answer.status_code == 400
    assert isinstance(answer.json()["detail"], str) and answer.json()["detail"]
    still_serving(client)


def test_one_pair_has_images_captions_instructions_and_provenance(client):
    row = first_pair(client)
    pair = client.get(f"/api/pairs/{row['pair_id']}").json()
    assert pair["query"]["id"] == row["query_id"] and pair["target"]["id"] == row["target_id"]
    assert pair["query"]["caption"] and pair["target"]["caption"]
    assert len(pair["negatives"]) >= 1
    assert pair["description"]
    assert pair["instructions"][0]["text"] == row["first_instruction"]
    assert pair["provenance"]["backend"] == "template"
    assert pair["provenance"]["prompt_version"].startswith("v1-")
    assert pair["failure"] is None and pair["flagged"] is False


@pytest.mark.parametrize(
    ("pair_id", "status"),
    [("123-456", 404), ("../../etc/passwd", 404), ("abc", 404), ("1-2-3", 404)],
)
def test_unknown_or_malformed_pair_ids_are_404(client, pair_id, status):
    assert client.get(f"/api/pairs/{pair_id}").status_code == status
    still_serving(client)


def test_images_by_id_thumbnails_cached_on_disk(client, run_copy):
    row = first_pair(client)
    thumb = client.get(f"/api/image/{row['query_id']}", params={"size": "thumb"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumb.content))
    assert max(image.size) <= 256
    cached = list((run_copy / "explore" / "thumbnails").rglob(f"{row['query_id']}.jpg"))
    assert len(cached) == 1
    full = client.get(f"/api/image/{row['query_id']}", params={"size": "full"})
    assert full.status_code == 200
    kind = Image.open(io.BytesIO(full.content)).format
    assert full.headers["content-type"] == f"image/{kind.lower()}"


@pytest.mark.parametrize(
    "path",
    [
        "/api/image/999999999",
        "/api/image/..%2F..%2Fetc%2Fpasswd",
        "/api/image/../../manifest.json",
        "/api/image/-5",
        "/api/image/1?size=huge",
        "/static/../../manifest.json",
        "/static/..%2F..%2Fmanifest.json",
    ],
)
def test_images_only_by_record_id_no_path_traversal(client, path):
    answer = client.get(path)
    assert 400 <= answer.status_code < 500
    assert b'"config"' not in answer.content  # the run's manifest never leaks
    still_serving(client)


def test_a_corrupt_image_in_the_corpus_is_a_422(run_copy, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_copy, run, ignore=shutil.ignore_patterns("explore"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    corpus_file = run / "corpus" / "part-00000.parquet"
    corpus = pq.read_table(corpus_file)
    rows = corpus.to_pylist()
    victim = next(r for r in rows if r["path"])
    paths = [str(broken) if r["id"] == victim["id"] else r["path"] for r in rows]
    column = corpus.schema.get_field_index("path")
    pq.write_table(corpus.set_column(column, "path", pa.array(paths, pa.string())), corpus_file)
    client = make_client(run)
    answer = client.get(f"/api/image/{victim['id']}", params={"size": "thumb"})
    assert answer.status_code == 422
    assert str(victim["id"]) in answer.json()["detail"]
    healthy = next(r for r in rows if r["path"] and r["id"] != victim["id"])
    assert client.get(f"/api/image/{healthy['id']}").status_code == 200


def test_rejected_records_that_decode_have_thumbnails(client, run_copy):
    overview = client.get("/api/overview").json()
    groups = {(g["stage"], g["reason"]): g for g in overview["rejects"]}
    duplicate = groups[("ingest", "duplicate")]
    assert client.get(f"/api/image/{duplicate['examples'][0]}").status_code == 200
    corrupt = next(g for (s, r), g in groups.items() if r in ("corrupt", "truncated", "empty"))
    assert client.get(f"/api/image/{corrupt['examples'][0]}").status_code in (404, 422)


def test_overview_has_stage_counts_histograms_with_windows_and_distributions(client):
    overview = client.get("/api/overview").json()
    stages = {s["stage"] for s in overview["stages"]}
    assert {"ingest", "mine", "annotate", "export"} <= stages
    assert overview["records"]["rejected"] == sum(g["count"] for g in overview["rejects"])
    for channel in overview["channels"]:
        low, high = channel["window"]
        histogram = channel["histogram"]
        assert len(histogram["edges"]) == len(histogram["counts"]) + 1
        assert sum(histogram["counts"]) > 0 and low < high
    total = client.get("/api/pairs", params={"limit": 1}).json()["total"]
    assert sum(c["pairs"] for c in overview["combinations"]) == total
    assert sum(c["pairs"] for c in overview["instructions_per_pair"]) == total
    assert overview["annotation"]["annotated"] == total


def test_flags_round_trip_and_filter(run_copy):
    client = make_client(run_copy)
    row = first_pair(client, offset=3)
    body = {"pair_id": row["pair_id"], "reason": "unrelated_pair"}
    made = client.post("/api/flags", json=body, headers={TOKEN_HEADER: TOKEN})
    assert made.status_code == 201, made.text
    assert made.json()["event"]["user"] == "tester"
    files = list((run_copy / "flags").glob("*.json"))
    assert any(json.loads(f.read_text())["pair_id"] == row["pair_id"] for f in files)
    flagged = client.get("/api/pairs", params={"flagged": "yes", "limit": 500}).json()
    assert row["pair_id"] in {r["pair_id"] for r in flagged["rows"]}
    assert client.get(f"/api/pairs/{row['pair_id']}").json()["flagged"] is True
    one = {"pair_id": row["pair_id"], "instruction_index": 1, "reason": "wrong_instruction"}
    assert client.post("/api/flags", json=one, headers={TOKEN_HEADER: TOKEN}).status_code == 201
    pair = client.get(f"/api/pairs/{row['pair_id']}").json()
    assert pair["instructions"][1]["flagged"] and not pair["instructions"][0]["flagged"]
    undo = {**body, "action": "unflag"}
    assert client.post("/api/flags", json=undo, headers={TOKEN_HEADER: TOKEN}).status_code == 201
    summary = client.get("/api/flags").json()["summary"]
    assert summary["flagged_pairs"] == 0 and summary["flagged_instructions"] == 1
    assert summary["by_user"] == {"tester": 1}


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"pair_id": "123-456", "reason": "x"}, 404),
        ({"pair_id": "../x", "reason": "x"}, 404),
        ({"reason": "x"}, 422),
        ({"pair_id": "PAIR", "reason": ""}, 422),
        ({"pair_id": "PAIR", "reason": "x", "action": "delete"}, 422),
        ({"pair_id": "PAIR", "reason": "x", "instruction_index": 99}, 400),
    ],
)
def test_bad_flags_are_refused(client, body, status):
    pair_id = first_pair(client)["pair_id"]
    body = {k: (pair_id if v == "PAIR" else v) for k, v in body.items()}
    answer = client.post("/api/flags", json=body, headers={TOKEN_HEADER: TOKEN})
    assert answer.status_code == status, answer.text
    still_serving(client)


def test_flag_writes_need_the_token_and_the_same_origin(client):
    body = {"pair_id": first_pair(client)["pair_id"], "reason": "other"}
    assert client.post("/api/flags", json=body).status_code == 403
    wrong = client.post("/api/flags", json=body, headers={TOKEN_HEADER: "guess"})
    assert wrong.status_code == 403
    evil = {TOKEN_HEADER: TOKEN, "Origin": "http://evil.example"}
    assert client.post("/api/flags", json=body, headers=evil).status_code == 403
    same = {TOKEN_HEADER: TOKEN, "Origin": LOCAL}
    assert client.post("/api/flags", json=body, headers=same).status_code == 201


def test_loopback_bind_refuses_other_host_names(client):
    answer = client.get("/api/pairs", headers={"Host": "attacker.example"})
    assert answer.status_code == 403
    still_serving(client)


def test_a_non_loopback_bind_needs_the_token_on_every_request(run_copy):
    client = make_client(run_copy, token_everywhere=True, loopback=False)
    assert client.get("/api/pairs").status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/api/pairs", headers={TOKEN_HEADER: TOKEN}).status_code == 200
    page = client.get("/", params={"token": TOKEN})
    assert page.status_code == 200 and "megapairs_token" in page.headers["set-cookie"]
    assert client.get("/api/overview").status_code == 200  # the cookie now carries it
    client.cookies.clear()
    assert client.get("/api/image/0").status_code == 401


def test_search_off_is_a_clear_409(run_copy):
    client = make_client(run_copy, search_off_reason="started with --retriever none")
    status = client.get("/api/search/status").json()
    assert status == {"enabled": False, "state": "off", "reason": "started with --retriever none"}
    answer = client.post("/api/search", json={"text": "x"}, headers={TOKEN_HEADER: TOKEN})
    assert answer.status_code == 409 and "--retriever none" in answer.json()["detail"]


@pytest.fixture(scope="module")
def search_client(run_copy: Path) -> TestClient:
    from megapairs.explore.search import build_search_engine

    engine = build_search_engine(RunDir(run_copy), "channels")
    return make_client(run_copy, engine=engine, max_upload_bytes=200_000)


def built(client: TestClient) -> None:
    status = client.get("/api/search/status").json()
    assert status["enabled"] and status["retriever"] == "channels"
    answer = client.post("/api/search/build", headers={TOKEN_HEADER: TOKEN})
    assert answer.status_code == 202
    client.app.state.settings.engine.wait(60)
    assert client.get("/api/search/status").json()["state"] == "ready"


def test_search_by_record_id_and_by_upload_agree(search_client, run_copy):
    built(search_client)
    query = first_pair(search_client)["query_id"]
    body = {"image_id": query, "text": "", "k": 5}
    by_id = search_client.post("/api/search", json=body, headers={TOKEN_HEADER: TOKEN})
    assert by_id.status_code == 200, by_id.text
    hits = by_id.json()["results"]
    assert len(hits) == 5 and query not in [h["id"] for h in hits]
    corpus = pq.read_table(run_copy / "corpus").select(["id", "caption"]).to_pylist()
    captions = {r["id"]: r["caption"] for r in corpus}
    assert [h["caption"] for h in hits] == [captions[h["id"]] for h in hits]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    data = search_client.get(f"/api/image/{query}", params={"size": "full"}).content
    uploaded = search_client.post(
        "/api/search/upload",
        files={"image": ("q.png", data, "application/octet-stream")},
        data={"text": "", "k": "6"},
        headers={TOKEN_HEADER: TOKEN},
    )
    assert uploaded.status_code == 200, uploaded.text
    ids = [h["id"] for h in uploaded.json()["results"]]
    assert ids[0] == query  # an upload is not a corpus record: its own image comes first
    assert ids[1:] == [h["id"] for h in hits]


@pytest.mark.parametrize(
    ("files", "status"),
    [
        ({"image": ("a.txt", b"just some text, not an image", "image/png")}, 415),
        ({"image": ("big.bin", b"\x89PNG" + bytes(300_000), "image/png")}, 413),
        ({"image": ("cut.jpg", b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg")}, 415),
    ],
)
def test_bad_uploads_are_refused(search_client, files, status):
    built(search_client)
    answer = search_client.post(
        "/api/search/upload", files=files, data={"text": "x"}, headers={TOKEN_HEADER: TOKEN}
    )
    assert answer.status_code == status, answer.text
    still_serving(search_client)


def test_a_pixel_bomb_upload_is_refused(search_client):
    built(search_client)
    buffer = io.BytesIO()
    Image.new("L", (12_000, 5_000)).save(buffer, "PNG")  # 60M pixels in a few KB
    answer = search_client.post(
        "/api/search/upload",
        files={"image": ("bomb.png", buffer.getvalue(), "image/png")},
        headers={TOKEN_HEADER: TOKEN},
    )
    assert answer.status_code == 413 and "pixels" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"text": ""}, 400),
        ({"image_id": 999_999_999, "text": "x"}, 400),
        ({"image_id": -1, "text": "x"}, 422),
        ({"text": "x", "k": 0}, 422),
    ],
)
def test_bad_search_requests_are_refused(search_client, body, status):
    built(search_client)
    answer = search_client.post("/api/search", json=body, headers={TOKEN_HEADER: TOKEN})
    assert answer.status_code == status, answer.text


def test_search_writes_need_the_token(search_client):
    assert search_client.post("/api/search", json={"text": "x"}).status_code == 403
    assert search_client.post("/api/search/build").status_code == 403


def test_the_demo_prints_a_runnable_explore_command(tmp_path):
    import shlex

    from megapairs.cli import build_parser
    from megapairs.demo.run import explore_command

    words = shlex.split(explore_command(tmp_path / "my run"))
    assert Path(words[0]).name == "megapairs" and words[1] == "explore"
    args = build_parser().parse_args(words[1:])
    assert args.run == str(tmp_path / "my run") and args.host == "127.0.0.1"


def test_the_pair_index_is_cached_on_disk_and_rebuilt_when_a_part_changes(tmp_path, run_copy):
    from megapairs.explore.view import RunView

    run = tmp_path / "run"
    shutil.copytree(run_copy, run, ignore=shutil.ignore_patterns("explore"))
    first = RunView(RunDir(run)).index()
    cached = list((run / "explore" / "index").glob("*.parquet"))
    assert len(cached) == 1
    assert RunView(RunDir(run)).index().equals(first)
    marker = next((run / "_progress" / "mine").glob("part-*.json"))
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "touched": 1}))
    again = RunView(RunDir(run)).index()
    rebuilt = list((run / "explore" / "index").glob("*.parquet"))
    assert len(rebuilt) == 1 and rebuilt != cached
    assert again.equals(first)  # same tables, so the same rows
