import pytest
import torch

from fleetlm.train.bpe import train_bpe
from fleetlm.train.data import (
    IGNORE,
    DataError,
    Example,
    collate,
    encode_chat,
    load_chat,
    pack_texts,
    read_texts,
    sample_indices,
    step_batches,
)
from train_fixtures import chat_rows

CONVO = [{"role": "system", "content": "add numbers"}, {"role": "user", "content": "3+4="},
         {"role": "assistant", "content": "7"}, {"role": "user", "content": "and 5+5="},
         {"role": "assistant", "content": "ten, 10"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from fleetlm.model.tokenizer import Tokenizer

    texts = [m["content"] for r in chat_rows(200) for m in r["messages"]] + ["add numbers and ten"] * 5
    return Tokenizer.from_dir(train_bpe(texts, 300, tmp_path_factory.mktemp("tok")))


def test_chat_ids_reproduce_the_template_and_mask_only_assistant_turns(tok):
    ex = encode_chat(tok, CONVO)
    assert len(ex.ids) == len(ex.labels)
    # all ids together decode to exactly the chat template's text
    rendered = tok.apply_chat_template(CONVO, add_generation_prompt=False)
    assert tok.decode(ex.ids, skip_special_tokens=False) == rendered
    # the loss tokens are each answer plus the end-of-turn text that follows it, nothing else
    spans, cur = [], []
    for i, lab in zip(ex.ids, ex.labels, strict=True):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans += [cur] if cur else []
    texts = [tok.decode(s, skip_special_tokens=False) for s in spans]
    assert texts == ["7<|im_end|>\n", "ten, 10<|im_end|>\n"]
    # the prompt part is tokenized as the engine would tokenize it at inference
    prompt = tok.apply_chat_template(CONVO[:2], add_generation_prompt=True)
    first = ex.labels.index(next(lab for lab in ex.labels if lab != IGNORE))
    assert ex.ids[:first] == tok.encode(prompt, add_special_tokens=False)


def test_chat_errors(tok, tmp_path):
    with pytest.raises(DataError, match="assistant"):
        encode_chat(tok, [{"role": "user", "content": "hi"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_chat(bad, tok, 32)
    (tmp_path / "shape.jsonl").write_text('{"text": "no messages"}\n')
    with pytest.raises(DataError, match="expected"):
        load_chat(tmp_path / "shape.jsonl", tok, 32)
    with pytest.raises(DataError, match="not found"):
        load_chat(tmp_path / "missing.jsonl", tok, 32)


def test_truncation_drops_examples_without_an_answer(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    import json

    long = {"messages": [{"role": "user", "content": "9+9= " * 40}, {"role": "assistant", "content": "18"}]}
    path.write_text(json.dumps(long) + "\n" + json.dumps(chat_rows(1)[0]) + "\n")
    examples = load_chat(path, tok, 32)
    assert len(examples) == 1 and all(len(e.ids) <= 32 for e in examples)


def test_text_packing(tok, tmp_path):
    (tmp_path / "docs.txt").write_text("first document here\n\nsecond one\n\n\nthird and last document")
    texts = read_texts(tmp_path / "docs.txt")
    assert texts == ["first document here", "second one", "third and last document"]
    blocks = pack_texts(texts, tok, 8, eos_id=tok.eos_token_ids[0])
    stream = [i for t in texts for i in tok.encode(t, add_special_tokens=False) + [tok.eos_token_ids[0]]]
    assert all(len(b.ids) == 8 and b.labels == b.ids for b in blocks)
    assert [i for b in blocks for i in b.ids] == stream[: len(blocks) * 8]
    with pytest.raises(DataError, match="fewer than one block"):
        pack_texts(["a"], tok, 64, eos_id=0)


def test_collate_pads_right_without_loss():
    ids, labels = collate([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert labels.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_batches_are_a_function_of_step_and_split_evenly_over_processes():
    a = [sample_indices(10, s, 4, seed=1) for s in range(5)]
    assert a == [sample_indices(10, s, 4, seed=1) for s in range(5)]
    flat = [i for s in a for i in s]
    assert sorted(flat[:10]) == list(range(10))  # one epoch covers every example once
    assert a != [sample_indices(10, s, 4, seed=2) for s in range(5)]
    examples = [Example([i] * (1 + i % 3), [i] * (1 + i % 3)) for i in range(10)]
    one, n_one = step_batches(examples, 3, 8, 2, 0, 0)
    r0, n0 = step_batches(examples, 3, 8, 1, 0, 0, rank=0, world=2)
    r1, n1 = step_batches(examples, 3, 8, 1, 0, 0, rank=1, world=2)
    assert n_one == n0 == n1
    assert torch.equal(one[0][0], r0[0][0]) and torch.equal(one[1][0], r1[0][0])
