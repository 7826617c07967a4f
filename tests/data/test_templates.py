from __future__ import annotations

import csv
import json

import datasets
import huggingface_hub.constants
import pytest

from prelort.config import DataConfig
from prelort.data import DataError, apply_template, detect_template, load_records


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _alpaca_rows(n):
    return [
        {"instruction": f"Add {i} and 1.", "input": "" if i % 2 else f"{i}", "output": str(i + 1), "text": "x"}
        for i in range(n)
    ]


def test_alpaca_jsonl_with_held_out_fraction(tmp_path):
    rows = _alpaca_rows(40) + [{"instruction": "Empty answer", "input": "", "output": "  ", "text": ""}]
    path = tmp_path / "alpaca.jsonl"
    _write_jsonl(path, rows)
    train, test = load_records(DataConfig(source=str(path), test_fraction=0.25), seed=1)
    assert train.column_names == ["instruction", "input", "output", "category"]
    assert (len(train), len(test)) == (30, 10)  # the empty-output record is dropped, 25% held out
    records = {r["instruction"]: r for r in list(train) + list(test)}
    assert "Empty answer" not in records
    expected = {"instruction": "Add 4 and 1.", "input": "4", "output": "5", "category": "general"}
    assert records["Add 4 and 1."] == expected
    assert records["Add 3 and 1."]["input"] == ""
    again = load_records(DataConfig(source=str(path), test_fraction=0.25), seed=1)
    assert again[1]["instruction"] == test["instruction"]
    other = load_records(DataConfig(source=str(path), test_fraction=0.25), seed=2)
    assert other[1]["instruction"] != test["instruction"]


def test_dolly_csv(tmp_path):
    path = tmp_path / "dolly.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "context", "response", "category"])
        writer.writeheader()
        for i in range(20):
            writer.writerow(
                {
                    "instruction": f"Question {i}?",
                    "context": f"Context {i}" if i % 3 else "",
                    "response": f"Answer {i}",
                    "category": "open_qa" if i % 2 else "closed_qa",
                }
            )
    train, test = load_records(DataConfig(source=str(path), template="dolly", test_fraction=0.2), seed=0)
    assert (len(train), len(test)) == (16, 4)
    rec = {r["instruction"]: r for r in list(train) + list(test)}["Question 4?"]
    assert rec == {"instruction": "Question 4?", "input": "Context 4", "output": "Answer 4", "category": "closed_qa"}
    assert rec["input"] == "Context 4"
    assert {r["input"] for r in list(train) + list(test) if r["instruction"] == "Question 3?"} == {""}


def test_natural_instructions_directory_with_its_own_test_split(tmp_path):
    def rows(split, n):
        return [
            {
                "task_name": f"task{i % 3:03d}_sentiment",
                "id": f"{split}-{i}",
                "definition": "Classify the sentiment as positive or negative.",
                "inputs": f"Review {split} {i}",
                "targets": ["positive", "negative"][i % 2],
            }
            for i in range(n)
        ]

    (tmp_path / "ni").mkdir()
    _write_jsonl(tmp_path / "ni" / "train.jsonl", rows("train", 12))
    _write_jsonl(tmp_path / "ni" / "test.jsonl", rows("test", 5))
    train, test = load_records(DataConfig(source=str(tmp_path / "ni")), seed=0)  # auto-detected
    assert (len(train), len(test)) == (12, 5)  # the directory's own test file, no hold-out
    assert train[1] == {
        "instruction": "Classify the sentiment as positive or negative.",
        "input": "Review train 1",
        "output": "negative",
        "category": "task001_sentiment",
    }
    assert set(test["input"]) == {f"Review test {i}" for i in range(5)}


def test_natural_instructions_list_targets_and_definition():
    ds = datasets.Dataset.from_list(
        [{"definition": ["Part one.", "Part two."], "inputs": "x", "targets": ["first", "second"], "task_name": "t1"}]
    )
    out = apply_template(ds, "natural-instructions")
    assert out[0] == {"instruction": "Part one.\nPart two.", "input": "x", "output": "first", "category": "t1"}


def test_builtin_layout_parquet(tmp_path):
    ds = datasets.Dataset.from_dict(
        {
            "instruction": ["Q"] * 10,
            "input": [str(i) for i in range(10)],
            "output": [str(2 * i) for i in range(10)],
            "category": ["double"] * 10,
            "extra": list(range(10)),
        }
    )
    path = tmp_path / "suite.parquet"
    ds.to_parquet(str(path))
    train, test = load_records(DataConfig(source=str(path), test_fraction=0.3), seed=0)
    assert (len(train), len(test)) == (7, 3)
    assert train.column_names == ["instruction", "input", "output", "category"]
    assert all(r["output"] == str(2 * int(r["input"])) for r in list(train) + list(test))


def test_detection_and_missing_columns_errors():
    assert detect_template(["instruction", "input", "output"]) == "alpaca"
    assert detect_template(["instruction", "context", "response", "category"]) == "dolly"
    assert detect_template(["task_name", "id", "definition", "inputs", "targets"]) == "natural-instructions"
    assert detect_template(["instruction", "input", "output", "category"]) == "builtin"
    with pytest.raises(DataError, match=r"cannot detect a template from the columns \['answer', 'question'\]"):
        detect_template(["question", "answer"])
    ds = datasets.Dataset.from_dict({"instruction": ["q"], "output": ["a"]})
    with pytest.raises(DataError, match="template 'dolly' needs the column\\(s\\) response"):
        apply_template(ds, "dolly")
    empty = datasets.Dataset.from_dict({"instruction": ["q"], "output": [""]})
    with pytest.raises(DataError, match="no record with a non-empty output"):
        apply_template(empty, "alpaca")


def test_missing_local_file_and_bad_file(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_records(DataConfig(source=str(tmp_path / "missing.jsonl")), seed=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read as json"):
        load_records(DataConfig(source=str(bad)), seed=0)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(DataConfig(source=str(tmp_path / "notes.txt")), seed=0)


def test_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    # offline mode makes the hub lookup fail at once (no network here anyway) through the real code path
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load dataset 'tatsu-lab/alpaca' from the Hugging Face hub"):
        load_records(DataConfig(source="tatsu-lab/alpaca"), seed=0)


def test_builtin_source():
    train, test = load_records(DataConfig(source="builtin", num_train=40, num_test=16), seed=5)
    assert (len(train), len(test)) == (40, 16)
    assert set(train["category"]) == set(test["category"])
