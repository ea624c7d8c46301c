"""What both command lines share: the subcommand parser and progress reporting.

Progress follows one convention in every long command: a tqdm bar when stderr is a terminal, otherwise a
plain line every few seconds (``done/total``, rate, ETA), so logs of cluster jobs stay readable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time


def build_parser(prog: str, description: str, commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """A parser with one subcommand per ``commands`` entry (name -> (module, help)); each module exposes
    ``add_arguments(parser)`` and ``run(args) -> int``; the chosen module's name is left in ``args._module``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def run_command(prog: str, description: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None,
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse ``argv`` with :func:`build_parser` and run the chosen subcommand's ``run(args)``; its return value
    is the exit code. An exception of a type in ``errors`` (bad input) ends with one line on stderr,
    ``{prog} {command}: error: ...``, and exit code 2."""
    args = build_parser(prog, description, commands).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args))
    except errors as e:
        # Errors raised in DataLoader workers arrive wrapped with the worker's traceback: keep the last line.
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        print(f"{prog} {args.command}: error: {lines[-1].split(': ', 1)[-1] if len(lines) > 1 else lines[0]}",
              file=sys.stderr)
        return 2


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Progress of ``total`` units: a tqdm bar on a terminal, else a plain line on ``stream`` every
    ``every`` seconds and at the end: ``desc: done/total unit (pct%), rate unit/s, ETA m:ss``.
    ``initial``: units already done before (a resumed run; the rate counts this session's); ``total`` 0: unknown.

    ``update(n)`` counts units done; ``write(text)`` prints a message without breaking the bar; ``extra``
    (settable) is appended to each line (e.g. a loss). Use as a context manager or call ``close()``.
    """

    def __init__(self, total: int, unit: str = "it", desc: str = "", stream=None, every: float = 5.0,
                 bar: bool | None = None, initial: int = 0):
        self.total, self.unit, self.desc, self.every = int(total), unit, desc, every
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.initial, self.extra, self._shown = int(initial), int(initial), "", -1
        self._t0 = self._last = time.perf_counter()
        self._bar = None
        if bar if bar is not None else self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total or None, unit=unit, desc=desc or None, file=self.stream,
                             dynamic_ncols=True, smoothing=0.05, initial=self.initial)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if self.extra:
                self._bar.set_postfix_str(self.extra, refresh=False)
            return
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            self._line()

    def _line(self) -> None:
        self._shown = self.n
        elapsed = time.perf_counter() - self._t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        pct = f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else f" {self.unit}"
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        head = f"{self.desc}: " if self.desc else ""
        tail = f", {self.extra}" if self.extra else ""
        print(f"{head}{self.n}{pct}, {rate:.2f} {self.unit}/s, "
              f"elapsed {_duration(elapsed)}{eta}{tail}", file=self.stream, flush=True)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.n > self.initial and self._shown != self.n:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
