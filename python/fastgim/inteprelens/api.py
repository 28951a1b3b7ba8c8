"""``inteprelens.api``: :class:`fastgim.lens.LensAPI`."""

from fastgim.lens import LensAPI

__all__ = ["LensAPI"]
