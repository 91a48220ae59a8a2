"""The run directory's bookkeeping: the resolved config and metrics.jsonl (optionally also as TensorBoard events)."""

from __future__ import annotations

import json
import time

import pyarrow.fs as pafs

from ipr_dist.config import Config, dump_config
from ipr_dist.data.store import resolve


def save_config(cfg: Config) -> str:
    """Write the resolved config to `<run>/config.yaml`; a different earlier one is kept beside it."""
    fs, root = resolve(cfg.run_dir)
    fs.create_dir(root, recursive=True)
    path = f"{root}/config.yaml"
    text = dump_config(cfg)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            old = f.read().decode()
        if old == text:
            return path
        fs.move(path, f"{root}/config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    with fs.open_output_stream(path + ".tmp") as f:
        f.write(text.encode())
    fs.move(path + ".tmp", path)
    return path


class MetricsLog:
    """Appends one JSON object per line to `<run>/metrics.jsonl` with stable slash names."""

    def __init__(self, run_dir: str, tensorboard: bool = False):
        fs, root = resolve(run_dir)
        fs.create_dir(root, recursive=True)
        self.path = f"{root}/metrics.jsonl"
        self._file = open(self.path, "a") if isinstance(fs, pafs.LocalFileSystem) else None
        self._fs = fs
        self._buffer: list[str] = []
        self._board = None
        if tensorboard:  # the same scalars as TensorBoard events (a cloud run root: a local tensorboard/<name>)
            from torch.utils.tensorboard import SummaryWriter

            local = isinstance(fs, pafs.LocalFileSystem)
            self._board = SummaryWriter(f"{root}/tensorboard" if local else f"tensorboard/{root.rstrip('/').rsplit('/', 1)[-1]}")

    def log(self, step: int, **values: float) -> None:
        line = json.dumps({"time": time.time(), "step": step, **values})
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._buffer.append(line)
        if self._board:
            for name, value in values.items():
                self._board.add_scalar(name, value, step)

    def close(self) -> None:
        if self._board:
            self._board.close()
        if self._file:
            self._file.close()
        elif self._buffer:
            with self._fs.open_append_stream(self.path) as f:
                f.write(("\n".join(self._buffer) + "\n").encode())

