"""Progress bars: tqdm's bar on a terminal, a few plain lines in a log file.

Redirected to a file (a log, a CI job, a Ray worker's output), tqdm's bar becomes thousands
of carriage-return updates per loop.  :class:`tqdm` here keeps tqdm's call API (iterable,
``total``, ``desc``, ``unit``, ``update``, ``set_postfix``, ``close``, ``with``,
``tqdm.write``) and draws the real bar when its output is a terminal; otherwise it prints one
newline-terminated line when the loop starts, when it passes a quarter of its total (at most
one line per :attr:`tqdm.PLAIN_GAP_S` seconds) and when it ends.  A nested or transient bar
(opened inside another one, or ``leave=False``) stays silent unless it runs longer than that
gap, so a bar per batch inside a bar per user adds no lines to a quick loop.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.std import tqdm as _std_tqdm

__all__ = ["tqdm"]


class _Sink:
    """Where tqdm's own drawing goes when the output is not a terminal: nowhere."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class tqdm(_std_tqdm):  # noqa: N801 -- a drop-in for tqdm.tqdm keeps its name
    """``tqdm.tqdm`` on a terminal; start, quarter and end lines anywhere else."""

    PLAIN_GAP_S = 30.0  # fewest seconds between two plain lines of one bar (not the end line)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before tqdm's __init__, which displays the bar (and close() may run if it raises).
        positional_file = args[4] if len(args) > 4 else None  # tqdm(iterable, desc, total, leave, file, ...)
        out = kwargs.get("file") or positional_file or sys.stderr
        is_terminal = getattr(out, "isatty", lambda: False)()
        # disable=None means "off when not a terminal": tqdm honours that itself.
        self._plain = not is_terminal and kwargs.get("disable", False) is not None
        self._out = out
        self._last_line_t: float | None = None
        self._quarter = -1
        self._printed = False
        if self._plain:
            if len(args) > 4:
                args = (*args[:4], _Sink(), *args[5:])
            else:
                kwargs["file"] = _Sink()
        super().__init__(*args, **kwargs)

    @property
    def _transient(self) -> bool:
        """A bar that started while another was open (position > 0) or that will vanish."""
        return bool(self.pos) or self.leave is False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """On a terminal draw the bar; otherwise print a line when one is due."""
        if not self._plain:
            return super().display(msg, pos)
        if self.disable:  # closing: close() prints the end line
            return True
        now = self._time()
        started = getattr(self, "start_t", now)  # tqdm sets it after its first display
        since = now - (self._last_line_t if self._last_line_t is not None else started)
        if self._last_line_t is None and not self._transient:
            self._emit()
        elif self.total:
            quarter = min(int(4 * self.n / self.total), 3)  # 100% is the end line's
            if quarter > self._quarter and since >= self.PLAIN_GAP_S:
                self._emit()
        elif since >= 2 * self.PLAIN_GAP_S:  # no total, no quarters: a line per two gaps
            self._emit()
        return True

    def close(self) -> None:
        """Close the bar; in plain mode print its end line (a quiet transient bar prints none)."""
        closing = getattr(self, "_plain", False) and not getattr(self, "disable", True)
        super().close()
        if closing and (self._printed or not self._transient):
            self._emit(final=True)

    def _emit(self, final: bool = False) -> None:
        stats = self.format_dict
        stats["ncols"] = 0  # tqdm's bar-less form: "desc:  25% 250/1000 [00:01<00:03, 250it/s]"
        if final:
            stats["rate"] = None  # the whole loop's average rate, not the recent one
        self._out.write(self.format_meter(**stats) + "\n")
        self._out.flush()
        self._last_line_t = self._time()
        self._quarter = min(int(4 * self.n / self.total), 3) if self.total else 0
        self._printed = True
