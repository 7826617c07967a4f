"""A site's own file (prelort.data.sites): every format prelort reads, in the federation's template; and a
file that cannot be used is one clear reason that names no path and quotes no record."""

from __future__ import annotations

import json

import datasets
import pytest

from prelort.config import DataConfig
from prelort.data.sites import SiteDataError, load_site_records

SECRET = "CANARY-SITE-91c2"
ROWS = [{"instruction": f"Q{i} {SECRET}", "input": "", "output": f"A{i} {SECRET}"} for i in range(5)]


def _jsonl(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "directory", "saved", "saved_dict"])
def test_every_format_gives_the_sites_records(tmp_path, kind):
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / "site"
    if kind == "jsonl":
        path = _jsonl(tmp_path / "train.jsonl")
    elif kind == "csv":
        path = tmp_path / "train.csv"
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        path = tmp_path / "train.parquet"
        ds.to_parquet(str(path))
    elif kind == "directory":  # every file is the site's, whatever its name
        path.mkdir()
        _jsonl(path / "part-a.jsonl", ROWS[:2])
        _jsonl(path / "part-b-test.jsonl", ROWS[2:])
    elif kind == "saved":
        ds.save_to_disk(str(path))
    else:
        datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(path))
    records = load_site_records(str(path), DataConfig(template="alpaca"))
    assert sorted(records["output"]) == sorted(r["output"] for r in ROWS)
    assert records.column_names == ["instruction", "input", "output", "category"]


@pytest.mark.parametrize(
    ("make", "template", "reason"),
    [
        (lambda d: d / "absent.jsonl", "auto", "site data-path: no such file or directory on the site"),
        (lambda d: (d / "empty.jsonl").write_text("") and d / "empty.jsonl", "auto", "site data-path:"),
        (
            lambda d: (d / "bad.jsonl").write_text('{"instruction": "' + SECRET + '", oops\n') and d / "bad.jsonl",
            "auto",
            "site data-path: cannot be read as json",
        ),
        (
            lambda d: (d / "bad.csv").write_text(f'instruction,output\n"{SECRET},x\n') and d / "bad.csv",
            "auto",
            "site data-path: cannot be read as csv",
        ),
        (lambda d: (d / "notes.txt").write_text(SECRET) and d / "notes.txt", "auto", "not a json/jsonl/csv/parquet"),
        (lambda d: _jsonl(d / "train.jsonl"), "dolly", "template 'dolly' needs the column(s) response"),
        (
            lambda d: _jsonl(d / "noout.jsonl", [{"instruction": SECRET, "output": ""}]),
            "alpaca",
            "no record with a non-empty output",
        ),
    ],
)
def test_an_unusable_site_file_is_one_reason_without_path_or_record(tmp_path, make, template, reason):
    path = make(tmp_path)
    with pytest.raises(SiteDataError) as e:
        load_site_records(str(path), DataConfig(template=template))
    message = str(e.value)
    assert reason in message and "\n" not in message
    assert str(tmp_path) not in message and SECRET not in message


def test_the_eval_path_is_named_in_its_errors(tmp_path):
    with pytest.raises(SiteDataError, match="site eval-path: no such file"):
        load_site_records(str(tmp_path / "gone.jsonl"), DataConfig(), role="eval-path")
