import pickle
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

import cxrnn.audit.hash_cache as hash_cache_module
from cxrnn.audit.duplicates import duplicate_group_ids, find_duplicates
from cxrnn.audit.hash_cache import HashCache, hash_files
from cxrnn.audit.phash import ImageHashes, close_pairs, hash_distance, hash_side
from cxrnn.data.dataset import load_dataset
from cxrnn.data.phantom import PhantomConfig, generate_phantom
from cxrnn.data.splits import train_val_test_split
from cxrnn.utils.hashing import file_digest


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A small phantom (class folders only) with copies planted across classes."""
    src = tmp_path_factory.mktemp("dup-src")
    generate_phantom(src, PhantomConfig(per_class=12, size=128, seed=11))
    root = tmp_path_factory.mktemp("dups")
    for c in ("covid", "normal", "pneumonia"):
        shutil.copytree(src / c, root / c)
    a = np.asarray(Image.open(root / "covid" / "covid_0000.png"))
    # resized copy filed as normal
    Image.fromarray(a).resize((96, 96), Image.Resampling.BILINEAR).save(root / "normal" / "copy_resized.png")
    # JPEG re-encoded copy of another image filed as pneumonia
    b = np.asarray(Image.open(root / "normal" / "normal_0003.png"))
    Image.fromarray(b).save(root / "pneumonia" / "copy_reencoded.jpg", quality=70)
    # copy shifted by 2 px (1.6% of the side), edge-padded, in the same class
    c = np.asarray(Image.open(root / "pneumonia" / "pneumonia_0005.png"))
    shifted = np.pad(c, ((2, 0), (2, 0)), mode="edge")[:-2, :-2]
    Image.fromarray(shifted).save(root / "pneumonia" / "copy_shifted.png")
    # an exact byte copy filed as covid
    shutil.copy(root / "normal" / "normal_0007.png", root / "covid" / "copy_exact.png")
    return root


def _group_of(report, name):
    for g in report.groups:
        names = [report.paths[i].split("/")[-1] for i in g]
        if name in names:
            return sorted(names)
    return None


def test_planted_copies_are_found_and_nothing_else(planted, tmp_path):
    ds = load_dataset(planted)
    report = find_duplicates([s.path for s in ds.samples], cache=HashCache(tmp_path))
    assert _group_of(report, "copy_resized.png") == ["copy_resized.png", "covid_0000.png"]
    assert _group_of(report, "copy_reencoded.jpg") == ["copy_reencoded.jpg", "normal_0003.png"]
    assert _group_of(report, "copy_shifted.png") == ["copy_shifted.png", "pneumonia_0005.png"]
    assert _group_of(report, "copy_exact.png") == ["copy_exact.png", "normal_0007.png"]
    assert len(report.groups) == 4  # no distinct phantom images merged
    assert report.kind_of(next(g for g in report.groups if any("copy_exact" in report.paths[i] for i in g))) == "exact"
    # a second run is served from the cache and agrees
    again = find_duplicates([s.path for s in ds.samples], cache=HashCache(tmp_path))
    assert again.groups == report.groups


def test_duplicate_groups_never_straddle_a_split(planted, tmp_path):
    ds = load_dataset(planted)
    report = find_duplicates([s.path for s in ds.samples], cache=HashCache(tmp_path))
    groups = report.group_ids()
    for seed in range(5):
        split = train_val_test_split(ds.labels(), 0.25, 0.2, seed, groups)
        side = {}
        for name, idx in (("train", split.train), ("val", split.val), ("test", split.test)):
            for i in idx:
                side[i] = name
        for g in report.groups:
            assert len({side[i] for i in g}) == 1


def test_unreadable_file_is_reported_not_fatal(planted, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = find_duplicates([bad, planted / "covid" / "covid_0001.png"], cache=HashCache(tmp_path))
    assert len(report.errors) == 1 and "broken.png" in report.errors[0]


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """60 distinct phantom images (128 px, another seed) plus augmented copies of four of them, each
    filed in another class: shifted by 4% of the side, cropped by 10% and resized back, rotated by 7
    degrees (black corners) and mirrored. The pHash pass finds none of these copies."""
    src = tmp_path_factory.mktemp("aug-src")
    generate_phantom(src, PhantomConfig(per_class=20, size=128, seed=5))
    root = tmp_path_factory.mktemp("aug")
    for c in ("covid", "normal", "pneumonia"):
        shutil.copytree(src / c, root / c)

    def load(rel):
        return Image.open(root / rel).convert("L")

    a = np.asarray(load("covid/covid_0002.png"))
    shifted = np.pad(a, ((5, 0), (0, 5)), mode="edge")[:-5, 5:]  # 5 px = 4% down and left
    Image.fromarray(shifted).save(root / "normal" / "copy_shift4.png")
    b = load("normal/normal_0004.png")
    b.crop((4, 9, 4 + 115, 9 + 115)).resize((128, 128), Image.Resampling.BILINEAR).save(
        root / "pneumonia" / "copy_crop10.png")  # 10% off, off-centre
    c = load("pneumonia/pneumonia_0006.png")
    c.rotate(7, resample=Image.Resampling.BILINEAR).save(root / "covid" / "copy_rot7.png")
    ImageOps.mirror(load("covid/covid_0008.png")).save(root / "normal" / "copy_mirror.png")
    return root


AUGMENTED_GROUPS = {
    "copy_shift4.png": ["copy_shift4.png", "covid_0002.png"],
    "copy_crop10.png": ["copy_crop10.png", "normal_0004.png"],
    "copy_rot7.png": ["copy_rot7.png", "pneumonia_0006.png"],
    "copy_mirror.png": ["copy_mirror.png", "covid_0008.png"],
}


def test_shifted_cropped_rotated_and_mirrored_copies_are_grouped(augmented, tmp_path):
    paths = [s.path for s in load_dataset(augmented).samples]
    assert len(paths) == 64
    report = find_duplicates(paths, cache=HashCache(tmp_path))
    for copy, members in AUGMENTED_GROUPS.items():
        assert _group_of(report, copy) == members
    assert len(report.groups) == 4  # none of the 60 distinct images is merged with another
    assert not report.exact_pairs
    # every group was formed by the alignment pass, and its pairs are listed as near pairs too
    aligned = {frozenset((i, j)) for i, j, _ in report.aligned_pairs}
    assert aligned == {frozenset(g) for g in report.groups}
    assert {frozenset((i, j)) for i, j, _ in report.near_pairs} == aligned
    assert all(ncc >= report.align_threshold for _, _, ncc in report.aligned_pairs)
    assert all(bits > report.threshold for _, _, bits in report.near_pairs)
    # a second run reads hashes and thumbnails from the cache and agrees
    again = find_duplicates(paths, cache=HashCache(tmp_path))
    assert again.groups == report.groups and again.aligned_pairs == report.aligned_pairs
    # the pHash pass alone misses all of them
    assert find_duplicates(paths, cache=HashCache(tmp_path), align_threshold=None).groups == []


def test_audit_command_reports_aligned_copies_and_the_threshold_turns_them_off(augmented, tmp_path):
    import json

    from typer.testing import CliRunner

    from cxrnn.cli import app

    runner = CliRunner()
    base = ["audit", str(augmented), "--cache-dir", str(tmp_path / "cache")]
    full = runner.invoke(app, [*base, "--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    saved = json.loads((tmp_path / "full" / "audit.json").read_text())
    assert len(saved["duplicate_groups"]) == 4 and len(saved["duplicate_pairs"]["aligned"]) == 4
    assert saved["align_threshold"] == 0.9 and saved["checks"]["duplicates"]["value"] > 0
    off = runner.invoke(app, [*base, "--out", str(tmp_path / "off"), "--align-threshold", "0"])
    assert off.exit_code == 0, off.output
    saved = json.loads((tmp_path / "off" / "audit.json").read_text())
    assert saved["duplicate_groups"] == [] and saved["align_threshold"] is None
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--align-threshold", "1.5"])
    assert bad.exit_code == 2 and "not 1.5" in bad.output  # a usage error naming the bad value


def test_close_pairs_in_chunks_match_every_pair_checked_one_by_one():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 2**63, (26, 4), dtype=np.uint64) for _ in range(30)]
    for b in base:
        b[13] = b[0]  # the unshifted probe (centre of the 5x5 shifts) is the reference itself
    for k in range(10):  # near copies: a few bits flipped in every hash of an earlier image
        flips = np.zeros(4, dtype=np.uint64)
        flips[k % 4] = np.uint64(1) << np.uint64(k + 3)
        base.append(base[k] ^ flips)
    hashes = [ImageHashes("s", "p", b[0], b[1:]) for b in base]
    expected = [(i, j, hash_distance(hashes[i], hashes[j])) for i in range(len(hashes)) for j in range(i + 1, len(hashes))
                if hash_distance(hashes[i], hashes[j]) <= 12]
    assert sorted(close_pairs(hashes, 12)) == expected
    assert {(i, j) for i, j, _ in expected} == {(k, 30 + k) for k in range(10)}


def test_hashes_put_from_outside_spare_every_decode(planted, tmp_path, monkeypatch):
    """hash_side run by the image loader's worker (as the feature store runs it) hands over hashes that
    serve find_duplicates as they are: same result, no file decoded or digested again."""
    from cxrnn.data.loading import ImageFiles, image_loader

    paths = [str(s.path) for s in load_dataset(planted).samples]
    expected = find_duplicates(paths, cache=HashCache(tmp_path / "reference"))
    digests = [file_digest(p) for p in paths]
    assert pickle.loads(pickle.dumps(hash_side)) is hash_side  # workers may be spawned, not forked
    files = ImageFiles(paths, np.copy, "full", digests=digests, side=hash_side)
    side = {item.index: item.side for batch in image_loader(files, 16, workers=1) for item in batch}
    cache = HashCache(tmp_path / "side")
    for i, d in enumerate(digests):
        assert side[i].sha256 == d
        cache.put(side[i])
    cache.save()

    monkeypatch.setattr(hash_cache_module, "read_image", lambda p, *a, **k: pytest.fail(f"decoded {p} again"))
    monkeypatch.setattr(hash_cache_module, "file_digest", lambda p: pytest.fail(f"digested {p} again"))
    from_side = find_duplicates(paths, cache=HashCache(tmp_path / "side"), digests=digests)  # a fresh instance: from disk
    assert from_side.groups == expected.groups and from_side.near_pairs == expected.near_pairs
    assert from_side.exact_pairs == expected.exact_pairs and from_side.aligned_pairs == expected.aligned_pairs

    ids, report = duplicate_group_ids(paths, cache_root=tmp_path / "ids", digests=digests,
                                      hashes=[cache.get(d) for d in digests])  # handed over, not yet on disk
    assert report.groups == expected.groups
    np.testing.assert_array_equal(ids, expected.group_ids())


def test_digests_given_by_the_caller_are_used_and_checked(planted, tmp_path):
    paths = sorted((planted / "covid").glob("*.png"))[:3]
    hashes, errors = hash_files(paths, digests=["a" * 64, None, "b" * 64])
    assert not errors and [h.sha256 for h in hashes][::2] == ["a" * 64, "b" * 64]
    assert hashes[1].sha256 == file_digest(paths[1])  # None: computed here
    with pytest.raises(ValueError, match="2 digests for 3 paths"):
        hash_files(paths, digests=["a" * 64, None])
    with pytest.raises(ValueError, match="sha256"):
        HashCache(tmp_path).put(ImageHashes("", "p", hashes[0].reference, hashes[0].probes))
