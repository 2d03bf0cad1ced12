from __future__ import annotations

import numpy as np

from cxrnn.data.splits import kfold, train_val_test_split


def test_stratified_split_is_disjoint_and_balanced() -> None:
    labels = np.repeat([0, 1, 2], 50)
    split = train_val_test_split(labels, 0.2, 0.1, seed=7)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert sum(len(p) for p in parts) == 150 and len(set.union(*parts)) == 150
    assert np.bincount(labels[split.test]).tolist() == [10, 10, 10]
    again = train_val_test_split(labels, 0.2, 0.1, seed=7)
    assert np.array_equal(again.test, split.test)


def test_groups_never_straddle_a_split() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    groups = np.array([f"g{i // 3}" for i in range(120)])
    rng.shuffle(groups)
    split = train_val_test_split(labels, 0.2, 0.1, seed=1, groups=groups)
    sides = [set(groups[split.train]), set(groups[split.val]), set(groups[split.test])]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])


def test_kfold_uses_only_the_candidates() -> None:
    labels = np.repeat([0, 1, 2], 20)
    candidates = np.arange(0, 60, 2)
    folds = kfold(labels, candidates, 3, seed=0)
    assert len(folds) == 3
    for train, val in folds:
        assert set(train) | set(val) == set(candidates)
        assert not set(train) & set(val)


def test_group_holdout_on_a_set_smaller_than_the_folds_it_implies():
    # 10% of 8 images per class would need 10 folds; sklearn allows at most 8, which still keeps groups whole.
    labels = np.repeat(np.arange(3), 8)
    groups = np.arange(24) // 2
    split = train_val_test_split(labels, 0.2, 0.1, 0, groups)
    assert len(split.val) > 0 and len(split.test) > 0
    sides = [set(groups[i]) for i in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
