import csv
from decimal import Decimal

import pytest

from fleetlm.evals import gsm8k
from fleetlm.evals.harness import EvalError

SHARED = gsm8k.DEFAULT_DATA
needs_shared = pytest.mark.skipif(not (SHARED / gsm8k.RESPONSES).is_file(), reason="no shared GSM8K data")


@pytest.mark.parametrize("text, number", [
    ("so 3 + 4 = 7.\nThe answer is 7.", "7"),
    ("The answer is $1,125.50", "1125.50"),
    ("The answer is: **-12**", "-12"),
    ("The answer is \u22123", "-3"),
    ("The answer is 18 dollars, not 20.", "18"),
    ("#### 540\n", "540"),
    ("She earns 3 * 20 = 60 dollars in total.", "60"),
    ("\\boxed{42}", "42"),
    ("first 10 then 0.5", "0.5"),
    ("The answer is .25", "0.25"),
    ("It costs 1,000,000.", "1000000"),
])
def test_final_number(text, number):
    assert gsm8k.final_number(text) == Decimal(number)


def test_no_number_and_exact_numeric_match():
    assert gsm8k.final_number("I do not know.") is None
    item = gsm8k.EvalItem(id="x", prompt="q", messages=[], domain="math", data={"gold": "18"})
    assert gsm8k.score(item, "18.00 in total. The answer is 18.00")[0] == 1.0
    assert gsm8k.score(item, "The answer is 19")[0] == 0.0
    assert gsm8k.score(item, "no idea")[0] == 0.0


def test_question_extraction_drops_a_few_shot_preamble():
    prompt = "Question: 1+1?\nAnswer: 2\n\nQuestion: How many legs do 3 cats have?\nAnswer:"
    assert gsm8k.extract_question(prompt) == "How many legs do 3 cats have?"
    assert gsm8k.extract_question("  Plain question?  ") == "Plain question?"


@needs_shared
def test_gold_from_the_shared_csv():
    items, dropped = gsm8k.load(SHARED)
    # 660 rows: 3 are contaminated, 61 more have no correct recorded answer, 1 has two correct answers
    # that end in different numbers (54 and -54 miles), so it has no unambiguous gold.
    assert dropped == {"contaminated": 3, "no_correct_answer": 61, "correct_answers_disagree": 1}
    assert len(items) == 595 and len({it.id for it in items}) == 595
    def gold(start):
        return next(it.data["gold"] for it in items if it.prompt.startswith(start))

    assert gold("James decides to run 3 sprints") == "540"
    assert gold("Toulouse has twice as many sheep") == "260"
    # Only GPT-4's answer is marked correct here, and it has no "####" line: its last number counts.
    assert gold("Every day, Wendi feeds each of her chickens") == "20"
    assert not any(it.prompt.startswith("Claire makes a 3 egg omelet") for it in items)  # contaminated
    asks = [it.messages[0]["content"] for it in items]
    assert all(a.startswith(it.prompt) and "The answer is" in a for a, it in zip(asks, items, strict=True))


def test_a_folder_of_the_same_layout_and_errors(tmp_path):
    with (tmp_path / gsm8k.RESPONSES).open("w", newline="") as f:
        csv.writer(f).writerows([["prompt", "a", "b", "a_response", "b_response"],
                                 ["Two plus two?", "True", "False", "2 + 2 = 4\n#### 4", "five"],
                                 ["Seen before?", "True", "True", "#### 1", "#### 1"],
                                 ["Nobody right?", "False", "False", "#### 3", "#### 3"]])
    (tmp_path / gsm8k.CONTAMINATED).write_text('{"eval_prompt": "Seen  before?", "train_prompt": "x"}\n')
    items, dropped = gsm8k.load(tmp_path)
    assert [(it.prompt, it.data["gold"]) for it in items] == [("Two plus two?", "4")]
    assert dropped["contaminated"] == 1 and dropped["no_correct_answer"] == 1
    with pytest.raises(EvalError, match="no GSM8K data"):
        gsm8k.load(tmp_path / "missing")
    (tmp_path / gsm8k.RESPONSES).write_text("question,answer\nq,a\n")
    with pytest.raises(EvalError, match="want columns prompt"):
        gsm8k.load(tmp_path)
