"""A site's own records: the file (or directory, or saved dataset) a site names with ``data-path`` /
``eval-path`` (a SuperNode's node-config) or ``clients.sites`` (in-process), read with the loaders of
:mod:`.sources` and mapped by the federation's ``data.template`` (:mod:`.templates`).

What goes wrong is a :class:`SiteDataError` whose message is sent to the server as the client's failure
reason, so it names the problem and never the path, a record or a parser excerpt (a CSV parser quotes the
offending line): ``detail`` keeps the full local message for the site's own log.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from ..config import DataConfig
from .sources import _BUILDERS, load_local
from .templates import DataError, apply_template


class SiteDataError(DataError):
    """A site's file cannot be used. ``str(e)`` is safe to send to the server; ``detail`` is for the site."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail or reason


def load_site_records(path: str, data: DataConfig, role: str = "data-path") -> datasets.Dataset:
    """The records of the site file ``path``, with the columns instruction, input, output, category.

    A directory of data files is read whole (every file, whatever its name); a saved DatasetDict gives its
    ``train`` split (or its only one). ``role`` names the setting in errors (``data-path``, ``eval-path``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise SiteDataError(f"site {role}: no such file or directory on the site")
    try:
        loaded = load_local(p)
    except DataError as e:
        if p.is_file() and p.suffix.lower() in _BUILDERS:
            what = f"cannot be read as {_BUILDERS[p.suffix.lower()]}"
        else:
            what = f"not a {'/'.join(s.lstrip('.') for s in _BUILDERS)} file, a directory of them or a saved dataset"
        raise SiteDataError(f"site {role}: {what} (the site's log has the parser's message)", str(e)) from None
    except Exception as e:  # permissions, a file that vanished: the kind of failure only
        raise SiteDataError(f"site {role}: cannot be read ({type(e).__name__})", f"{p}: {e}") from None
    if (p / "dataset_dict.json").is_file():  # a saved DatasetDict: its train split
        records = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    else:  # a site's files are all its records, whatever their names
        records = datasets.concatenate_datasets([loaded[split] for split in loaded])
    if len(records) == 0:
        raise SiteDataError(f"site {role}: the file holds no record")
    try:
        # the template's messages name the template and the columns, never a record
        return apply_template(records, data.template)
    except DataError as e:
        raise SiteDataError(f"site {role}: {e}") from None
