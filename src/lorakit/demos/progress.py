"""A tqdm progress bar for a training run inside a demo (the run's own messages stay hidden)."""

from __future__ import annotations

import sys


class ProgressBar:
    """A tqdm bar per training run; the run's own messages are not shown (the table says it all)."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def start(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc=self.desc, unit="step", leave=False, file=sys.stderr)

    def update(self, step: int, info: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
