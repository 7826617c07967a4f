"""Load (train, test) records from the builtin suite, a local file or directory, or a hub dataset."""

from __future__ import annotations

from pathlib import Path

import datasets

from ..config import DataConfig
from .builtin import build_builtin_suite
from .templates import DataError, apply_template

# file suffix -> datasets builder
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_TEST_SPLIT_NAMES = ("test", "validation", "valid", "eval")


def _looks_local(source: str) -> bool:
    """A path the user meant as a local file (so a missing one is "no such file", not a hub lookup)."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or Path(source).suffix.lower() in _BUILDERS
        or Path(source).expanduser().exists()
    )


def _local_files(path: Path) -> tuple[str, dict[str, list[str]]]:
    """Builder name and split -> files for a local file or a directory of data files.

    In a directory, files whose name contains test/validation/valid/eval form the test split, the others
    the train split (data.split applies to hub datasets only).
    """
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
        return builder, {"train": [str(path)]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
    if not files:
        raise DataError(f"{path}: no {'/'.join(_BUILDERS)} file in this directory")
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise DataError(f"{path}: mixes file types ({', '.join(sorted(builders))}); keep one type per directory")
    splits: dict[str, list[str]] = {}
    for p in files:
        stem = p.stem.lower()
        is_test = any(name in stem for name in _TEST_SPLIT_NAMES)
        splits.setdefault("test" if is_test else "train", []).append(str(p))
    if "train" not in splits:
        raise DataError(f"{path}: only held-out files ({', '.join(splits['test'])}); a training file is needed")
    return builders.pop(), splits


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (arrow files and JSON
    state: nothing is unpickled when it is read)."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json"))


def _load_saved(path: Path) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read as a saved dataset: {type(e).__name__}: {e}") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def load_local(path: Path) -> datasets.DatasetDict:
    """A local file, a directory of data files, or a saved Hugging Face dataset, as a DatasetDict."""
    if is_saved_dataset(path):
        return _load_saved(path)
    builder, data_files = _local_files(path)
    try:
        loaded = datasets.load_dataset(builder, data_files=data_files)
    except Exception as e:  # a malformed file: say which and why, not a parser traceback
        raise DataError(f"{path}: cannot read as {builder}: {type(e).__name__}: {e}") from None
    assert isinstance(loaded, datasets.DatasetDict)
    return loaded


def _load_hub(source: str, split: str) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(source)
    except Exception as e:
        raise DataError(
            f"cannot load dataset {source!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline? Use data.source=builtin or a local json/jsonl/csv/parquet file or directory."
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"dataset {source!r} did not load as a set of splits")
    if split not in loaded:
        raise DataError(f"dataset {source!r} has no split {split!r}; it has {', '.join(loaded)}")
    return loaded


def load_records(cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) with the string columns instruction, input, output, category.

    The test side is the source's own held-out split when it has one (test, then validation), otherwise a
    seeded ``cfg.test_fraction`` of the (templated) train split.
    """
    source = cfg.source.strip()
    if source == "builtin":
        if cfg.suite == "facts":  # sized by data.facts, not num_train / num_test
            from .facts import build_facts_suite

            return build_facts_suite(seed, cfg.facts)
        return build_builtin_suite(seed, cfg.num_train, cfg.num_test)
    template = cfg.template
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"data.source {source!r}: no such file or directory")
        loaded = load_local(path)
        train_split = "train"
    else:
        loaded = _load_hub(source, cfg.split)
        train_split = cfg.split
    train = apply_template(loaded[train_split], template)
    test_split = next((s for s in _TEST_SPLIT_NAMES if s in loaded and s != train_split), None)
    if test_split is not None:
        return train, apply_template(loaded[test_split], template)
    if len(train) < 2:
        raise DataError(f"data.source {source!r}: {len(train)} usable record(s); cannot hold out a test split")
    parts = train.train_test_split(test_size=cfg.test_fraction, seed=seed)
    return parts["train"], parts["test"]
