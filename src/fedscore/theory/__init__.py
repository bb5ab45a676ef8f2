"""Theory (SPEC §4): the pruning paper's bounds evaluated term by term."""

from fedscore.theory.bounds import Bound, corollary1, corollary2, remark1, theorem1

__all__ = ["Bound", "corollary1", "corollary2", "remark1", "theorem1"]
