"""Task data on real images: the garment scenes, COCO-format folders and segmentation folders read back exactly,
paired augmentation that moves labels with the image and is seeded per sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from snzoo.data import (
    CocoDetection,
    SeededPairAugmentation,
    SegmentationFolder,
    collate_detection,
    detection_eval_transform,
    detection_train_transform,
    segmentation_eval_transform,
    segmentation_train_transform,
)
from snzoo.errors import DataError
from scenes import IGNORE, MIN_PIXELS, label_map, make_scenes, tight_box, write_coco, \
    write_segmentation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(12, objects=(1, 4), seed=3)


@pytest.fixture(scope="module")
def coco_root(scenes, tmp_path_factory):
    return write_coco(scenes, tmp_path_factory.mktemp("coco"), "train")


@pytest.fixture(scope="module")
def voc_root(scenes, tmp_path_factory):
    return write_segmentation(scenes, tmp_path_factory.mktemp("voc"), "train")


def test_scene_masks_are_the_visible_garment_pixels(scenes):
    objects = [o for s in scenes for o in s.objects]
    assert len(objects) >= 20 and {c for c, _, _ in objects} <= set(range(1, 11))
    assert len({c for c, _, _ in objects}) >= 5
    for scene in scenes:
        photo_changed = np.zeros((scene.image.height, scene.image.width), dtype=int)
        for category, mask, box in scene.objects:
            assert mask.dtype == bool and mask.sum() >= MIN_PIXELS
            assert box == tight_box(mask)
            x0, y0, x1, y1 = box
            assert mask[y0:y1, x0:x1].sum() == mask.sum()
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any()
            assert mask[y0:y1, x0].any() and mask[y0:y1, x1 - 1].any()
            photo_changed += mask
        assert photo_changed.max() <= 1  # occlusion leaves masks disjoint


def test_scene_masks_are_exactly_the_painted_pixels(scenes):
    # Outside the masks the image is one of the photographs untouched; inside nearly every pixel differs from it.
    from photos import photo_paths
    from scenes import _photo

    for scene in scenes:
        pixels = np.asarray(scene.image).astype(int)
        objects = np.zeros(pixels.shape[:2], dtype=bool)
        for _, mask, _ in scene.objects:
            objects |= mask
        photos = [_photo(p, *pixels.shape[:2]).astype(int) for p in photo_paths()]
        matches = [p for p in photos if np.array_equal(p[~objects], pixels[~objects])]
        assert len(matches) == 1
        changed = (matches[0] != pixels).any(-1)
        assert not changed[~objects].any() and changed[objects].mean() > 0.97


def test_coco_round_trip_is_exact(scenes, coco_root):
    data = CocoDetection(coco_root, "train")
    assert len(data) == len(scenes) and data.num_classes == 11 and data.has_masks
    assert data.categories[1] == "T-shirt/top" and data.categories[10] == "Ankle boot"
    for index, scene in enumerate(scenes):
        image, target = data[index]
        assert np.array_equal(np.asarray(image), np.asarray(scene.image))
        assert target["image_id"] == data.ids[index]
        assert target["boxes"].tolist() == [list(map(float, b)) for _, _, b in scene.objects]
        assert target["labels"].tolist() == [c for c, _, _ in scene.objects]
        assert target["masks"].dtype == torch.uint8
        assert np.array_equal(target["masks"].numpy().astype(bool), np.stack([m for _, m, _ in scene.objects]))
        assert target["area"].tolist() == [float(m.sum()) for _, m, _ in scene.objects]


def test_coco_explicit_paths_crowd_and_degenerate_left_out(coco_root, tmp_path):
    data = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    first = [a for a in data["annotations"] if a["image_id"] == 1]
    data["annotations"] += [dict(first[0], id=1000, iscrowd=1), dict(first[0], id=1001, bbox=[5, 5, 0, 4])]
    (tmp_path / "custom.json").write_text(json.dumps(data))
    ds = CocoDetection(annotations=tmp_path / "custom.json", images=coco_root / "train", masks=False)
    _, target = ds[0]
    assert "masks" not in target and len(target["boxes"]) == len(first)


def test_detection_flip_moves_boxes_and_masks(coco_root):
    data = CocoDetection(coco_root, "train")
    flip = detection_train_transform(flip=1.0)
    for index in range(4):
        image, target = data[index]
        flipped, moved = flip(image, target)
        assert torch.equal(flipped, torch.from_numpy(np.asarray(image)[:, ::-1].copy()).permute(2, 0, 1) / 255.0)
        for box, mask in zip(moved["boxes"].tolist(), moved["masks"].numpy()):
            assert list(map(float, tight_box(mask))) == box
        assert torch.equal(moved["labels"], target["labels"])
    tensor, same = detection_eval_transform()(image, target)
    assert tensor.shape == (3, image.height, image.width) and same is target


def _epoch(loader):
    out = []
    for images, targets, indices in loader:
        out += [(i, img, t["boxes"], t["masks"]) for i, img, t in zip(indices.tolist(), images, targets)]
    return sorted(out, key=lambda x: x[0])


def test_seeded_pair_augmentation_is_reproducible_across_workers(coco_root):
    wrapped = SeededPairAugmentation(CocoDetection(coco_root, "train"), detection_train_transform(), seed=5)
    runs = []
    for workers in (0, 2, 0):
        loader = DataLoader(wrapped, batch_size=3, num_workers=workers, collate_fn=collate_detection)
        runs.append(_epoch(loader))
    flipped = 0
    for a, b in zip(runs[0], runs[1]):
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
        flipped += not torch.equal(a[1], detection_eval_transform()(*wrapped.dataset[a[0]])[0])
    assert 0 < flipped < len(runs[0])  # some flipped and some not: the flip is really random
    assert all(torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[2]))
    wrapped.set_epoch(1)
    other = _epoch(DataLoader(wrapped, batch_size=3, collate_fn=collate_detection))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(runs[0], other))
    with pytest.raises(DataError, match="transform=None"):
        SeededPairAugmentation(CocoDetection(coco_root, transform=detection_eval_transform()),
                               detection_train_transform())


def test_collate_detection_eval_items(coco_root):
    data = CocoDetection(coco_root, transform=detection_eval_transform())
    images, targets = collate_detection([data[0], data[1]])
    assert len(images) == 2 and targets[1]["image_id"] == data.ids[1]


def test_segmentation_voc_and_folders_give_the_same_items(scenes, voc_root, tmp_path):
    write_segmentation(scenes, tmp_path, "train", layout="folders")
    voc, folders = SegmentationFolder(voc_root, "train"), SegmentationFolder(tmp_path, "train")
    assert voc.num_classes == folders.num_classes == 11 and voc.classes[1] == "T-shirt/top"
    assert len(voc) == len(folders) == len(scenes)
    for index, scene in enumerate(scenes):
        (a_img, a_mask), (b_img, b_mask) = voc[index], folders[index]
        assert np.array_equal(np.asarray(a_img), np.asarray(scene.image))
        assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
        assert a_mask.dtype == torch.int64 and torch.equal(a_mask, b_mask)
        assert np.array_equal(a_mask.numpy(), label_map(scene))
        for category, mask, _ in scene.objects:
            assert (a_mask.numpy()[mask] == category).all()
    assert (voc.mask(0) == IGNORE).any()
    # Without classes.txt and without num_classes, the count comes from the largest label in the masks.
    (tmp_path / "classes.txt").unlink()
    found = SegmentationFolder(tmp_path, "train")
    largest = max(c for s in scenes for c, _, _ in s.objects)
    assert found.num_classes == largest + 1 and found.classes[:2] == ["0", "1"]
    # The folders layout without a list file takes every image.
    (tmp_path / "train.txt").unlink()
    assert len(SegmentationFolder(tmp_path, num_classes=11)) == len(scenes)


def test_segmentation_train_crop_pads_with_ignore(voc_root):
    data = SegmentationFolder(voc_root, "train")
    transform = segmentation_train_transform((200, 240), mean=(0.5,) * 3, std=(0.25,) * 3, scale=(1.0, 1.0))
    image, mask = transform(*data[0])
    assert image.shape == (3, 200, 240) and mask.shape == (200, 240) and mask.dtype == torch.int64
    # The 128x160 scene fits inside the crop: what lies outside it is padding, 255 in the mask, 0 in the image.
    assert int((mask != IGNORE).sum()) <= 128 * 160 and int((mask == IGNORE).sum()) >= 200 * 240 - 128 * 160
    padded = (image == -2.0).all(0)  # (0 - 0.5) / 0.25
    assert padded.sum() >= 200 * 240 - 128 * 160 and (mask[padded] == IGNORE).all()
    small = segmentation_train_transform(64, mean=(0.5,) * 3, std=(0.25,) * 3)
    wrapped = SeededPairAugmentation(data, small, seed=1)
    first = [wrapped[i] for i in range(len(wrapped))]
    batch = next(iter(DataLoader(wrapped, batch_size=4, num_workers=2)))
    assert batch[0].shape == (4, 3, 64, 64) and batch[1].shape == (4, 64, 64)
    for row in range(4):
        assert torch.equal(batch[0][row], first[row][0]) and torch.equal(batch[1][row], first[row][1])
    labels = set(torch.cat([m.flatten() for _, m, _ in first]).tolist())
    assert labels <= set(range(11)) | {IGNORE}
    image, mask = segmentation_eval_transform((0.5,) * 3, (0.25,) * 3)(*data[0])
    assert image.shape == (3, 128, 160) and torch.equal(mask, data.mask(0))


def test_segmentation_mask_values_are_checked(voc_root, tmp_path):
    shutil.copytree(voc_root, tmp_path / "voc")
    path = tmp_path / "voc" / "SegmentationClass" / "train_000002.png"
    mask = Image.open(path)
    values = np.array(mask)
    values[0, 0] = 30
    bad = Image.frombytes("P", mask.size, values.tobytes())
    bad.putpalette(mask.getpalette())
    bad.save(path)
    data = SegmentationFolder(tmp_path / "voc", "train")
    data[0]
    with pytest.raises(DataError, match=r"train_000002\.png holds value 30, outside 0 to 10") as info:
        data[2]
    assert "\n" not in str(info.value)
    Image.new("RGB", mask.size).save(path)
    with pytest.raises(DataError, match="is a RGB image; expected one class index per pixel"):
        SegmentationFolder(tmp_path / "voc", "train")[2]


def _one_line_error(match, call):
    with pytest.raises(DataError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_coco_folders_raise_one_line_each(coco_root, tmp_path):
    _one_line_error("has no annotations folder; expected ROOT/annotations/instances_train",
                    lambda: CocoDetection(tmp_path))
    (tmp_path / "annotations").mkdir()
    _one_line_error("no annotations file for split 'val'", lambda: CocoDetection(tmp_path, "val"))
    data = json.loads((coco_root / "annotations" / "instances_train.json").read_text())
    shutil.copytree(coco_root / "train", tmp_path / "train")
    ann = tmp_path / "annotations" / "instances_train.json"
    (tmp_path / "train" / "000003.png").unlink()
    ann.write_text(json.dumps(data))
    _one_line_error(r"000003\.png \(image id 3\) listed in .* is missing", lambda: CocoDetection(tmp_path))
    shutil.copy(coco_root / "train" / "000003.png", tmp_path / "train")
    ann.write_text(json.dumps(dict(data, categories=[])))
    _one_line_error("has no categories", lambda: CocoDetection(tmp_path))
    ann.write_text(json.dumps({"type": "something else", "items": []}))
    _one_line_error("is not a COCO instances file; expected a JSON object with the lists images",
                    lambda: CocoDetection(tmp_path))
    ann.write_text("{not json")
    _one_line_error("is not valid JSON", lambda: CocoDetection(tmp_path))
    ann.write_text(json.dumps(dict(data, images=[{"id": 1}])))
    _one_line_error("an entry lacks or mistypes", lambda: CocoDetection(tmp_path))


def test_bad_segmentation_folders_raise_one_line_each(voc_root, tmp_path):
    _one_line_error("is not a segmentation folder; expected VOC's JPEGImages", lambda: SegmentationFolder(tmp_path))
    shutil.copytree(voc_root, tmp_path / "voc")
    _one_line_error(r"VOC list file .*val\.txt does not exist", lambda: SegmentationFolder(tmp_path / "voc", "val"))
    (tmp_path / "voc" / "SegmentationClass" / "train_000001.png").unlink()
    _one_line_error(r"train_000001\.png has no mask train_000001\.png", lambda: SegmentationFolder(tmp_path / "voc"))
    _one_line_error("names 11 classes but num_classes is 12",
                    lambda: SegmentationFolder(voc_root, num_classes=12))
