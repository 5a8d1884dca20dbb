"""Start an epoch's batch iterator early, on a thread, so its first batch is ready when needed.

Why: Ray Data re-executes the training dataset every epoch, and the first batch of an epoch
takes about 0.7 s on a 2-core machine (executor start, the pair index shuffle, decode
tasks): 4-8 % of an epoch that the workers spend waiting. Started before validation, that
wait overlaps validation instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_NOTHING = object()


class FirstItemPrefetch(Generic[T]):
    """Iterate ``make_iterable()``; its first item is fetched on a background thread at once.

    Iterating waits for that thread, re-raises whatever it raised, then yields the first item
    and the rest of the same iterator. Iterate it once.
    """

    def __init__(self, make_iterable: Callable[[], Iterable[T]]) -> None:
        self._iterator: Iterator[T] | None = None
        self._first: object = _NOTHING
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._fetch, args=(make_iterable,), name="first-item-prefetch", daemon=True
        )
        self._thread.start()

    def _fetch(self, make_iterable: Callable[[], Iterable[T]]) -> None:
        try:
            self._iterator = iter(make_iterable())
            self._first = next(self._iterator)
        except StopIteration:
            pass
        except BaseException as exc:  # handed to the consumer, in its thread
            self._error = exc

    def __iter__(self) -> Iterator[T]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is not _NOTHING:
            yield self._first  # type: ignore[misc]
            yield from self._iterator  # type: ignore[misc]
