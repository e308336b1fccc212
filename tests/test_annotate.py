"""Annotation and the relevance filter: resume after a kill, answer-conditioned option, the judge split,
and the HTTP path against the project's own OpenAI-compatible server on loopback (no HTTP mocking)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedrl.cli import main
from embedrl.config import AnnotateConfig, AnnotatorSettings, FilterConfig, ServeConfig
from embedrl.data.rows import RowError
from embedrl.data.schema import Item, Pair, read_jsonl, read_pairs, write_pairs
from embedrl.models.chat import ChatModel
from embedrl.prep.annotate import (
    AnnotationError,
    ChatRequest,
    Journal,
    OpenAIAnnotator,
    annotate,
    answer_hint,
    equidistant,
    filter_pairs,
)

TCOT = (
    '<thinking>It shows a kite. {"text_keywords": ["kite"]}</thinking><rethink>Yes.</rethink><answer>A kite.</answer>'
)


class Killed(Exception):
    """Stands in for a kill in the middle of a run."""


class FakeAnnotator:
    """Canned replies; records every request it answers and dies after ``kill_after`` replies."""

    def __init__(self, reply: str | dict[str, str] = TCOT, kill_after: int | None = None) -> None:
        self.name = "fake"
        self.reply = reply
        self.kill_after = kill_after
        self.seen: list[ChatRequest] = []

    def decoding(self) -> dict:
        return {"temperature": 0.0}

    def complete(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[ChatRequest, str]]:
        for r in requests:
            if self.kill_after is not None and len(self.seen) == self.kill_after:
                raise Killed
            self.seen.append(r)
            yield r, self.reply if isinstance(self.reply, str) else self.reply[r.key]


def _text(request: ChatRequest) -> str:
    return " ".join(p["text"] for m in request.messages for p in m["content"] if p["type"] == "text")


def write_input(root: Path, n: int = 6) -> Path:
    media = root / "in" / "media"
    media.mkdir(parents=True)
    pairs = []
    for i in range(n):
        image = media / f"img{i}.png"
        Image.fromarray(np.full((16, 16, 3), 40 * i % 255, dtype=np.uint8)).save(image)
        dataset = ("CIRR", "N24News", "VisRAG")[i % 3]
        query = Item(id=f"{dataset}/{i}/q", text=f"query secret {i}", instruction="Find it:", images=(image,))
        target = Item(id=f"{dataset}/{i}/t", text=f"positive {i}", images=(image,) if i % 2 else ())
        pairs.append(Pair(dataset, f"{dataset}/{i:03d}", query, target))
    path = root / "in" / "pairs.jsonl"
    write_pairs(path, pairs)
    return path


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    return write_input(tmp_path / "data")


def _cfg(pairs_file: Path, out: Path, **kw) -> AnnotateConfig:
    return AnnotateConfig(
        input=str(pairs_file), out=str(out), annotator=AnnotatorSettings(model="fake"), show_progress_bar=False, **kw
    )


# ----------------------------------------------------------------------------------------------------------------
# Annotate
# ----------------------------------------------------------------------------------------------------------------


def test_annotate_writes_both_tcots_with_provenance(pairs_file: Path, tmp_path: Path) -> None:
    annotator = FakeAnnotator()
    summary = annotate(_cfg(pairs_file, tmp_path / "out"), annotator)
    assert summary["files"]["pairs"]["requests_sent"] == 12 and summary["files"]["pairs"]["reused"] == 0
    records = list(read_jsonl(tmp_path / "out" / "pairs.jsonl"))
    assert len(records) == 6
    r = records[0]
    assert r["query_tcot"]["family"] == "image_based" and r["target_tcot"]["family"] == "positive_text"
    assert r["query_tcot"]["answer_conditioned"] is False and r["query_tcot"]["generator"] == "fake"
    assert r["target_tcot"]["parsed"]["keywords"] == ["kite"] and r["query"]["tcot"] == TCOT
    annotated = read_pairs(tmp_path / "out" / "pairs.jsonl")  # still a pairs file; media resolve from out/
    assert annotated[0].query.images[0].is_file() and annotated[0].query.tcot == TCOT
    # target-side prompts never contain the query; off by default: no hint anywhere
    targets = [_text(q) for q in annotator.seen if q.key.endswith("|target")]
    assert targets and not any("secret" in t for t in targets)
    assert not any("Hint" in _text(q) for q in annotator.seen)


def test_killed_annotation_resumes_without_redoing_finished_requests(pairs_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(Killed):
        annotate(_cfg(pairs_file, out), FakeAnnotator(kill_after=5))
    journal = out / "pairs.journal.jsonl"
    assert len(journal.read_text().splitlines()) == 5 and not (out / "pairs.jsonl").exists()
    with journal.open("a") as fh:  # a line cut by the kill
        fh.write('{"key": "CIRR/000|qu')
    second = FakeAnnotator()
    summary = annotate(_cfg(pairs_file, out), second)
    assert len(second.seen) == 7 and summary["files"]["pairs"]["reused"] == 5
    assert len({r.key for r in second.seen}) == 7
    assert len(list(read_jsonl(out / "pairs.jsonl"))) == 6 and len(Journal(journal).done) == 12
    third = FakeAnnotator()
    annotate(_cfg(pairs_file, out), third)
    assert third.seen == []  # nothing left to do


def test_answer_conditioned_option(pairs_file: Path, tmp_path: Path) -> None:
    annotator = FakeAnnotator()
    annotate(_cfg(pairs_file, tmp_path / "o", answer_conditioned_fraction=0.5), annotator)
    queries = {r.key: _text(r) for r in annotator.seen if r.key.endswith("|query")}
    hinted = sorted(k for k, t in queries.items() if "Hint" in t)
    assert hinted == ["CIRR/000|query", "N24News/004|query", "VisRAG/002|query"]  # even indices 0, 2, 4
    assert "positive 0" in queries["CIRR/000|query"] and "positive 3" not in queries["CIRR/003|query"]
    # media positives are shown as a file reference, never as pixels
    assert answer_hint(Item(text="a red kite", images=(Path("x/k.png"),))) == "a red kite [image file: k.png]"
    records = {r["pair_id"]: r for r in read_jsonl(tmp_path / "o" / "pairs.jsonl")}
    assert records["CIRR/000"]["query_tcot"]["answer_conditioned"] is True
    assert records["N24News/001"]["query_tcot"]["answer_conditioned"] is False
    assert records["CIRR/000"]["query_tcot"]["prompt_hash"] != records["CIRR/003"]["query_tcot"]["prompt_hash"]
    assert all("Hint" not in _text(r) for r in annotator.seen if r.key.endswith("|target"))
    with pytest.raises(ValueError, match="parity conditions every even index"):
        _cfg(pairs_file, tmp_path / "x", answer_conditioned_fraction=0.3)


def test_bad_pair_rows_name_file_and_row(pairs_file: Path, tmp_path: Path) -> None:
    lines = pairs_file.read_text().splitlines(keepends=True)
    broken = json.loads(lines[1])
    broken["query"]["images"] = ["media/nope.png"]
    pairs_file.write_text(lines[0] + json.dumps(broken) + "\n" + "".join(lines[2:]))
    with pytest.raises(RowError, match=rf"{pairs_file}:2: query media .*nope.png does not exist"):
        annotate(_cfg(pairs_file, tmp_path / "a"), FakeAnnotator())
    summary = annotate(_cfg(pairs_file, tmp_path / "b", on_bad_row="skip"), FakeAnnotator())
    assert summary["files"]["pairs"]["pairs"] == 5 and summary["files"]["pairs"]["skipped_rows"]["skipped"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Filter
# ----------------------------------------------------------------------------------------------------------------


def test_equidistant() -> None:
    assert equidistant(10, 4) == [0, 2, 5, 7] and equidistant(3, 5) == [0, 1, 2] and equidistant(5, 0) == []


def test_filter_judges_and_splits(pairs_file: Path, tmp_path: Path) -> None:
    annotate(_cfg(pairs_file, tmp_path / "ann"), FakeAnnotator())
    replies = {
        "CIRR/000|judge": "Yes",
        "CIRR/003|judge": "No.",
        "N24News/001|judge": "no",
        "N24News/004|judge": "Yes",
        "VisRAG/002|judge": "Maybe?",
        "VisRAG/005|judge": "YES, unrelated",
    }
    judge = FakeAnnotator(replies)
    cfg = FilterConfig(
        input=str(tmp_path / "ann"),
        out=str(tmp_path / "f"),
        judge=AnnotatorSettings(model="fake"),
        rl_counts={"CIRR": 1, "N24News": 1, "VisRAG": 2},
        show_progress_bar=False,
    )
    summary = filter_pairs(cfg, judge)
    assert all("Query reasoning" in _text(r) for r in judge.seen)
    d = summary["datasets"]
    assert (d["CIRR"]["kept"], d["CIRR"]["dropped"], d["VisRAG"]["unparsed"]) == (1, 1, 1)
    assert d["N24News"]["contrastive"] == 0 and d["N24News"]["excluded_from_contrastive"]
    assert d["VisRAG"]["rl"] == 1 and d["VisRAG"]["rl_shortfall"] == 1  # one rejected VisRAG pair for 2 requested
    assert summary["totals"] == {
        "initial": 6,
        "kept": 3,
        "dropped": 3,
        "unparsed": 1,
        "contrastive": 2,
        "rl": 3,
        "rl_shortfall": 1,
    }
    rl = read_pairs(tmp_path / "f" / "rl.jsonl")  # RL pairs come from the rejected pool by default
    assert sorted(p.pair_id for p in rl) == ["CIRR/000", "N24News/004", "VisRAG/005"]
    assert rl[0].query.images[0].is_file()
    contrastive = read_pairs(tmp_path / "f" / "contrastive" / "VisRAG.jsonl")
    assert [p.pair_id for p in contrastive] == ["VisRAG/002"]  # unparsed verdicts are kept
    splits = {r["pair_id"]: r["split"] for r in read_jsonl(tmp_path / "f" / "filtered.jsonl")}
    assert splits["N24News/001"] == "excluded" and splits["CIRR/003"] == "contrastive"

    kept_cfg = FilterConfig(
        input=str(tmp_path / "ann"),
        out=str(tmp_path / "f"),
        judge=AnnotatorSettings(model="x"),
        rl_pool="kept",
        rl_counts={"CIRR": 1},
        show_progress_bar=False,
    )
    again = FakeAnnotator(replies)
    summary = filter_pairs(kept_cfg, again)
    assert again.seen == []  # verdicts come from the judge journal
    assert summary["datasets"]["CIRR"]["contrastive"] == 0 and summary["datasets"]["CIRR"]["rl"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Real annotators: the local checkpoint, and the OpenAI-compatible endpoint on loopback
# ----------------------------------------------------------------------------------------------------------------


def test_http_annotator_against_the_project_server(pairs_file: Path, tiny_backbone_dir, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from embedrl.serve.server import create_app, serve_in_background  # fastapi is optional (the serve extra)

    app = create_app(ServeConfig(), chat_model=ChatModel.load(tiny_backbone_dir("qwen3-vl")))
    with serve_in_background(app) as base:
        settings = AnnotatorSettings(
            backend="openai",
            model="chat",
            base_url=base + "/v1",
            compact_prompts=True,
            max_new_tokens=4,
            concurrency=3,
            api_key_env="",
        )
        cfg = AnnotateConfig(
            input=str(pairs_file), out=str(tmp_path / "ann"), annotator=settings, limit=3, show_progress_bar=False
        )
        annotator = OpenAIAnnotator(settings)
        summary = annotate(cfg, annotator)
        assert summary["files"]["pairs"]["requests_sent"] == 6 and annotator.requests_sent == 6
        records = list(read_jsonl(tmp_path / "ann" / "pairs.jsonl"))
        assert len(records) == 3 and all(isinstance(r["query_tcot"]["text"], str) for r in records)
        assert records[0]["query_tcot"]["generator"] == f"openai:chat@{base}/v1"
        # greedy decoding at temperature 0: a second run from scratch gives the same texts
        again = annotate(
            AnnotateConfig(
                input=str(pairs_file), out=str(tmp_path / "ann2"), annotator=settings, limit=3, show_progress_bar=False
            ),
            OpenAIAnnotator(settings),
        )
        assert again["files"]["pairs"]["requests_sent"] == 6
        second = list(read_jsonl(tmp_path / "ann2" / "pairs.jsonl"))
        assert [r["query_tcot"]["text"] for r in second] == [r["query_tcot"]["text"] for r in records]
        # the judge over HTTP (text-only requests)
        fcfg = FilterConfig(
            input=str(tmp_path / "ann"), out=str(tmp_path / "f"), judge=settings, rl_counts={}, show_progress_bar=False
        )
        assert filter_pairs(fcfg)["totals"]["initial"] == 3
        # a request the server rejects (unknown model) is not retried and names the request
        bad = AnnotatorSettings(backend="openai", model="nope", base_url=base + "/v1", api_key_env="")
        with pytest.raises(
            AnnotationError, match=r"CIRR/000\|(query|target): .* answered HTTP 404: .*model_not_found"
        ):
            annotate(
                AnnotateConfig(
                    input=str(pairs_file), out=str(tmp_path / "bad"), annotator=bad, limit=1, show_progress_bar=False
                ),
                OpenAIAnnotator(bad),
            )


def test_http_retries_with_exponential_backoff_then_fails_loudly(pairs_file: Path, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused, a real network error
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = AnnotatorSettings(
        backend="openai",
        model="m",
        base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=3,
        backoff_s=0.5,
        max_backoff_s=1.5,
        concurrency=1,
        api_key_env="",
    )
    delays: list[float] = []
    annotator = OpenAIAnnotator(settings, sleep=delays.append)
    cfg = AnnotateConfig(
        input=str(pairs_file), out=str(tmp_path / "o"), annotator=settings, limit=1, show_progress_bar=False
    )
    with pytest.raises(AnnotationError, match=r"still failing after 3 retries \(ConnectError"):
        annotate(cfg, annotator)
    assert delays[:3] == [0.5, 1.0, 1.5] and annotator.requests_sent >= 4


class TrickleServer:
    """A loopback endpoint that answers every request with a valid chat reply, one byte per ``interval`` seconds
    (status line and headers included); it stops when the client hangs up or after ``limit_s`` seconds."""

    REPLY = json.dumps({"choices": [{"message": {"role": "assistant", "content": TCOT}}]}).encode()

    def __init__(self, interval: float = 0.25, limit_s: float = 60.0) -> None:
        self.interval, self.limit_s = interval, limit_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(limit_s)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        deadline = time.monotonic() + self.limit_s
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:
                conn, _ = self.sock.accept()
                with conn:
                    conn.recv(1 << 20)  # the request (small)
                    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    reply += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.REPLY) + self.REPLY
                    for i in range(len(reply)):
                        if time.monotonic() > deadline:
                            return
                        conn.sendall(reply[i : i + 1])  # raises once the client has cut the connection
                        time.sleep(self.interval)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_http_timeout_bounds_the_whole_reply_not_each_read() -> None:
    server = TrickleServer(interval=0.25)  # the whole reply would take ~60 s; no single read waits > 0.25 s
    try:
        settings = AnnotatorSettings(
            backend="openai", model="m", base_url=server.url, timeout_s=1.5, max_retries=1, backoff_s=0.0,
            concurrency=1, api_key_env="",
        )  # fmt: skip
        annotator = OpenAIAnnotator(settings)
        start = time.monotonic()
        with pytest.raises(AnnotationError, match=r"still failing after 1 retries \(ReadTimeout"):
            list(
                annotator.complete([ChatRequest("k", [{"role": "user", "content": [{"type": "text", "text": "x"}]}])])
            )
        elapsed = time.monotonic() - start
        assert annotator.requests_sent == 2 and elapsed < 2 * 1.5 + 2.0, elapsed  # two attempts of 1.5 s each
    finally:
        server.close()


def test_cli_annotate_then_filter_with_a_local_annotator(pairs_file: Path, tiny_backbone_dir, tmp_path: Path) -> None:
    model = str(tiny_backbone_dir("qwen3-vl"))
    annotator = [
        "--annotator.backend",
        "local",
        "--annotator.model",
        model,
        "--annotator.compact_prompts",
        "true",
        "--annotator.max_new_tokens",
        "4",
        "--annotator.dtype",
        "float32",
    ]
    ann = tmp_path / "ann"
    code = main(
        [
            "annotate",
            "--input",
            str(pairs_file.parent),
            "--out",
            str(ann),
            "--limit",
            "3",
            "--show_progress_bar",
            "false",
            *annotator,
        ]
    )
    assert code == 0 and len(list(read_jsonl(ann / "pairs.jsonl"))) == 3
    judge = [a.replace("--annotator.", "--judge.") for a in annotator]
    code = main(
        [
            "filter",
            "--input",
            str(ann),
            "--out",
            str(tmp_path / "f"),
            "--show_progress_bar",
            "false",
            "--rl_counts",
            "{CIRR: 1}",
            *judge,
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "f" / "filter.json").read_text())
    assert summary["totals"]["initial"] == 3 and summary["judge"] == f"local:{model}"
    assert (tmp_path / "f" / "rl.jsonl").is_file() and (tmp_path / "f" / "filtered.jsonl").is_file()
