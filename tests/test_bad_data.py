"""Bad image files in a COCO-format dataset: found when the dataset is built, named, and either an
error with the fix or (data.skip_bad_images=true) left out with one warning; a file that only fails
when decoded later is named too, or replaced by the next readable image."""

import io
import json
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from msdetr.data import CocoDataModule, CocoDetection
from msdetr.data.coco import UnreadableImageError

W, H = 24, 16
GOOD = ("good1.png", "good2.jpg")
BAD = ("trunc.jpg", "text.jpg", "deep.png")


def _jpeg_bytes(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_image(path):
    """A small image under `path`'s name: good ones, or the three kinds of bad file."""
    name = path.name
    if name.startswith("good"):
        Image.fromarray(np.full((H, W, 3), 90, dtype=np.uint8)).save(path)
    # intact header, the last quarter cut off: only a full decode finds it
    elif name == "trunc.jpg":
        data = _jpeg_bytes(0)
        path.write_bytes(data[: len(data) * 3 // 4])
    elif name == "text.jpg":
        path.write_text("this is not a picture\n")
    elif name == "deep.png":  # 16-bit grayscale: PIL mode 'I;16'
        Image.fromarray(np.arange(W * H, dtype=np.uint16).reshape(H, W) * 50).save(path)
    else:
        raise ValueError(name)


def make_split(root, split, names):
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, name in enumerate(names, start=1):
        write_image(folder / name)
        images.append({"id": i, "file_name": name, "width": W, "height": H})
        anns.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 6]})
    (root / "annotations").mkdir(exist_ok=True)
    ann = root / "annotations" / f"instances_{split}.json"
    ann.write_text(
        json.dumps(
            {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}
        )
    )
    return folder, ann


@pytest.fixture()
def bad_set(tmp_path):
    return make_split(tmp_path, "train", [GOOD[0], *BAD, GOOD[1]])


def test_header_check_names_undecodable_files_and_the_fix(bad_set):
    folder, ann = bad_set
    with pytest.raises(ValueError) as info:
        CocoDetection(folder, ann)
    assert str(info.value) == (
        f"2 image file(s) listed in '{ann}' cannot be used: '{folder / 'text.jpg'}' (not an image "
        f"file PIL can read), '{folder / 'deep.png'}' (pixel mode 'I;16' (16/32-bit or float) is "
        "not supported; save it as an 8-bit RGB or grayscale image); fix or remove these files "
        "(or their entries in the annotation file), or set data.skip_bad_images=true to leave "
        "them out with a warning."
    )


def test_full_check_also_finds_the_truncated_file(bad_set):
    folder, ann = bad_set
    with pytest.raises(ValueError) as info:
        CocoDetection(folder, ann, verify_images="full")
    message = str(info.value)
    assert message.startswith(
        f"3 image file(s) listed in '{ann}' cannot be used: '{folder / 'trunc.jpg'}' "
        "(OSError: image file is truncated"
    )
    assert f"'{folder / 'text.jpg'}' (not an image file PIL can read)" in message
    assert f"'{folder / 'deep.png'}' (pixel mode 'I;16'" in message
    assert message.endswith("or set data.skip_bad_images=true to leave them out with a warning.")
    assert "good" not in message


def test_skip_drops_bad_images_with_one_warning_naming_them(bad_set):
    folder, ann = bad_set
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(folder, ann, verify_images="full", skip_bad_images=True)
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(
        f"data.skip_bad_images=true: leaving out 3 of the 5 image(s) listed in '{ann}', "
        "and their annotations, because they cannot be used: "
    )
    for name in BAD:
        assert f"'{folder / name}' (" in message
    assert len(ds) == 2 and ds.ids == [1, 5]
    # evaluation agrees
    assert sorted(ds.coco.getImgIds()) == [1, 5] and len(ds.coco.getAnnIds()) == 2
    assert [ds[i][1]["image_id"] for i in range(2)] == [1, 5]


def test_none_checks_only_that_files_exist(bad_set):
    folder, ann = bad_set
    assert len(CocoDetection(folder, ann, verify_images="none")) == 5
    (folder / "text.jpg").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"1 image file\(s\) .* missing .*'text\.jpg'.*"
        r"data\.skip_bad_images=true leaves them out",
    ):
        CocoDetection(folder, ann, verify_images="none")
    with pytest.warns(
        UserWarning, match=re.escape(f"'{folder / 'text.jpg'}' (the file does not exist)")
    ):
        assert len(CocoDetection(folder, ann, verify_images="none", skip_bad_images=True)) == 4
    with pytest.raises(
        ValueError, match=r"data.verify_images='quick' is not a check; use 'header' .*'full'"
    ):
        CocoDetection(folder, ann, verify_images="quick")


def test_truncated_file_found_while_loading_is_named(tmp_path):
    folder, ann = make_split(tmp_path, "train", [GOOD[0], "trunc.jpg", GOOD[1]])
    ds = CocoDetection(folder, ann)  # the header check passes it
    assert ds[0][1]["image_id"] == 1
    with pytest.raises(UnreadableImageError) as info:
        ds[1]
    message = str(info.value)
    assert message.startswith(
        f"image '{folder / 'trunc.jpg'}' cannot be read (OSError: image file is truncated"
    )
    assert message.endswith(
        "(data.verify_images=header did not decode it when the dataset was built; "
        "data.verify_images=full finds every such file before training); fix or remove it, or set "
        "data.skip_bad_images=true to skip unreadable images with a warning."
    )


def test_truncated_file_found_while_loading_is_skipped_with_a_warning(tmp_path):
    folder, ann = make_split(tmp_path, "train", [GOOD[0], "trunc.jpg", GOOD[1]])
    ds = CocoDetection(folder, ann, skip_bad_images=True)
    with pytest.warns(UserWarning) as record:
        image, target = ds[1]
    assert len(record) == 1
    assert str(record[0].message).startswith(
        f"image '{folder / 'trunc.jpg'}' cannot be read (OSError: image file is truncated"
    )
    assert "data.skip_bad_images=true: skipping it, the next readable image" in str(
        record[0].message
    )
    # the next image, with its own target
    assert target["image_id"] == 3 and image.shape[-2:] == (H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad now: replaced without another warning
        assert ds[1][1]["image_id"] == 3


def test_datamodule_checks_the_validation_images_too(tmp_path):
    make_split(tmp_path, "train", [GOOD[0], GOOD[1]])
    val_folder, _ = make_split(tmp_path, "val", [GOOD[0], "text.jpg"])
    opts = dict(root=str(tmp_path), batch_size=2, num_workers=0, eval_size=16, max_size=32)
    with pytest.raises(
        ValueError, match=re.escape(f"'{val_folder / 'text.jpg'}' (not an image file PIL can read)")
    ):
        CocoDataModule(**opts).setup("fit")
    dm = CocoDataModule(**opts, skip_bad_images=True)
    with pytest.warns(UserWarning, match="leaving out 1 of the 2 image"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1
    with pytest.raises(ValueError, match="data.verify_images='all' is not a check"):
        CocoDataModule(**opts, verify_images="all")


def test_size_differing_from_the_annotation_file_warns_and_clips(tmp_path):
    folder, ann = make_split(tmp_path, "train", [GOOD[0]])
    Image.fromarray(np.zeros((6, 9, 3), dtype=np.uint8)).save(folder / GOOD[0])
    with pytest.warns(
        UserWarning,
        match=re.escape(
            f"1 image(s) differ in size from their width/height there "
            f"('{folder / GOOD[0]}' is 9x6, the annotation file says 24x16)"
        ),
    ):
        ds = CocoDetection(folder, ann)
    boxes = ds[0][1]["boxes"]  # the box, x 2..10 and y 2..8, clipped to the 9x6 file: 2..9 and 2..6
    np.testing.assert_allclose(boxes.numpy(), [[5.5 / 9, 4 / 6, 7 / 9, 4 / 6]], rtol=1e-6)


def test_full_check_remembers_what_decoded_and_rechecks_changed_files(tmp_path, monkeypatch):
    """verify_images=full decodes each file once: a second build decodes nothing it already decoded,
    unless the file changed (its size or modification time)."""
    from msdetr.data import coco

    monkeypatch.setenv("MSDETR_CACHE_DIR", str(tmp_path / "cache"))
    folder, ann = make_split(tmp_path / "set", "train", ["good1.png", "good2.jpg", "good3.png"])
    decoded = []
    probe = coco.probe_image
    monkeypatch.setattr(
        coco, "probe_image", lambda path, decode=False: decoded.append(path) or probe(path, decode)
    )
    CocoDetection(folder, ann, verify_images="full")
    assert len(decoded) == 3 and coco.verdict_cache_file(folder).is_file()
    decoded.clear()
    CocoDetection(folder, ann, verify_images="full")
    assert decoded == []
    write_image(folder / "trunc.jpg")  # good3 is now a truncated JPEG: checked again, and refused
    (folder / "trunc.jpg").replace(folder / "good3.png")
    with pytest.raises(ValueError, match="good3.png' \\(OSError: image file is truncated"):
        CocoDetection(folder, ann, verify_images="full")
    assert decoded == [folder / "good3.png"]
