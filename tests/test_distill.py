import json
import math
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fake_openai import UpstreamServer
from fleetlm.cli import app, main
from fleetlm.errors import CheckpointError, ConfigError
from fleetlm.model.checkpoint import load_checkpoint
from fleetlm.model.tokenizer import Tokenizer
from fleetlm.tasks.suite import generate, write_jsonl
from fleetlm.train.data import IGNORE, DataError, Example, collate, load_chat
from fleetlm.train.distill import (
    DistillError,
    DistillLoss,
    LocalTeacher,
    OnPolicy,
    distill,
    is_on_policy_step,
    parse_distill_config,
    read_prompts,
    sample_answers,
    train_config,
)
from fleetlm.train.loop import Batch, lm_loss
from fleetlm.train.losses import divergence

QUICK = dict(steps=6, batch_size=4, lr=1e-2, seq_len=48, progress=False, eval_interval=0, warmup_steps=1)


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama")


@pytest.fixture(scope="module")
def student(tiny_checkpoint_factory):
    return tiny_checkpoint_factory("llama", hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(generate(["arithmetic"], n=16, seed=0, levels=[1, 2]),
                       tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


def mean_divergence(student_dir, teacher_dir, data_file, method="kl") -> float:
    """Mean divergence per answer token between a student checkpoint and the teacher, on the data."""
    tok = Tokenizer.from_dir(student_dir)
    ids, labels = collate(load_chat(data_file, tok, 48), tok.pad_token_id)
    mask = labels[:, 1:] != IGNORE
    with torch.no_grad():
        s = load_checkpoint(student_dir)(ids)[:, :-1][mask]
        t = load_checkpoint(teacher_dir)(ids)[:, :-1][mask]
    return divergence(method, s, t).mean().item()


def test_read_prompts_takes_task_records_chat_and_prompt_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"id": "a", "domain": "arithmetic", "messages": [{"role": "user", "content": "1 + 1 ="}],
         "answer": "2"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"prompt": "name a colour"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_prompts(path)
    assert [r.messages[0]["content"] for r in got] == ["1 + 1 =", "hi", "name a colour"]
    assert all(len(r.messages) == 1 and r.messages[0]["role"] == "user" for r in got)
    assert [r.answer for r in got] == ["2", "hello", None]
    assert got[0].meta == {"id": "a", "domain": "arithmetic"}
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=":2:"):
        read_prompts(path)


def test_train_config_from_yaml_without_data_and_student_override(tmp_path, student, prompts):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(
        {"model": {"shape": {"hidden_size": 16}}, "steps": 7, "lr": 1e-3, "out_dir": "out",
         "data": {"seq_len": 40}}))
    cfg = train_config(tmp_path / "train.yaml", student, prompts, batch_size=2)
    assert cfg.model.init == student.resolve() and cfg.model.shape is None
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.data.seq_len) == (7, 1e-3, 2, 40)
    assert cfg.out_dir == tmp_path / "out"  # relative to the yaml's folder, as fleet train does
    with pytest.raises(ConfigError, match="student"):
        train_config(None, None, prompts)


def test_forward_kl_distillation_brings_the_student_closer(tmp_path, teacher, student, prompts):
    cfg = train_config(None, student, prompts, out_dir=tmp_path / "run", **QUICK)
    dcfg = parse_distill_config({"teacher": str(teacher), "prompts": prompts, "method": "kl", "alpha": 1.0})
    result = distill(cfg, dcfg)
    assert result.step == 6 and (tmp_path / "run" / "model.safetensors").is_file()
    data = tmp_path / "run" / "distill_data.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 16 and {r["source"] for r in rows} == {"gold"}  # the records carry gold answers
    before = mean_divergence(student, teacher, data)
    after = mean_divergence(tmp_path / "run", teacher, data)
    assert after < 0.8 * before, (before, after)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_distill_loss_mixes_divergence_and_lm_loss_except_on_policy(teacher):
    t = LocalTeacher(teacher)
    tok = t.tokenizer
    ids = torch.tensor([tok.encode("one two three four five six", add_special_tokens=False)])
    labels = ids.clone()
    labels[:, :3] = IGNORE
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(*ids.shape, t.model.config.vocab_size, generator=gen)
    loss = DistillLoss(t, "rkl", tok.vocab_size, alpha=0.25, temperature=2.0)
    mask = labels[:, 1:] != IGNORE
    kd = divergence("rkl", logits[:, :-1][mask], t.logits(ids)[:, :-1][mask], temperature=2.0).sum() * 4.0
    off = loss(logits, Batch(ids, labels))
    torch.testing.assert_close(off, 0.25 * kd + 0.75 * lm_loss(logits, Batch(ids, labels)))
    torch.testing.assert_close(loss(logits, Batch(ids, labels, on_policy=True)), kd)


def test_on_policy_steps_are_the_set_fraction():
    for fraction in (0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0):
        chosen = [s for s in range(120) if is_on_policy_step(s, fraction)]
        assert len(chosen) == math.floor(120 * fraction + 1e-9)
    assert [s for s in range(8) if is_on_policy_step(s, 0.25)] == [3, 7]  # spread, not bunched


def test_on_policy_batches_are_the_students_own_samples(student):
    model = load_checkpoint(student)
    tok = Tokenizer.from_dir(student)
    chat = tok.apply_chat_template([{"role": "user", "content": "2 + 2 ="}])
    prompt = tok.encode(chat, add_special_tokens=False)
    answer = tok.encode("4<|eot_id|>", add_special_tokens=False)
    ids, labels = collate([Example(prompt + answer, [IGNORE] * len(prompt) + answer)], tok.pad_token_id)
    batch = Batch(ids, labels)
    hook = OnPolicy(0.5, tok, tok.pad_token_id, seq_len=len(prompt) + 6, max_new_tokens=6, temperature=0.0)
    assert hook(0, model, [batch]) == [batch]  # step 0 of fraction 0.5 stays off-policy
    (new,) = hook(1, model, [batch])
    assert hook.steps == [1] and new.on_policy
    expected = sample_answers(model, tok, [prompt], 6, 0.0, seed=0)[0]
    assert new.input_ids[0, : len(prompt)].tolist() == prompt
    assert new.labels[0].tolist() == [IGNORE] * len(prompt) + expected
    assert 1 <= len(expected) <= 6 and model.layers[0].self_attn.kv_cache is None  # no cache left behind


def test_hf_and_our_model_sample_the_same_greedy_answers(student):
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_dir(student)
    prompts = [tok.encode(text, add_special_tokens=False) for text in ("The fleet", "Add 1")]
    ours = sample_answers(load_checkpoint(student), tok, prompts, 5, 0.0, seed=0)
    hf = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    assert sample_answers(hf, tok, prompts, 5, 0.0, seed=0) == ours
    assert all(len(a) >= 1 for a in ours)


def test_gkd_with_on_policy_fraction_runs_and_reports_the_steps(tmp_path, teacher, student, prompts):
    cfg = train_config(None, student, prompts, out_dir=tmp_path / "run", **{**QUICK, "steps": 4})
    dcfg = parse_distill_config({"teacher": str(teacher), "prompts": prompts, "method": "gkd", "beta": 0.3,
                                 "on_policy_fraction": 0.5, "max_new_tokens": 4})
    result = distill(cfg, dcfg)
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert report["on_policy_steps"] == [1, 3] and result.step == 4
    assert all(math.isfinite(h["loss"]) and h["loss"] > 0 for h in result.history)
    assert parse_distill_config({"teacher": "t", "prompts": "p", "method": "onpolicy"}).fraction == 0.5


def test_seq_level_from_an_openai_compatible_teacher(tmp_path, student, prompts, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY", "sk-test")
    with UpstreamServer() as up:
        cfg = train_config(None, student, prompts, out_dir=tmp_path / "run", **{**QUICK, "steps": 2})
        dcfg = parse_distill_config({"teacher": up.base_url, "teacher_model": "big", "prompts": prompts,
                                     "method": "seq", "api_key_env": "TEACHER_KEY", "max_new_tokens": 20})
        result = distill(cfg, dcfg)
        assert result.step == 2
        data = tmp_path / "run" / "distill_data.jsonl"
        rows = [json.loads(line) for line in data.read_text().splitlines()]
        assert len(rows) == 16 and up.calls["big"] == 16
        for row in rows:
            user, reply = row["messages"]
            assert row["source"] == "teacher" and reply["content"] == f"echo: {user['content']}"
        assert all(p["max_tokens"] == 20 and p["temperature"] == 0.0 for p in up.payloads)
        assert all(h.get("authorization") == "Bearer sk-test" for h in up.headers)
        bad = parse_distill_config({"teacher": up.base_url, "teacher_model": "badreq", "prompts": prompts,
                                    "method": "seq", "retries": 0})
        with pytest.raises(DistillError, match="400: context too long"):
            distill(cfg, bad)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fleet", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


def test_cli_seq_with_a_local_teacher_trains_on_its_greedy_answers(tmp_path, teacher, student, prompts):
    from fleetlm.engine import Engine

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "distill", "--teacher", str(teacher), "--student", str(student), "--data", str(prompts),
        "--method", "seq", "--steps", "2", "--batch-size", "4", "--seq-len", "64", "--max-new-tokens", "8",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "seq: step 2" in result.output and (out / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "distill_data.jsonl").read_text().splitlines()]
    by_prompt = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    records = read_prompts(prompts)
    answers = Engine.load(teacher, "f32").chat([r.messages for r in records[:4]], max_tokens=8)
    assert [by_prompt[r.messages[0]["content"]] for r in records[:4]] == answers


@pytest.mark.parametrize("extra, message", [
    (["--method", "mse"], "unknown method 'mse'"),
    (["--method", "kl", "--teacher", "http://127.0.0.1:9/v1", "--teacher-model", "x"], "teacher's logits"),
    (["--method", "gkd", "--beta", "1.5"], "beta"),
])
def test_cli_config_mistakes_are_one_line_and_exit_2(extra, message, student, prompts, monkeypatch, capsys,
                                                     tmp_path):
    args = ["distill", "--student", str(student), "--data", str(prompts), "--out", str(tmp_path / "r")]
    if "--teacher" not in extra:
        args += ["--teacher", str(student)]
    code, err = run_main(monkeypatch, capsys, *args, *extra)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_cli_missing_teacher_and_tokenizer_mismatch_are_one_line_and_exit_2(
        tmp_path, student, prompts, monkeypatch, capsys, tiny_checkpoint_factory):
    other = tiny_checkpoint_factory("qwen2")  # a chatml tokenizer: other special tokens
    capsys.readouterr()  # building it prints transformers' progress
    base = ["distill", "--student", str(student), "--data", str(prompts), "--out", str(tmp_path / "r")]
    code, err = run_main(monkeypatch, capsys, *base)
    assert code == 2 and err == "error: give the teacher: --teacher DIR (a checkpoint) or --teacher http://HOST/v1\n"
    code, err = run_main(monkeypatch, capsys, *base, "--teacher", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1 and "teacher not found" in err
    code, err = run_main(monkeypatch, capsys, *base, "--teacher", str(other), "--method", "rkl")
    assert code == 2 and err.count("\n") == 1 and "needs one tokenizer" in err, err
    with pytest.raises(CheckpointError, match="student is not a checkpoint"):
        distill(train_config(None, tmp_path, prompts, out_dir=tmp_path / "r"),
                parse_distill_config({"teacher": str(student), "prompts": prompts, "method": "seq"}))
