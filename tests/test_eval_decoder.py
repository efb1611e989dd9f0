"""The torchvision decoder against PIL on real photographs: same samples and accounting, nearly the same tensors.

PIL and torch resample differently when resizing, so the two decoders' inputs are not bit-identical; the
bound checked here is two 8-bit levels per value, on under 1% of the values (measured on these photographs:
at most two levels, on 0.3% of the values; 3.5% on the worst image), and the predictions of a real network agree
on most images.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from snzoo.data import IMAGENET_STD, BadImageError, build_eval_dataset, eval_transform_from_config, load_rgb
from snzoo.data import open_imagenet_val
from snzoo.data.datasets import load_image
from snzoo.data.decoders import DECODERS
from snzoo.eval import IMAGENET_EVAL, evaluate_model, imagenet_wnids
from snzoo.errors import DataError
from snzoo_cli.main import cli
from photos import photo_paths
from test_eval import varied_model

pytestmark = pytest.mark.usefixtures("one_thread")

WNIDS = ["n01440764", "n01443537", "n02123045", "n02504458"]
LEVELS = 2.0 / (255 * min(IMAGENET_STD)) + 1e-5  # two 8-bit steps of the input, after normalisation


def _variants(path: Path) -> list[Image.Image]:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    return [image, image.transpose(Image.FLIP_LEFT_RIGHT), image.crop((w // 7, h // 9, w - w // 5, h - h // 11))]


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """21 real photographs at their own sizes in WordNet-id folders: JPEGs (one grayscale, one CMYK) and a PNG."""
    root = tmp_path_factory.mktemp("decoder") / "val"
    images = [v for p in photo_paths() for v in _variants(p)]
    for i, image in enumerate(images):
        folder = root / WNIDS[i % len(WNIDS)]
        folder.mkdir(parents=True, exist_ok=True)
        if i == 5:
            image.save(folder / f"img{i:02d}.png")  # not a JPEG: PIL decodes it under both decoders
        else:
            converted = image.convert("L") if i == 3 else image.convert("CMYK") if i == 4 else image
            (folder / f"img{i:02d}.JPEG").write_bytes(_jpeg(converted, quality=70 + i))
    return root


@pytest.fixture(scope="module")
def model():
    """A real network (ResNet-18 with SN, all 1000 ImageNet classes)."""
    return varied_model(5)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "r18.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def _dataset(data, decoder: str, **options):
    transform = eval_transform_from_config(IMAGENET_EVAL, decoder=decoder)
    return build_eval_dataset(data, transform, class_names=imagenet_wnids(), decoder=decoder, **options)


def _stacked(dataset) -> tuple[torch.Tensor, list[int], list[int]]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _, _ in items]), [y for _, y, _ in items], [i for _, _, i in items]


def test_decoded_pixels_match_pil_for_jpeg_grayscale_cmyk_and_png(photo_folder):
    files = sorted(p for p in photo_folder.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".JPEG", ".png"}
    for path in files:
        pil = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        tensor = load_image(path, "torchvision")
        assert tensor.dtype == torch.uint8 and tensor.shape == pil.shape, path
        # Both sides run libjpeg-turbo's decoder; allow one level for a build with another IDCT.
        assert int((tensor.int() - pil.int()).abs().max()) <= 1, path


def test_both_decoders_give_the_same_samples_and_nearly_the_same_tensors(photo_folder, model):
    pil_images, pil_labels, pil_indices = _stacked(_dataset(photo_folder, "pil"))
    tv_images, tv_labels, tv_indices = _stacked(_dataset(photo_folder, "torchvision"))
    assert (tv_labels, tv_indices) == (pil_labels, pil_indices)
    assert tv_images.shape == pil_images.shape == (21, 3, 224, 224) and tv_images.dtype == torch.float32
    diff = (tv_images - pil_images).abs()
    assert float(diff.max()) <= LEVELS
    assert 0 < float((diff > 1e-6).float().mean()) < 0.01
    with torch.no_grad():
        pil_top1 = model(pil_images).argmax(1)
        tv_top1 = model(tv_images).argmax(1)
    assert len(set(pil_top1.tolist())) > 2  # the network tells the photographs apart
    assert int((pil_top1 == tv_top1).sum()) >= 0.9 * len(pil_top1)


def test_evaluate_model_accounting_is_the_same_with_both_decoders(photo_folder, checkpoint):
    results = {decoder: evaluate_model(data=photo_folder, checkpoint=checkpoint, arch="resnet18v1_sn",
                                       decoder=decoder, workers=0, batch_size=8, per_class=True)
               for decoder in DECODERS}
    pil, tv = results["pil"], results["torchvision"]
    assert pil.n == tv.n == 21 and pil.skipped == tv.skipped == []
    assert {k: v["n"] for k, v in pil.per_class.items()} == {k: v["n"] for k, v in tv.per_class.items()}
    assert sorted(pil.per_class) == WNIDS
    assert (pil.config["decoder"], tv.config["decoder"]) == ("pil", "torchvision")
    assert abs(pil.correct1 - tv.correct1) <= 2 and abs(pil.correct5 - tv.correct5) <= 2


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_a_corrupt_jpeg_is_the_same_one_line_error_or_skip_with_both_decoders(photo_folder, checkpoint, tmp_path,
                                                                              cut):
    root = tmp_path / "val"
    shutil.copytree(photo_folder, root)
    good = sorted(root.rglob("*.JPEG"))[0].read_bytes()
    bad = root / WNIDS[1] / "broken.JPEG"
    bad.write_bytes(good[: len(good) // 2] if cut == "truncated" else good[:3] + b"\x00" * 500)
    messages = {}
    for decoder in DECODERS:
        with pytest.raises(BadImageError) as info:
            evaluate_model(data=root, checkpoint=checkpoint, arch="resnet18v1_sn", decoder=decoder, workers=2)
        messages[decoder] = str(info.value)
        assert str(bad) in messages[decoder] and "\n" not in messages[decoder]
        result = evaluate_model(data=root, checkpoint=checkpoint, arch="resnet18v1_sn", decoder=decoder, workers=0,
                                skip_bad=True)
        assert [s["path"] for s in result.skipped] == [str(bad)] and result.n == 21
    assert messages["pil"] == messages["torchvision"]


def test_encoded_bytes_datasets_decode_with_torchvision(photo_folder, tmp_path):
    files = sorted(photo_folder.rglob("*.JPEG"))[:6]
    with tarfile.open(tmp_path / "val-0.tar", "w") as tar:
        for i, path in enumerate(files):
            for name, data in ((f"k{i}.jpg", path.read_bytes()),
                               (f"k{i}.cls", str(imagenet_wnids().index(path.parent.name)).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shards = {d: open_imagenet_val(str(tmp_path / "val-{0..0}.tar"),
                                   eval_transform_from_config(IMAGENET_EVAL, decoder=d), decoder=d) for d in DECODERS}
    pil, tv = (_stacked(shards[d]) for d in DECODERS)
    assert pil[1:] == tv[1:] and len(pil[1]) == 6
    assert float((pil[0] - tv[0]).abs().max()) <= LEVELS
    folder = _stacked(_dataset(photo_folder, "torchvision"))
    by_name = {p: i for i, (p, _) in enumerate(_dataset(photo_folder, "torchvision").samples)}
    assert torch.equal(tv[0], folder[0][[by_name[str(p)] for p in files]])  # bytes from a tar = bytes from a file


def test_cli_decoder_option(photo_folder, checkpoint):
    outputs = {}
    for decoder in DECODERS:
        result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--arch", "resnet18v1_sn",
                                          "--data", str(photo_folder), "--decoder", decoder, "-j", "0", "--json"])
        assert result.exit_code == 0, result.output
        outputs[decoder] = json.loads(result.output)
    assert outputs["torchvision"]["config"]["decoder"] == "torchvision"
    assert outputs["pil"]["n"] == outputs["torchvision"]["n"] == 21
    bad = CliRunner().invoke(cli, ["eval", "--checkpoint", str(checkpoint), "--arch", "resnet18v1_sn",
                                   "--data", str(photo_folder), "--decoder", "opencv"])
    assert bad.exit_code == 2 and "opencv" in bad.output


def test_unknown_decoder_is_one_line_error(photo_folder):
    with pytest.raises(DataError, match="unknown image decoder 'cv2'; expected one of pil, torchvision"):
        _dataset(photo_folder, "cv2")
    with pytest.raises(DataError, match="unknown image decoder"):
        build_eval_dataset(photo_folder, None, decoder="cv2")


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_uint8_images_normalised_per_batch_equal_the_per_image_transform_bit_for_bit(decoder, tmp_path):
    """evaluate_model hands uint8 images to the engine and normalises per batch; the tensors must be the
    1-crop transform's exactly, for both decoders, on real photographs (grayscale and CMYK included)."""
    from snzoo.data import eval_transform_from_config, eval_uint8_transform_from_config
    from snzoo.data.datasets import load_image
    from snzoo.eval import IMAGENET_EVAL

    full = eval_transform_from_config(IMAGENET_EVAL, decoder=decoder)
    per_image, per_batch = eval_uint8_transform_from_config(IMAGENET_EVAL, decoder=decoder)
    paths = photo_paths()
    expected = torch.stack([full(load_image(p, decoder)) for p in paths[:6]])
    images = torch.stack([per_image(load_image(p, decoder)) for p in paths[:6]])
    assert images.dtype == torch.uint8
    assert torch.equal(per_batch(images), expected)
    assert per_batch(expected) is expected  # a float batch passes unchanged
