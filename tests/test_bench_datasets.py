"""Dataset loaders on few-image copies of each dataset in its real on-disk layout, written by the tests: the classes
and the label ids after mapping, under both protocols."""

import json

import numpy as np
import pytest
from PIL import Image

from diffusers_goca.bench.datasets import (
    ADE20K_CLASSES,
    CITYSCAPES_LABEL_IDS,
    CONTEXT59_CLASSES,
    CONTEXT459_IDS,
    decode_segmentation,
    load_dataset,
    rle_counts_from_string,
)

H, W = 6, 8


def _jpg(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.RandomState(seed).rand(H, W, 3) * 255).astype(np.uint8)).save(path)


def _png(path, array, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if palette:  # VOC's labels are palette PNGs: the indices are the classes, the colours only for viewing
        img = img.convert("P")
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


def _lines(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(ids) + "\n")


def test_voc_palette_labels_and_protocols(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    label = np.zeros((H, W), np.uint8)
    label[1:3, 1:4] = 8  # cat
    label[4, :] = 255  # boundary
    label[5, 5] = 15  # person
    for i, stem in enumerate(["2007_000001", "2007_000002", "2007_000003"]):
        _jpg(voc / "JPEGImages" / f"{stem}.jpg", i)
        _png(voc / "SegmentationClass" / f"{stem}.png", label, palette=True)
    _lines(voc / "ImageSets" / "Segmentation" / "val.txt", ["2007_000002", "2007_000001"])
    _lines(voc / "ImageSets" / "Segmentation" / "train.txt", ["2007_000003"])
    std = load_dataset("voc", tmp_path)
    assert std.keys() == ["2007_000001", "2007_000002"] and len(std.classes) == 21 and std.background == 0
    s = std[0]
    assert s.image.mode == "RGB" and s.image.size == (W, H)
    assert np.array_equal(s.label, label) and std.present_classes(s.label) == [0, 8, 15]
    assert std.classes[8] == "cat" and std.classes[15] == "person"
    official = load_dataset("voc", tmp_path / "VOCdevkit", protocol="official")  # the paper's split: train
    assert official.keys() == ["2007_000003"]
    assert np.array_equal(official[0].label, np.where(label == 255, 0, label))
    assert len(load_dataset("voc", tmp_path, limit=1)) == 1


def test_context_mmseg_pngs_59_and_60(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2010"
    label = np.array([[0, 1, 59], [15, 0, 37]], np.uint8)
    _jpg(voc / "JPEGImages" / "2008_000002.jpg")
    _png(voc / "SegmentationClassContext" / "2008_000002.png", label)
    _lines(voc / "ImageSets" / "SegmentationContext" / "val.txt", ["2008_000002"])
    c59 = load_dataset("context", tmp_path)
    assert len(c59.classes) == 59 and c59.background is None
    assert np.array_equal(c59[0].label, np.array([[255, 0, 58], [14, 255, 36]]))
    assert c59.classes[14] == "cat" and c59.classes[36] == "person"
    for name, protocol in (("context60", "standard"), ("context", "official")):
        c60 = load_dataset(name, tmp_path, protocol=protocol)
        assert len(c60.classes) == 60 and c60.classes[0] == "background"
        assert np.array_equal(c60[0].label, label)


def test_context_official_mat_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    raw = np.array([[2, 65, 1], [284, 999 % 459, 458]], np.uint16)  # aeroplane, cat, (unused 1), person, other, wood
    (tmp_path / "trainval").mkdir()
    scipy_io.savemat(tmp_path / "trainval" / "2008_000003.mat", {"LabelMap": raw})
    _jpg(tmp_path / "VOC2010" / "JPEGImages" / "2008_000003.jpg")
    ds = load_dataset("context", tmp_path, protocol="official")
    ids = {raw_id: k + 1 for k, raw_id in enumerate(CONTEXT459_IDS)}
    expected = np.vectorize(lambda v: ids.get(int(v), 0))(raw)
    assert ds.keys() == ["2008_000003"] and np.array_equal(ds[0].label, expected)
    assert ds.classes[ids[65]] == "cat" and ds.classes[ids[458]] == "wood"
    std = load_dataset("context59", tmp_path)
    assert np.array_equal(std[0].label, np.where(expected == 0, 255, expected - 1))


def _coco_categories():
    return [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 3, "name": "car", "isthing": 1},
        {"id": 18, "name": "dog", "isthing": 1},
        {"id": 149, "name": "grass", "isthing": 0},
    ]


def test_coco_object_from_panoptic_pngs(tmp_path):
    ids = np.array([[0, 7, 7], [300, 300, 70000]], np.int64)  # unlabelled, a dog, grass (stuff), a person
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    _png(tmp_path / "annotations" / "panoptic_val2017" / "000000000139.png", rgb)
    _jpg(tmp_path / "val2017" / "000000000139.jpg")
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps(
            {
                "categories": _coco_categories(),
                "annotations": [
                    {
                        "file_name": "000000000139.png",
                        "image_id": 139,
                        "segments_info": [
                            {"id": 7, "category_id": 18},
                            {"id": 300, "category_id": 149},
                            {"id": 70000, "category_id": 1},
                        ],
                    }
                ],
            }
        )
    )
    for protocol in ("standard", "official"):
        ds = load_dataset("coco-object", tmp_path, protocol=protocol)
        assert ds.classes == ["background", "person", "car", "dog"] and ds.background == 0
        assert np.array_equal(ds[0].label, np.array([[0, 3, 3], [0, 0, 1]]))


def _encode_counts(counts):
    """COCO's compressed RLE string, written from its description (the inverse of the decoder under test)."""
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        more = True
        while more:
            group = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not group & 0x10) or (x == -1 and group & 0x10))
            out.append(chr(group + (0x20 if more else 0) + 48))
    return "".join(out)


def test_compressed_rle_round_trip_and_column_major_order():
    counts = [3, 5, 40, 2, 1, 37, 100, 4]
    assert rle_counts_from_string(_encode_counts(counts)) == counts
    mask = decode_segmentation({"counts": [1, 2, 3], "size": [2, 3]}, 2, 3)
    # column-major: pixel order (0,0) (1,0) (0,1) (1,1) (0,2) (1,2) → 0, 1, 1, 0, 0, 0
    assert np.array_equal(mask, np.array([[False, True, False], [True, False, False]]))


def test_coco_object_from_instances(tmp_path):
    h, w = 8, 10
    rle_mask = np.zeros((h, w), bool)
    rle_mask[5:8, 6:9] = True
    counts, flat, value, run = [], rle_mask.T.reshape(-1), False, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    _jpg(tmp_path / "val2017" / "000000000285.jpg")
    (tmp_path / "annotations").mkdir(parents=True, exist_ok=True)
    (tmp_path / "annotations" / "instances_val2017.json").write_text(
        json.dumps(
            {
                "categories": [c for c in _coco_categories() if c["isthing"]],
                "images": [{"id": 285, "file_name": "000000000285.jpg", "height": h, "width": w}],
                "annotations": [
                    {
                        "image_id": 285,
                        "category_id": 3,
                        "iscrowd": 0,
                        "area": 30,
                        "segmentation": [[0, 0, 6, 0, 6, 5, 0, 5]],
                    },
                    {
                        "image_id": 285,
                        "category_id": 18,
                        "iscrowd": 0,
                        "area": 4,
                        "segmentation": [[1, 1, 3, 1, 3, 3, 1, 3]],
                    },
                    {
                        "image_id": 285,
                        "category_id": 1,
                        "iscrowd": 1,
                        "area": 9,
                        "segmentation": {"counts": _encode_counts(counts), "size": [h, w]},
                    },
                ],
            }
        )
    )
    std = load_dataset("coco-object", tmp_path)
    label = std[0].label
    assert label[0, 0] == 2 and label[2, 2] == 3  # the dog lies on the car and keeps its pixels
    assert (label[rle_mask] == 255).all() and label[7, 0] == 0  # crowd ignored, background elsewhere
    official = load_dataset("coco-object", tmp_path, protocol="official")
    assert (official[0].label[rle_mask] == 1).all()


def test_cityscapes_train_ids(tmp_path):
    raw = np.array([[7, 8, 0], [26, 33, 255]], np.uint8)
    _png(tmp_path / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png", raw)
    _jpg(tmp_path / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png")
    std = load_dataset("cityscapes", tmp_path)
    assert std.keys() == ["frankfurt/frankfurt_000000_000294"] and len(std.classes) == 19
    assert np.array_equal(std[0].label, np.array([[0, 1, 255], [13, 18, 255]]))
    assert std.classes[13] == "car" and len(CITYSCAPES_LABEL_IDS) == 19
    official = load_dataset("cityscapes", tmp_path, protocol="official")
    assert len(official.classes) == 20 and official.classes[0] == "background"
    assert np.array_equal(official[0].label, np.array([[1, 2, 0], [14, 19, 0]]))


def test_ade20k_standard_and_official(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    raw = np.array([[0, 1, 150], [13, 2, 0]], np.uint8)
    _png(base / "annotations" / "validation" / "ADE_val_00000001.png", raw)
    _jpg(base / "images" / "validation" / "ADE_val_00000001.jpg")
    std = load_dataset("ade20k", tmp_path)
    assert len(std.classes) == 150 and std.classes[12] == "person" == ADE20K_CLASSES[12]
    assert np.array_equal(std[0].label, np.array([[255, 0, 149], [12, 1, 255]]))
    official = load_dataset("ade20k", base, protocol="official")
    assert len(official.classes) == 151 and np.array_equal(official[0].label, raw)


def test_toyworld_and_errors(tmp_path):
    toy = load_dataset("toyworld", None, limit=3)
    assert len(toy) == 3 and len(toy.classes) == 20 and toy.background is None
    s = toy[0]
    assert s.label.shape == (s.image.height, s.image.width) and s.label.max() < 20
    assert load_dataset("toyworld", None, split="train", limit=2).keys() != toy.keys()[:2]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        load_dataset("voc", tmp_path)
    with pytest.raises(FileNotFoundError, match="gtFine"):
        load_dataset("cityscapes", tmp_path)
    with pytest.raises(ValueError, match="protocol"):
        load_dataset("toyworld", None, protocol="mine")
    assert len(CONTEXT59_CLASSES) == 59
