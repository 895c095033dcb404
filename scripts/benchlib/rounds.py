"""The round-robin both benchmarks use: every task takes one turn per round, so load from
other processes and slow drifts of the machine hit every compared path alike."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from benchlib.load import LoadMeter

V = TypeVar("V")


@dataclass
class Block(Generic[V]):
    """One turn of one task: what it measured and the machine's other load meanwhile."""

    name: str
    round: int
    value: V
    load: float | None  # cores used by other processes meanwhile


def round_robin(
    tasks: Mapping[str, Callable[[int], V | None]], rounds: Iterable[int]
) -> Iterator[tuple[int, list[Block[V]]]]:
    """Each round and its blocks: ``tasks[name](round)`` for every task, in order, under the load
    meter; a task that returns ``None`` (done, or nothing kept) gives no block. ``rounds`` is
    drawn lazily, after the caller has taken the previous round's blocks, so it may decide
    from them whether another round runs."""
    meter = LoadMeter()
    for rnd in rounds:
        blocks: list[Block[V]] = []
        for name, task in tasks.items():
            meter.start()
            value = task(rnd)
            load = meter.stop()
            if value is not None:
                blocks.append(Block(name, rnd, value, load))
        yield rnd, blocks
