"""Progress bars for long work (tqdm on stderr; silent when FEDSCOPE_NO_PROGRESS=1 or not a terminal in CI)."""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def enabled() -> bool:
    """Progress bars are shown unless FEDSCOPE_NO_PROGRESS=1."""
    return os.environ.get("FEDSCOPE_NO_PROGRESS", "0") != "1"


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", **kwargs: Any) -> tqdm:
    """Returns a tqdm bar over `iterable` (or a manual bar when None), writing to stderr."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(), file=sys.stderr,
                dynamic_ncols=True, **kwargs)
