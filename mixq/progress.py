"""Progress bars for long steps (tqdm), silenced when asked or when not on a terminal in CI."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    if not enabled or os.environ.get("MIXQ_NO_PROGRESS") == "1":
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=f"mixq: {desc}", total=total, leave=False, dynamic_ncols=True)
