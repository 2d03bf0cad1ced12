"""Groups of items that must stay on one side of a split: connected components of "same group" pairs.

Knows nothing of images or models: the duplicate audit, the manifest's patient ids and the sources all
come in as pairs or as one group id per item, and the splitter only sees the ids that come out.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over 0..n-1; the representative of a set is its smallest member."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]  # path halving keeps later finds short
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def components(self) -> list[list[int]]:
        """Every set, each a sorted list (singletons included)."""
        comps: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            comps.setdefault(self.find(i), []).append(i)
        return [sorted(c) for c in comps.values()]


def combine_groups(*groupings: np.ndarray | None) -> np.ndarray | None:
    """Union of several groupings: two items share a group when any grouping puts them together."""
    given = [np.asarray(g) for g in groupings if g is not None]
    if not given:
        return None
    n = len(given[0])
    uf = UnionFind(n)
    for g in given:
        first: dict = {}
        for i, value in enumerate(g.tolist()):
            if value in first:
                uf.union(i, first[value])
            else:
                first[value] = i
    return np.array([uf.find(i) for i in range(n)])
