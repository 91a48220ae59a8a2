"""The run's bookkeeping: the resolved config and the metrics (optionally also as TensorBoard events).

Metrics on a local root are appended to `<run>/metrics.jsonl`. Object stores refuse appends, so
there each writing process keeps its lines and rewrites its own segment `<run>/metrics/<id>.jsonl`
whole (every `flush_s` seconds and at close); `read_metrics` merges both forms. TensorBoard events
are written to a local directory and, for an object-store root, copied to `<run>/tensorboard/`
at the same moments.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid

from ipr_dist.config import Config, dump_config
from ipr_dist.run_layout import CONFIG, METRIC_SEGMENTS, METRICS, TENSORBOARD, RunLayout


def save_config(cfg: Config) -> str:
    """Write the resolved config to `<run>/config.yaml`; a different earlier one is kept beside it."""
    layout = RunLayout.of(cfg)
    layout.check_writable()
    layout.prune_temporaries()  # what writers killed in an earlier run left, once surely dead
    text = dump_config(cfg)
    if layout.is_file(CONFIG):
        old = layout.read_text(CONFIG)
        if old == text:
            return layout.display(CONFIG)
        layout.write_text(f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml", old)
    layout.write_text(CONFIG, text)
    return layout.display(CONFIG)


class MetricsLog:
    """One JSON object per line with stable slash names, in the run's metrics."""

    def __init__(self, layout: RunLayout, tensorboard: bool = False, flush_s: float = 10.0):
        self.layout = layout
        self.flush_s = flush_s
        self._file = None
        self._lines: list[str] = []
        self._segment = f"{METRIC_SEGMENTS}/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.jsonl"
        self._flushed = time.monotonic()
        if layout.local:
            layout.makedirs()
            self._file = open(layout.path(METRICS), "a")
        self._board = self._board_dir = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._board_dir = layout.path(TENSORBOARD) if layout.local else tempfile.mkdtemp(prefix="ipr-tensorboard-")
            self._board = SummaryWriter(self._board_dir)

    def log(self, step: int, **values: float) -> None:
        line = json.dumps({"time": time.time(), "step": step, **values})
        if self._file:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._lines.append(line)
        if self._board:
            for name, value in values.items():
                self._board.add_scalar(name, value, step)
        if not self._file and time.monotonic() - self._flushed >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Object stores: rewrite this process's segment and copy the TensorBoard events."""
        self._flushed = time.monotonic()
        if self._file:
            return
        if self._lines:
            self.layout.write_text(self._segment, "\n".join(self._lines) + "\n")
        if self._board:
            self._board.flush()
            self.layout.upload_dir(self._board_dir, TENSORBOARD, whole=True)

    def close(self) -> None:
        if self._board:
            self._board.close()
        if self._file:
            self._file.close()
        else:
            self.flush()
            if self._board_dir:
                shutil.rmtree(self._board_dir, ignore_errors=True)


def read_metrics(layout: RunLayout) -> list[dict]:
    """Every metrics row of the run (the appended file and the segments), in time order."""
    texts = [layout.read_text(METRICS)] if layout.is_file(METRICS) else []
    texts += [layout.read_text(METRIC_SEGMENTS, n) for n in layout.list_names(METRIC_SEGMENTS) if n.endswith(".jsonl")]
    rows = [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["time"])
