"""Forward hooks that live only inside a ``with`` block: the model is never left with one."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.hooks import RemovableHandle


class Hooks:
    """Hooks registered on entering ``with`` (``_register`` yields them) and all removed on leaving it,
    also when registering fails or the forward pass raises."""

    def _register(self) -> Iterator[RemovableHandle]:
        raise NotImplementedError

    def __enter__(self):
        self._handles: list[RemovableHandle] = []
        try:
            self._handles.extend(self._register())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
