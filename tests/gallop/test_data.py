"""Records in every accepted format become completion-only training examples; bad records fail clearly."""

import json

import pytest
import torch

from gallop.data import Example, collate, encode, load_examples, to_example


class _CharTokenizer:
    """A one-character-per-token tokenizer with a tiny chat template (enough for the data path)."""

    eos_token_id = 1
    pad_token_id = 0
    chat_template = "x"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        out = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return out + ("<assistant>" if add_generation_prompt else "")


TOK = _CharTokenizer()


def test_formats():
    assert to_example({"prompt": "Q", "completion": " A"}) == Example("Q", (" A",), 0, sep="")
    assert to_example({"prompt": "Q", "answer": "A"}) == Example("Q", ("A",), 0)
    assert to_example({"prompt": "Q", "choices": ["a", "b"], "label": 1}).answer == "b"
    chat = to_example({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, TOK)
    assert chat.prompt == "<user>hi</user><assistant>" and chat.answer == "yo</assistant>" and chat.sep == ""
    mapped = to_example({"question": "Q", "response": "R"}, columns={"prompt": "question", "completion": "response"})
    assert mapped.prompt == "Q" and mapped.answer == "R"


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "Q"}, "no answer"),
        ({"prompt": "Q", "completion": "  "}, "non-empty string"),
        ({"text": "Q"}, "needs a string 'prompt'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant answer"),
        ({"prompt": "Q", "choices": ["a"], "label": 3}, "'label' must be an int index"),
    ],
)
def test_records_without_an_answer_fail_clearly(row, match):
    with pytest.raises(ValueError, match=match):
        to_example(row, TOK, where="rec 7")


def test_chat_needs_a_template():
    class NoTemplate(_CharTokenizer):
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        to_example({"messages": [{"role": "assistant", "content": "x"}]}, NoTemplate())


def test_completion_only_labels_and_truncation():
    batch = collate(TOK, [Example("abcdef", ("XY",), 0, sep="")])
    labels = batch["labels"][0].tolist()
    assert labels == [-100] * 6 + [ord("X"), ord("Y"), 1]
    ids, n_prompt = encode(TOK, "abcdefgh", "XY", sep="", max_length=5)
    assert ids == [ord(c) for c in "fghXY"] and n_prompt == 3  # the prompt loses its start first
    short = collate(TOK, [Example("abcdefgh", ("XYZ",), 0, sep="")], max_length=5)
    assert short["input_ids"].shape[1] == 5 and short["labels"][0, -1] == 1


def test_load_examples_from_jsonl_csv_and_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "completion": f" A{i}"}) for i in range(3)))
    assert [e.answer for e in load_examples(str(f))] == [" A0", " A1", " A2"]
    c = tmp_path / "d.csv"
    c.write_text("question,response\nq1,r1\nq2,r2\n")
    got = load_examples(str(c), columns={"prompt": "question", "completion": "response"})
    assert got[1] == Example("q2", ("r2",), 0, sep="")
    with pytest.raises(ValueError, match="record 0: needs a string 'prompt'"):
        load_examples(str(c))
    with pytest.raises(ValueError, match="unknown file type"):
        (tmp_path / "d.xml").write_text("<a/>")
        load_examples(str(tmp_path / "d.xml"))
    assert isinstance(collate(TOK, load_examples(str(f)))["input_ids"], torch.Tensor)
