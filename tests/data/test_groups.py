import numpy as np

from cxrnn.data.groups import UnionFind, combine_groups


def test_union_find_components_and_representatives():
    uf = UnionFind(6)
    uf.union(4, 1)
    uf.union(1, 3)
    uf.union(5, 2)
    assert uf.components() == [[0], [1, 3, 4], [2, 5]]
    assert uf.find(4) == 1 and uf.find(5) == 2  # the smallest member represents its set


def test_combine_groups_is_the_union():
    a = np.array([0, 0, 1, 2, 3])
    b = np.array(["x", "y", "y", "z", "w"])
    ids = combine_groups(a, b)
    assert ids[0] == ids[1] == ids[2]
    assert len({ids[0], ids[3], ids[4]}) == 3
    np.testing.assert_array_equal(combine_groups(a, None), [0, 0, 2, 3, 4])
    assert combine_groups(None, None) is None
