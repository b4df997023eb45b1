"""tqdm progress bars driven by the pipeline's progress events (stderr; silenced by --quiet)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from diffrecon.errors import printable


class TqdmProgress:
    """Callable receiving pipeline events: one bar over files, one bar per slice over the
    solver's steps (the solver callback's ``i``), messages printed above the bars."""

    def __init__(self, n_files: int, quiet: bool = False, position_offset: int = 0):
        self.quiet = quiet
        self.files = None
        self.steps = None
        self.n_files = n_files
        self.offset = position_offset
        self.total_steps = None
        self.current = ""

    def _tqdm(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(file=sys.stderr, dynamic_ncols=True, leave=False, **kw)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.quiet:
            return
        kind = event.get("event")
        if kind in ("file", "skip"):
            if self.files is None and self.n_files > 1:
                self.files = self._tqdm(total=self.n_files, desc="files", unit="file",
                                        position=self.offset)
            if kind == "file":
                self.total_steps = event.get("steps")
                self._close_steps()
                self.current = printable(Path(event.get("path", "")).name)
            elif self.files is not None:
                self.files.update(1)
        elif kind == "step":
            if self.steps is None:
                pos = {} if self.files is None else {"position": self.offset + 1}
                ks = event.get("slices") or [event.get("slice")]
                what = f"slice{'s' if len(ks) > 1 else ''} {','.join(map(str, ks))}"
                self.steps = self._tqdm(total=self.total_steps, unit="step",
                                        desc=f"{self.current} {what}", **pos)
            self.steps.update(1)
        elif kind == "slice":
            self._close_steps()
        elif kind == "done" and self.files is not None:
            self.files.update(1)
        elif kind == "message":
            from tqdm.auto import tqdm

            tqdm.write(f"diffrecon: {printable(event.get('text'))}", file=sys.stderr)

    def _close_steps(self):
        if self.steps is not None:
            self.steps.close()
            self.steps = None

    def close(self):
        self._close_steps()
        if self.files is not None:
            self.files.close()
            self.files = None
