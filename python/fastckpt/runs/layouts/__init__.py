"""Trainer run layouts: one module per framework, each turning its folders into a :class:`Run`.

Every module defines a :class:`Layout` (a name, a cheap ``detect``, its role folders, the folder
names it lists as steps and a ``scan``), and :data:`fastckpt.runs.discover.LAYOUTS` tries them in
order. Adding a trainer layout is one new module that defines its ``LAYOUT`` plus one line in that
table. Layouts import :mod:`fastckpt.runs.model`, :mod:`fastckpt.runs.steps` and
:mod:`fastckpt.runs.metrics` (and each other's step-name patterns), never discovery or resolve.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastckpt.runs.model import Run


@dataclass(frozen=True)
class Layout:
    """One framework's run layout.

    ``detect(root, names)`` gets a folder and the names of its subfolders and returns the folder
    that holds the steps when ``root`` is a run of this layout (``root`` itself, or its parent for
    OpenRLHF's ``_actor/``), else ``None``. ``scan(steps_root, role_folder)`` lists the steps;
    :func:`fastckpt.runs.discover.scan_run` fills in the run's layout and role and sorts them.
    """

    name: str
    detect: Callable[[Path, set[str]], Path | None]
    scan: Callable[[Path, str], Run]
    #: fastckpt role -> folder inside a step ("" when the step folder holds the weights itself)
    roles: dict[str, str]
    #: the folder names this layout lists as steps (see ``looks_like_step``)
    steps: tuple[re.Pattern[str], ...]
