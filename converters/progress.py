"""Progress display for conversions (rich, on stderr): tensors done, source bytes, speed, ETA."""
from __future__ import annotations

import sys


class NullProgress:
    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def tensor(self, name: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def tensor_done(self) -> None:
        pass


class RichProgress(NullProgress):
    def __init__(self, n_tensors: int, total_bytes: int):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self._p = Progress(
            TextColumn("{task.fields[count]:>9}"), TextColumn("[bold]{task.fields[tensor]:<28.28}"), BarColumn(),
            DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._task = self._p.add_task("convert", total=max(total_bytes, 1), tensor="", count="")
        self._done = 0
        self._n = n_tensors

    def __enter__(self) -> "RichProgress":
        self._p.start()
        return self

    def __exit__(self, *exc) -> None:
        self._p.stop()

    def tensor(self, name: str) -> None:
        self._p.update(self._task, tensor=name, count=f"{self._done + 1}/{self._n}")

    def advance(self, nbytes: int) -> None:
        self._p.advance(self._task, nbytes)

    def tensor_done(self) -> None:
        self._done += 1


def make_progress(enabled: bool, n_tensors: int, total_bytes: int) -> NullProgress:
    if not enabled or not sys.stderr.isatty():
        return NullProgress()
    return RichProgress(n_tensors, total_bytes)
