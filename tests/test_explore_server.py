"""`megapairs explore` and `megapairs search` as a user runs them: the real uvicorn server in
its own process on a real port, and the search command through the CLI's entry point."""

from __future__ import annotations

import re

import httpx
import pyarrow.parquet as pq
from explore_fixtures import explorer

from megapairs.cli import main as cli_main


def test_explore_serves_loopback_by_default(explore_demo_run):
    with explorer(explore_demo_run, "--retriever", "none") as (address, printed):
        assert address.startswith("http://127.0.0.1:") and "token" not in address
        assert any("search is off" in line for line in printed)
        page = httpx.get(address, timeout=30)
        assert page.status_code == 200 and "megapairs-token" in page.text
        pairs = httpx.get(address + "api/pairs", params={"limit": 2}, timeout=30).json()
        assert pairs["total"] > 0 and len(pairs["rows"]) == 2


def test_a_non_loopback_bind_generates_and_requires_a_token(explore_demo_run):
    with explorer(explore_demo_run, "--host", "0.0.0.0", "--retriever", "none") as (address, _):
        token = re.search(r"\?token=(\S+)$", address)
        assert token is not None, address
        port = re.search(r":(\d+)/", address).group(1)
        base = f"http://127.0.0.1:{port}/"
        assert httpx.get(base + "api/pairs", timeout=30).status_code == 401
        assert httpx.get(base + "api/image/0", timeout=30).status_code == 401
        headers = {"X-Megapairs-Token": token.group(1)}
        assert httpx.get(base + "api/pairs", headers=headers, timeout=30).status_code == 200
        assert httpx.get(base, params={"token": token.group(1)}, timeout=30).status_code == 200


def test_explore_refuses_bad_start_up_settings(explore_demo_run, tmp_path, capsys):
    code = cli_main(["explore", "--run", str(explore_demo_run), "--retriever", "clip"])
    assert code == 2 and "--model" in capsys.readouterr().err
    assert cli_main(["explore", "--run", str(tmp_path / "nothing")]) == 2
    assert "no run at" in capsys.readouterr().err


def test_search_command_prints_the_top_hits(explore_demo_run, capsys):
    corpus = pq.read_table(explore_demo_run / "corpus" / "part-00000.parquet").to_pylist()
    query = corpus[5]["id"]
    argv = ["search", "--run", str(explore_demo_run), "--image", str(query), "-k", "4"]
    assert cli_main([*argv, "--text", "with a red background", "--quiet"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    ranks = [line.split()[0] for line in lines[1:]]
    assert ranks == ["1", "2", "3", "4"]
    assert str(query) not in {line.split()[1] for line in lines[1:]}
    assert cli_main([*argv, "--json", "--quiet"]) == 0
    hits = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(hits) == 4
