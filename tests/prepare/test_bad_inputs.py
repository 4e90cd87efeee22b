"""Every bad input named in the prepare issue: a clear error naming the input and the fix, or
(with --on-bad-image skip) a counted skip; never a partial output that looks complete."""

from __future__ import annotations

import io
import re
import os

import numpy as np
import pytest
from PIL import Image

from diffmix_ray import canonical
from diffmix_ray.images import canonicalize
from diffmix_ray.data.prepare import PrepareConfig, prepare
from diffmix_ray.errors import DiffmixError

from tests import fixtures as fx


def _decoded(data: bytes) -> Image.Image:
    out, w, h = canonicalize(data)
    img = Image.open(io.BytesIO(out))
    assert img.mode == "RGB" and img.format in ("JPEG", "PNG") and img.size == (w, h)
    return img


@pytest.fixture
def folder(tmp_path):
    """A valid imagefolder the tests spoil one way each."""
    return fx.make_imagefolder(str(tmp_path / "raw"), {"good": 4, "fine": 4})


def _expect_bad(tmp_path, folder, bad_path, reason_re):
    cfg = PrepareConfig("imagefolder", folder, super_class="x")
    out = str(tmp_path / "out")
    with pytest.raises(DiffmixError) as err:
        prepare(cfg, out, show_progress=False)
    msg = str(err.value)
    assert bad_path in msg and "--on-bad-image skip" in msg
    assert re.search(reason_re, msg), msg
    assert not os.path.exists(os.path.join(out, "dataset.json"))  # nothing that looks complete
    info = prepare(PrepareConfig("imagefolder", folder, super_class="x", on_bad_image="skip"), str(tmp_path / "skip"),
                   show_progress=False)
    assert info.skipped["bad_files"] == 1 and bad_path in info.skipped["bad"][0]
    assert info.split_size("train") + info.split_size("val") == 8
    return info


def test_corrupt_jpeg(tmp_path, folder):
    bad = fx.write(os.path.join(folder, "good", "corrupt.jpg"), b"\xff\xd8\xff\xe0 this is not a jpeg at all")
    _expect_bad(tmp_path, folder, bad, r"corrupt\.jpg: .*(cannot identify|Error)")


def test_unreadable_file_is_named_not_an_in_memory_stream(tmp_path, folder):
    """PIL names the stream it was given ("<_io.BytesIO object at 0x...>"): the message names the file."""
    bad = fx.write(os.path.join(folder, "fine", "mystery.png"), b"plain text with an image extension")
    info = _expect_bad(tmp_path, folder, bad, r"mystery\.png: UnidentifiedImageError: cannot identify the image format")
    assert "BytesIO" not in info.skipped["bad"][0] and " at 0x" not in info.skipped["bad"][0]
    with pytest.raises(ValueError) as err:
        canonicalize(b"plain text")
    assert "BytesIO" not in str(err.value) and "0x" not in str(err.value)


def test_damaged_parquet_file_is_named(tmp_path):
    fx.make_parquet(str(tmp_path / "src" / "a.parquet"), [0, 1])
    bad = fx.write(str(tmp_path / "src" / "b.parquet"), b"PAR1 not really parquet")
    with pytest.raises(DiffmixError, match=re.escape(bad) + ".*(magic bytes|corrupted)"):
        prepare(PrepareConfig("parquet", str(tmp_path / "src"), super_class="x", image_column="img",
                              label_column="target"), str(tmp_path / "out"))


def test_zero_byte_file(tmp_path, folder):
    bad = fx.write(os.path.join(folder, "good", "empty.png"), b"")
    _expect_bad(tmp_path, folder, bad, r"empty file \(0 bytes\)")


def test_truncated_png(tmp_path, folder):
    big = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    bad = fx.write(os.path.join(folder, "fine", "cut.png"), buf.getvalue()[: len(buf.getvalue()) // 2])
    _expect_bad(tmp_path, folder, bad, r"cut\.png: .*(truncated|broken|Truncated)")


def test_non_image_file_in_class_folder(tmp_path, folder):
    bad = fx.write(os.path.join(folder, "fine", "notes.txt"), b"field notes")
    _expect_bad(tmp_path, folder, bad, r"not an image file \(extension \.txt\)")


def test_hidden_files_are_ignored_and_counted(tmp_path, folder):
    fx.write(os.path.join(folder, "fine", ".DS_Store"), b"\0\0")
    info = prepare(PrepareConfig("imagefolder", folder, super_class="x"), str(tmp_path / "out"), show_progress=False)
    assert info.skipped["ignored_files"] == 1 and info.skipped["bad_files"] == 0


def test_cmyk_jpeg_becomes_rgb():
    img = _decoded(fx.image_bytes((10, 200, 30), fmt="JPEG", mode="CMYK"))
    r, g, b = img.getpixel((5, 5))
    assert g > 150 and r < 80 and b < 80


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_and_palette_png_become_rgb(mode):
    img = Image.new("RGBA", (10, 10), (0, 0, 255, 255))
    img.putpixel((0, 0), (0, 0, 0, 0))  # one transparent pixel: composited on white
    buf = io.BytesIO()
    (img if mode == "RGBA" else img.convert(mode)).save(buf, format="PNG")
    out = _decoded(buf.getvalue())
    assert out.format == "PNG"
    if mode in ("RGBA", "LA"):
        assert out.getpixel((0, 0)) == (255, 255, 255)


def test_16bit_grayscale_png_keeps_its_range():
    arr = np.linspace(0, 65535, 16 * 16).astype(np.uint16).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    img = _decoded(buf.getvalue())
    px = np.asarray(img)
    assert px.min() < 10 and px.max() > 245  # scaled, not clipped to white
    assert (px[..., 0] == px[..., 1]).all()


def test_empty_class_folder(tmp_path, folder):
    os.makedirs(os.path.join(folder, "nobody"))
    with pytest.raises(DiffmixError, match="class folder 'nobody' .* holds no images.*remove the folder"):
        prepare(PrepareConfig("imagefolder", folder, super_class="x"), str(tmp_path / "out"))


def test_class_names_with_spaces_unicode_and_unsafe_characters(tmp_path):
    names = {"Black footed Albatross": 3, "Zaunkönig 鳥": 3, 'odd:*?"<>|\\name': 3}
    src = fx.make_imagefolder(str(tmp_path / "raw"), names)
    info = prepare(PrepareConfig("imagefolder", src, super_class="bird"), str(tmp_path / "out"))
    assert sorted(info.classes) == sorted(names)
    files = os.listdir(tmp_path / "out" / "images")
    assert files == ["train-00000.parquet", "val-00000.parquet"] or sorted(files) == sorted(
        ["train-00000.parquet", "val-00000.parquet"])  # class names never become paths
    ds = canonical.open_dataset(str(tmp_path / "out"))
    assert ds.info.classes == info.classes


def test_duplicate_image_ids_in_parquet(tmp_path):
    src = fx.make_parquet(str(tmp_path / "p.parquet"), [0, 1, 0], ids=["a", "b", "a"])
    with pytest.raises(DiffmixError, match="duplicate image id.*'a'.*unique"):
        prepare(PrepareConfig("parquet", src, super_class="x", image_column="img", label_column="target",
                              id_column="uid"), str(tmp_path / "out"))


def test_duplicate_ids_in_cub_metadata(tmp_path):
    src = fx.make_cub(str(tmp_path / "CUB"))
    with open(os.path.join(src, "images.txt"), "a") as f:
        f.write("1 001.Bird_Number_1/Bird_1_0000.jpg\n")
    with pytest.raises(DiffmixError, match="lists image id 1 twice"):
        prepare(PrepareConfig("cub", src), str(tmp_path / "out"))


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"])
def test_cub_missing_metadata_file(tmp_path, missing):
    src = fx.make_cub(str(tmp_path / "CUB"))
    os.remove(os.path.join(src, missing))
    with pytest.raises(DiffmixError, match=f"{missing} is missing from .*official metadata"):
        prepare(PrepareConfig("cub", src), str(tmp_path / "out"))


def test_parquet_label_out_of_range(tmp_path):
    src = fx.make_parquet(str(tmp_path / "p.parquet"), [0, 1, 7], names=["a", "b", "c"])
    with pytest.raises(DiffmixError, match=r"row 2: label 7 is out of range 0\.\.2 \(3 class names known\)"):
        prepare(PrepareConfig("parquet", src, super_class="x", image_column="img", label_column="target"),
                str(tmp_path / "out"))


def test_parquet_negative_label_and_unknown_column(tmp_path):
    src = fx.make_parquet(str(tmp_path / "p.parquet"), [0, -1])
    with pytest.raises(DiffmixError, match="label -1 is out of range"):
        prepare(PrepareConfig("parquet", src, super_class="x", image_column="img", label_column="target"),
                str(tmp_path / "o1"))
    with pytest.raises(DiffmixError, match="--label-column 'label' is not a column"):
        prepare(PrepareConfig("parquet", src, super_class="x", image_column="img"), str(tmp_path / "o2"))


def test_super_class_required_for_generic_formats(tmp_path, folder):
    with pytest.raises(DiffmixError, match="--super-class is required"):
        prepare(PrepareConfig("imagefolder", folder), str(tmp_path / "out"))


def test_missing_source(tmp_path):
    with pytest.raises(DiffmixError, match="is not a directory"):
        prepare(PrepareConfig("imagefolder", str(tmp_path / "nowhere"), super_class="x"), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# Huge images, decode memory, odd columns, links, hidden folders, classes that differ by case
# ---------------------------------------------------------------------------------------------
def header_only_png(width: int, height: int, color_type: int = 6) -> bytes:
    """A PNG whose header claims width x height (RGBA by default) but whose pixel data is a few
    bytes: what a decompression bomb looks like, and tiny to make. Decoding it fails; reading its
    header does not."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_bad_file(tmp_path, folder):
    bad = fx.write(os.path.join(folder, "good", "huge.png"), header_only_png(20000, 20000))
    _expect_bad(tmp_path, folder, bad, r"huge\.png: 400 MP, more than the 180 MP")


def test_an_image_too_large_for_the_decode_budget_is_a_bad_file_never_decoded(tmp_path, folder, monkeypatch):
    """13000 x 13000 RGBA is allowed by PIL (169 MP) but needs GBs to decode: over this machine's
    decode budget (here set to 256 MB) it is refused from its header, before any pixel is decoded."""
    from diffmix_ray import images

    from PIL import ImageFile

    monkeypatch.setenv("DIFFMIX_DECODE_MEMORY_GB", "0.25")
    loaded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self.size) or real(self))
    bad = fx.write(os.path.join(folder, "fine", "wide.png"), header_only_png(13000, 13000))
    _expect_bad(tmp_path, folder, bad, r"wide\.png: 13000x13000 RGBA needs ~3\.8 GB to decode, more than this "
                                       r"machine's decode budget of 0\.2 GB")
    assert loaded and (13000, 13000) not in loaded  # the others were decoded; the big one never was


def test_the_decode_budget_bounds_decodes_in_flight():
    import threading
    import time

    from diffmix_ray.images import DecodeBudget

    budget, in_use, peak, lock = DecodeBudget(100), [0], [0], threading.Lock()

    def work(cost):
        with budget.reserve(cost):
            with lock:
                in_use[0] += cost
                peak[0] = max(peak[0], in_use[0])
            time.sleep(0.01)
            with lock:
                in_use[0] -= cost

    threads = [threading.Thread(target=work, args=(c,)) for c in [60, 50, 40, 30, 90, 10, 100] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < peak[0] <= 100


def test_machine_decode_budget_is_a_share_of_memory(monkeypatch):
    from diffmix_ray.images import decode_budget_bytes, machine_memory_bytes

    monkeypatch.delenv("DIFFMIX_DECODE_MEMORY_GB", raising=False)
    assert 0 < decode_budget_bytes() <= machine_memory_bytes() // 2
    monkeypatch.setenv("DIFFMIX_DECODE_MEMORY_GB", "1.5")
    assert decode_budget_bytes() == int(1.5 * 2**30)
    monkeypatch.setenv("DIFFMIX_DECODE_MEMORY_GB", "nan")
    with pytest.raises(DiffmixError, match="DIFFMIX_DECODE_MEMORY_GB"):
        decode_budget_bytes()


def test_parquet_image_column_of_integers_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.table({"img": [1, 2], "target": [0, 1]}), path)
    with pytest.raises(DiffmixError, match=r"--image-column 'img' of .*p\.parquet holds int64, not encoded image"):
        prepare(PrepareConfig("parquet", path, super_class="x", image_column="img", label_column="target"),
                str(tmp_path / "out"))


def test_hidden_folders_are_not_classes(tmp_path, folder):
    fx.write(os.path.join(folder, ".ipynb_checkpoints", "a-checkpoint.jpg"), fx.image_bytes())
    info = prepare(PrepareConfig("imagefolder", folder, super_class="x"), str(tmp_path / "out"), show_progress=False)
    assert info.classes == ["fine", "good"]
    assert any(".ipynb_checkpoints" in i for i in info.skipped["ignored"])


def test_classes_differing_only_by_case_are_refused(tmp_path):
    src = fx.make_imagefolder(str(tmp_path / "raw"), {"Red Circle": 2, "red  circle": 2, "blue": 2})
    with pytest.raises(DiffmixError, match=r"'Red Circle' and 'red  circle' in .* differ only by case or spacing"):
        prepare(PrepareConfig("imagefolder", src, super_class="x"), str(tmp_path / "out"))


def test_links_are_followed_inside_the_source_and_refused_outside(tmp_path, folder):
    """One policy for files and folders alike: a link that stays inside --source is followed; one
    that leads outside is never read (a bad file, listed; a class folder outside is an error)."""
    outside = fx.make_imagefolder(str(tmp_path / "elsewhere"), {"far": 2})
    os.symlink(os.path.join(folder, "good"), os.path.join(folder, "alias"))  # a class folder, inside
    os.symlink(os.path.join(folder, "good", "000.jpg"), os.path.join(folder, "fine", "linked.jpg"))  # a file, inside
    info = prepare(PrepareConfig("imagefolder", folder, super_class="x"), str(tmp_path / "o1"), show_progress=False)
    assert info.classes == ["alias", "fine", "good"] and info.split_size("train") + info.split_size("val") == 13

    os.remove(os.path.join(folder, "alias"))
    os.remove(os.path.join(folder, "fine", "linked.jpg"))
    escaping = os.path.join(folder, "fine", "secret.jpg")
    os.symlink(os.path.join(outside, "far", "000.jpg"), escaping)
    _expect_bad(tmp_path / "t2", folder, escaping, r"secret\.jpg: a symbolic link to .*elsewhere.*outside --source")

    os.remove(escaping)
    os.symlink(os.path.join(outside, "far"), os.path.join(folder, "far"))
    with pytest.raises(DiffmixError, match=r"class folder 'far' .* symbolic link to .*elsewhere/far.*outside --source"):
        prepare(PrepareConfig("imagefolder", folder, super_class="x"), str(tmp_path / "o3"), show_progress=False)
