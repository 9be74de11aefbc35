"""bench/vqa.py's parts: arguments, nested subsets, the three arms' messages, and a run against a scripted
gateway (answers kept, scored, summarised and plotted)."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from bench_scripts import bench_script
from fleetlm.vision.docset import generate_set


@pytest.fixture(scope="module")
def bench():
    with bench_script("vqa") as module:
        yield module


def test_arguments_and_their_errors(bench):
    args = bench.parse_args(["--subset", "m=5"])
    assert args.arms == list(bench.ARMS) and args.auto_arms == ["two-stage"] and args.subset == {"m": 5}
    assert args.models == list(bench.DEFAULT_MODELS)
    for bad in (["--arms", "two-stage,photo"], ["--subset", "m"], ["--subset", "m=0"], ["--questions", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_subsets_are_seeded_nested_and_in_order(bench):
    _, questions = generate_set(40, seed=0)
    args = SimpleNamespace(seed=0, subset={"small": 10, "big": 25})
    small, big = bench.questions_for("small", questions, args), bench.questions_for("big", questions, args)
    assert len(small) == 10 and len(big) == 25 and set(small) <= set(big)
    assert small == sorted(small, key=questions.index)
    assert bench.questions_for("other", questions, args) == questions


def test_the_three_arms_messages(bench):
    docs, questions = generate_set(4, seed=0)
    doc, q = docs[0], questions[0]
    [image_msg] = bench.messages_for("two-stage", q, doc, "gateway", {})
    image_part, text_part = image_msg["content"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == doc.render().size
    assert q.question in text_part["text"] and bench.INSTRUCTION in text_part["text"]
    [local] = bench.messages_for("two-stage", q, doc, "local", {doc.id: "[image 1: OCR]"})
    assert local["content"] == f"\n[image 1: OCR]\n{bench.ask_text(q)}"  # as the gateway joins the parts
    [truth] = bench.messages_for("ground-truth", q, doc, "gateway", {})
    assert doc.text in truth["content"]
    [floor] = bench.messages_for("no-image", q, doc, "gateway", {})
    assert q.question in floor["content"] and doc.rows[0].text not in floor["content"]


def test_the_gateway_vision_header_is_read(bench):
    assert bench.read_vision_header("rapidocr-ppocrv4 (1 image, 412 ms)") == ("rapidocr-ppocrv4", 412.0)
    assert bench.read_vision_header("none: m sees the images (1 image)") == ("none: m sees the images", None)


def test_a_run_scores_summarises_and_resumes(bench, gw, tmp_path):
    docs, questions = generate_set(8, seed=0)
    answer_of = {(q.question, d.text): q.answer for d in docs for q in d.questions}

    def reader(body: dict) -> str:  # reads the document when it is in the prompt, else guesses
        prompt = body["messages"][0]["content"]
        return next((f"${a}" for (question, text), a in answer_of.items()
                     if question in prompt and text in prompt), "I cannot tell")

    gw.script("m1", *[reader] * 16)
    (tmp_path / "ocr.json").write_text(json.dumps({  # an earlier run's stage-one figures (no OCR here)
        "documents": 2, "cer": 0.01, "cer_by_kind": {"receipt": 0.0}, "cer_clean": None, "cer_degraded": 0.01,
        "clean_documents": 0, "ocr_seconds_mean": 1.0, "ocr_seconds_median": 1.0, "ocr_seconds_max": 1.0,
        "stage_one": "rapidocr-ppocrv4", "first_image_seconds": 2.0}))
    argv = ["--questions", "8", "--models", "m1", "--arms", "ground-truth,no-image", "--url", gw.url,
            "--out", str(tmp_path), "--resume", "--no-progress"]
    assert bench.main(argv) == 0
    rows = {r["arm"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["ground-truth"]["n"] == 8 and rows["ground-truth"]["exact"] == 1.0
    assert rows["no-image"]["exact"] == 0.0 and rows["no-image"]["errors"] == 0
    assert rows["ground-truth"]["cost_usd_total"] > 0 and rows["ground-truth"]["answered_by"] == {"m1": 8}
    assert (tmp_path / "vqa.png").stat().st_size > 0
    assert bench.main([*argv, "--no-plot"]) == 0  # everything answered already: nothing asked again
    assert len(gw.bodies("m1")) == 16
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 16
