"""Resumable, shardable per-item results.

Every process appends one JSON line per finished item to its own file (`<stem>.<index>-of-<count>.jsonl`), flushed
and fsync'ed, so an interrupted run loses at most the item in flight. A rerun reads every result file in the folder,
whatever sharding wrote it, and skips the keys it finds; totals are merged by key, so nothing is counted twice.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Which share of the work this process does: items at positions p with p % count == index."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count}), got {self.index}")

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        """`"i/n"` (0-based i), as given on a command line for runs on separate machines."""
        try:
            index, count = (int(part) for part in spec.split("/"))
        except ValueError:
            raise ValueError(f"a shard is written 'index/count', e.g. '0/4'; got {spec!r}") from None
        return cls(index, count)

    @classmethod
    def from_environment(cls, spec: str | None = None) -> "Shard":
        """The explicit `spec`, else the process group `accelerate launch` (or torchrun) started, else the whole job."""
        if spec:
            return cls.parse(spec)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            return cls(int(os.environ.get("RANK", "0")), world)
        return cls()

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def select(self, items: Sequence[T]) -> list[T]:
        return [item for position, item in enumerate(items) if position % self.count == self.index]

    def device(self, requested: str | None = None) -> str:
        """Where this process runs: `requested`, else its own GPU (accelerate's LOCAL_RANK), else the CPU."""
        if requested:
            return requested
        import torch

        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', self.index)) % torch.cuda.device_count()}"
        return "cpu"


class ResultLog:
    """A folder of JSONL result files plus the run's settings (`settings.json`).

    settings: what decides the results (model, methods, protocol, ...). A folder written with other settings is
    refused, so a resumed run never mixes two experiments.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict, shard: Shard = Shard(), stem: str = "results"):
        self.folder, self.shard, self.stem = Path(folder), shard, stem
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_settings(json.loads(json.dumps(settings)))
        self.path = self.folder / f"{stem}.{shard.index}-of-{shard.count}.jsonl"

    def _check_settings(self, settings: dict) -> None:
        path = self.folder / "settings.json"
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != settings:
                changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
                raise ValueError(
                    f"{self.folder} holds results of a run with other settings ({', '.join(changed)}); "
                    "use another output folder, or delete it to start over"
                )
        elif self.shard.is_main or not path.exists():
            tmp = path.with_suffix(f".{self.shard.index}.tmp")
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
            os.replace(tmp, path)

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.stem}.*-of-*.jsonl"))

    def records(self) -> dict[str, dict]:
        """Every finished item in the folder, by key (the first record of a key wins; a torn last line is skipped)."""
        found: dict[str, dict] = {}
        for path in self.files():
            for record in _read_jsonl(path):
                found.setdefault(record["key"], record)
        return found

    def done(self) -> set[str]:
        return set(self.records())

    def pending(self, keys: Iterable[str]) -> list[str]:
        """This shard's keys that no result file holds yet, in order."""
        done = self.done()
        return [k for k in self.shard.select(list(keys)) if k not in done]

    def append(self, key: str, record: dict) -> None:
        line = json.dumps({"key": key, **record}, separators=(",", ":"))
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # the torn tail of an interrupted write: keep it on a line of its own
                    f.write(b"\n")
            f.write((line + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())


def _read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                return  # torn write of an interrupted run: the item counts as not done
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                yield record


def write_table(folder: str | os.PathLike, summary: dict, markdown: str, done: int, total: int) -> None:
    """`table.json` and `table.md` in the run folder, and the Markdown on stdout (with what is still missing)."""
    folder = Path(folder)
    (folder / "table.json").write_text(json.dumps(summary, indent=2))
    (folder / "table.md").write_text(markdown)
    if done < total:
        markdown += f"\n{total - done} of {total} items are not done yet (other shards still running?)\n"
    print(markdown)


def writes_table(shard: "Shard", done: int, total: int) -> bool:
    """Whether this process writes the table. Under `accelerate launch` the main process, after the barrier. Shards
    run apart (`--shard i/n` on separate machines sharing the run folder): the main one (a partial table, which says
    what is missing) and whichever finds every item done, so that the last shard to finish writes the full table."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return shard.is_main
    return shard.is_main or done >= total


def wait_for_everyone() -> None:
    """Barrier across the processes of `accelerate launch`; nothing when there is one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
