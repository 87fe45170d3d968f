"""The one rule for every in-process patch parity makes (or lets lmdeploy make): leave the owner as found.

Restoring by assignment (`cls.attr = saved`, with `saved = cls.attr`) is not "as found" when the attribute was
inherited: the copy lands in the subclass's own dict and shadows whatever a base class holds later. That is
how lmdeploy 0.7.1's `init_empty_vit` (lmdeploy/vl/model/utils.py `rewrite_ctx`) left a bound
`from_pretrained` on `CLIPVisionModel`, which hid parity's hub resolution (reference/modelcode.py) from every
later genuine-checkpoint build in the process. Here the owner's own dict entries are saved and put back
exactly: an entry that was not there is deleted, one that was is restored as the raw object (a classmethod
stays a classmethod), also when the patched code raises (lmdeploy's `rewrite_ctx` restores nothing then).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

_ABSENT = object()


def own(owner: Any, name: str) -> Any:
    """`owner`'s own entry for `name` (class or module dict), or _ABSENT; never an inherited one."""
    return vars(owner).get(name, _ABSENT)


@contextlib.contextmanager
def left_as_found(owner: Any, *names: str) -> Iterator[None]:
    """On exit, `owner`'s own entries for `names` are exactly what they were on entry (present or absent),
    whatever the code inside did to them (ours or a library's)."""
    # a tuple, not a dict or list: lmdeploy's `_set_func` rewrites every dict and list that refers to the
    # function it swaps (gc.get_referrers), which would rewrite the saved value too
    saved = tuple((name, own(owner, name)) for name in names)
    try:
        yield
    finally:
        for name, value in saved:
            if value is _ABSENT:
                if name in vars(owner):
                    delattr(owner, name)
            elif own(owner, name) is not value:
                setattr(owner, name, value)


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name = value` while active; `owner` left as found after."""
    with left_as_found(owner, name):
        setattr(owner, name, value)
        yield
