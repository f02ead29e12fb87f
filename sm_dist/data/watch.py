"""`data.watch_dir`: expert data files dropped into a folder while the run goes on.

Between two learner steps (at most every `data.watch_poll_s`) the driver lists the folder; each new
file is read, validated and encoded exactly like `data.train_path` (same formats, `data.on_bad`, the
same bad-row report in the log), and its rows go to the expert buffer, where the next step's batch can
sample them. A file is taken once: its name is recorded in `<run_dir>/watch_taken.json` (with its row
count, or why it was refused), so a resumed run does not add it again (the expert buffer restores its
rows from its own manifest). A file that cannot be used is reported and skipped; the run goes on.

Drop files atomically (write `x.jsonl.tmp` or `.x.jsonl`, then rename): names starting with "." or
ending in .tmp/.part are not read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sm_dist.data")

TAKEN_FILE = "watch_taken.json"


class DataWatcher:
    def __init__(self, cfg: Any, tok: Any, ray: Any, expert: Any, run_dir: str | Path):
        self.cfg, self.tok, self.ray, self.expert = cfg, tok, ray, expert
        self.dir = Path(cfg.data.watch_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from sm_dist.errors import UserError

            raise UserError(
                "data.watch_dir", f"{self.dir} cannot be created ({e.strerror}).", "pass a folder"
            ) from None
        self.record = Path(run_dir) / TAKEN_FILE
        self.taken: dict[str, dict] = json.loads(self.record.read_text()) if self.record.exists() else {}
        self.poll_s = cfg.data.watch_poll_s
        self._last = 0.0
        self.rows_added = 0

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.poll_s

    def poll(self, force: bool = False, step: int | None = None) -> int:
        """Take the new files (if `data.watch_poll_s` has passed, or `force`); the rows added. `step`:
        the learner steps done so far, recorded with each file taken."""
        if not (force or self.due()):
            return 0
        self._last = time.monotonic()
        try:
            names = sorted(e.name for e in os.scandir(self.dir) if e.is_file())
        except OSError as e:  # the folder went away: report once per poll, the run goes on
            log.warning(f"data.watch_dir {self.dir}: cannot list it ({e.strerror})")
            return 0
        added = 0
        for name in names:
            if name in self.taken or name.startswith(".") or name.endswith((".tmp", ".part")):
                continue
            added += self._take(name, step)
        return added

    def _take(self, name: str, step: int | None) -> int:
        from sm_dist.buffer.schema import rows_to_batch

        path = self.dir / name
        try:
            rows = self.encode(path, f"watch{len(self.taken)}-")
        except Exception as e:  # a bad file (or a bad row with data.on_bad=error): reported, skipped
            log.error(f"data.watch_dir: {path} skipped: {' '.join(str(e).split())}")
            self._record(name, {"rows": 0, "error": str(e)[:500], "step": step})
            return 0
        if rows:
            self.ray.get(self.expert.add.remote(rows_to_batch(rows)), timeout=self.cfg.sync.timeout_s)
        self.rows_added += len(rows)
        self._record(name, {"rows": len(rows), "step": step})
        log.info(f"data.watch_dir: {path}: {len(rows)} expert rows added")
        return len(rows)

    def encode(self, path: Path, id_prefix: str) -> list[dict]:
        """The rows of one file, as data.train_path's are made (sm_dist.data.prepare.encode_rows)."""
        from sm_dist.data.datasets import no_usable_examples
        from sm_dist.data.prepare import encode_rows, load_data

        examples, loaded = load_data(self.cfg.data, path)
        rows, enc, encoded = encode_rows(self.cfg, self.tok, examples, str(path), id_prefix=id_prefix)
        if not enc:
            raise no_usable_examples(f"data.watch_dir file {path.name}", path, loaded, encoded)
        return rows

    def _record(self, name: str, what: dict) -> None:
        self.taken[name] = {**what, "time": time.time()}
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.taken, indent=1))
        os.replace(tmp, self.record)
