"""Progress of a stream on the console: a rich bar on a terminal (it fits 80 columns: the bar keeps its width,
the block details are cut with an ellipsis), one plain line per block otherwise (logs, pipes), endless
streams included."""

from __future__ import annotations

from .decode_pipeline import DecodedBlock

__all__ = ["StreamProgress"]


class StreamProgress:
    def __init__(self, console, total: int | None, enabled: bool):  # total None: an endless stream
        self.console, self.total, self.enabled = console, total, enabled
        self.bar = None

    def __enter__(self):
        if self.enabled and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Column

            self.bar = Progress(BarColumn(bar_width=16), MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[info]}",
                                           table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
                                console=self.console, expand=True)
            self.bar.start()
            self.task = self.bar.add_task("stream", total=self.total, info="")
        return self

    def update(self, b: DecodedBlock) -> None:
        vae = b.times["vae_video"] + b.times["vae_audio"]
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"DiT {b.times['dit']:.0f} ms, VAE {vae:.0f} ms, "
                                                       f"first frame {b.first_frame_s:.2f} s")
        elif self.enabled:
            of = "" if self.total is None else f"/{self.total}"
            self.console.print(f"[{b.index + 1}{of}] block {b.index}: {b.frames.shape[0]} frames, dit "
                               f"{b.times['dit']:.0f} ms, vae {vae:.0f} ms, first frame at {b.first_frame_s:.2f} s",
                               highlight=False, soft_wrap=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
