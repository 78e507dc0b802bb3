"""Augmentation presets, the record transform, reduced-scale decoding and reseeding."""
import pickle

import numpy as np
import pytest

from tests.helpers import encode_jpeg, synthetic_images


def coordinate_image(size: int = 512) -> np.ndarray:
    """R encodes x and G encodes y (0..255 across the image): a crop reveals its own box."""
    ramp = np.round(np.linspace(0, 255, size)).astype(np.uint8)
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = ramp[None, :]
    img[..., 1] = ramp[:, None]
    img[..., 2] = 128
    return img


def crop_box(out: np.ndarray) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1) of a crop of `coordinate_image`, as fractions of the source."""
    r = out[..., 0].astype(np.float64).mean(axis=0)  # per column
    g = out[..., 1].astype(np.float64).mean(axis=1)  # per row
    return r[0] / 255, r[-1] / 255, g[0] / 255, g[-1] / 255


def test_train_transform_output_and_options():
    from torch2flax.loaders import train_transform

    img = synthetic_images(1, 3, (48, 80), seed=1)[0][0]
    aug = train_transform(32, color_jitter=0.4, vflip=True, rotate=10, erase_prob=0.5)
    out = aug(image=img)["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    rect = train_transform((24, 40))(image=img)["image"]
    assert rect.shape == (24, 40, 3)
    with pytest.raises(ValueError, match="bicubic"):
        train_transform(32, interpolation="cubic")


def test_hflip_probability_and_color_jitter_change_pixels():
    from torch2flax.loaders import train_transform
    from torch2flax.loaders.transforms import reseed_augmenters, sample_seed

    img = coordinate_image(64)
    flips = {}
    for hflip in (True, False):
        aug = train_transform(32, scale=(0.5, 1.0), hflip=hflip)
        n = 0
        for i in range(200):
            reseed_augmenters([aug], sample_seed(0, 0, i))
            x0, x1, _, _ = crop_box(aug(image=img)["image"])
            n += x1 < x0  # R decreasing left to right: mirrored
        flips[hflip] = n
    assert flips[False] == 0
    assert 70 <= flips[True] <= 130  # Binomial(200, 0.5): +-4.2 sigma

    plain, jitter = train_transform(32), train_transform(32, color_jitter=0.4)
    reseed_augmenters([plain], sample_seed(0, 0, 0))
    reseed_augmenters([jitter], sample_seed(0, 0, 0))
    a, b = plain(image=img)["image"], jitter(image=img)["image"]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2


def test_eval_transform_matches_timm():
    """Resize short side to size/crop_pct + center crop, as timm's eval transform (PIL) does."""
    from PIL import Image
    from timm.data import create_transform

    from torch2flax.loaders import eval_transform

    # Smooth content: PIL's and OpenCV's bicubic kernels then agree to ~1 level.
    yy, xx = np.mgrid[0:120, 0:160]
    img = np.stack([xx * 1.5, yy * 2.0, 128 + 60 * np.sin(xx / 9.0)], -1).clip(0, 255).astype(np.uint8)
    ours = eval_transform(64, crop_pct=0.8)(image=img)["image"]
    timm_tf = create_transform(64, is_training=False, crop_pct=0.8, interpolation="bicubic")
    # timm's last two steps are ToTensor + Normalize; stop before them to compare uint8.
    pil = Image.fromarray(img)
    for t in timm_tf.transforms[:-2]:
        pil = t(pil)
    ref = np.asarray(pil)
    assert ours.shape == ref.shape == (64, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() < 1.5


def test_record_transform_fields_and_errors():
    from torch2flax.loaders import RecordTransform, eval_transform

    img = synthetic_images(1, 3, 40, seed=2)[0][0]
    tf = RecordTransform(eval_transform(32))
    out = tf({"image": encode_jpeg(img), "class": 3, "id": b"abc"})
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8
    assert out["label"] == 3 and out["label"].dtype == np.int64 and out["id"] == "abc"
    test_out = tf({"image": encode_jpeg(img), "id": "x"})  # test split: no class
    assert set(test_out) == {"image", "id"}
    with pytest.raises(KeyError, match="'img'"):
        RecordTransform(None, image_key="img")({"image": b""})
    # picklable (DataLoader workers receive a copy) and equal after the round trip
    clone = pickle.loads(pickle.dumps(tf))
    rec = {"image": encode_jpeg(img), "class": 1, "id": "y"}
    np.testing.assert_array_equal(clone(rec)["image"], tf(rec)["image"])


def test_reduced_decode_keeps_crop_statistics():
    """Decoding 512 px at 1/8 scale for a 64 px RandomResizedCrop draws the same crops.

    Crop boxes are read back from the pixels of a coordinate image, so this checks
    what the model sees: per sample (same seed) the relative box agrees with a
    full-resolution decode, and the crop-scale distributions agree.
    """
    from scipy.stats import ks_2samp

    from torch2flax.loaders import RecordTransform, train_transform
    from torch2flax.loaders.transforms import reseed_augmenters, sample_seed

    jpeg = encode_jpeg(coordinate_image(512), quality=95)
    fast = RecordTransform(train_transform(64, hflip=False), reduce_decode=True)
    full = RecordTransform(train_transform(64, hflip=False), reduce_decode=False)
    assert fast.decode(jpeg).shape == (64, 64, 3)  # really decoded at 1/8
    assert full.decode(jpeg).shape == (512, 512, 3)
    boxes = {"fast": [], "full": []}
    for i in range(300):
        for name, tf in (("fast", fast), ("full", full)):
            reseed_augmenters([tf.augment], sample_seed(0, 0, i))
            boxes[name].append(crop_box(tf({"image": jpeg})["image"]))
    fast_b, full_b = np.array(boxes["fast"]), np.array(boxes["full"])
    # Same draws: boxes agree to within a couple of 1/64 decoded pixels.
    assert np.median(np.abs(fast_b - full_b)) < 0.02
    assert np.mean(np.abs(fast_b - full_b).max(axis=1) < 0.05) > 0.95

    def scale(b):  # area fraction, corrected for pixel centres (n-1)/n
        return (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]) * (64 / 63) ** 2

    s_fast, s_full = scale(fast_b), scale(full_b)
    assert ks_2samp(s_fast, s_full).pvalue > 0.05
    # and both follow RandomResizedCrop's nominal scale range (0.08, 1)
    assert 0.06 < s_fast.min() < 0.15 and 0.9 < s_fast.max() < 1.05
    centre_x = (fast_b[:, 0] + fast_b[:, 1]) / 2
    assert abs(np.mean(centre_x) - 0.5) < 0.05


def test_reduce_factor_never_undershoots_target():
    from torch2flax.loaders import eval_transform, train_transform
    from torch2flax.loaders.transforms import _min_source_hw, reduce_factor

    rrc = _min_source_hw(train_transform(224))
    assert reduce_factor((512, 512), rrc) == 2
    assert reduce_factor((447, 512), rrc) == 1
    assert reduce_factor((1800, 2000), rrc) == 8
    ev = _min_source_hw(eval_transform(224, crop_pct=0.875))  # short side 256
    assert reduce_factor((512, 700), ev) == 2 and reduce_factor((511, 700), ev) == 1


def test_reseeding_found_augmenters_is_deterministic_per_sample():
    import torch.utils.data

    from torch2flax.loaders import RecordTransform, train_transform
    from torch2flax.loaders.transforms import find_augmenters, reseed_augmenters, sample_seed

    class Holder(torch.utils.data.Dataset):
        def __init__(self, tf):
            self.cfg = {"transform": tf}

    tf = RecordTransform(train_transform(32))
    ds = torch.utils.data.Subset(Holder(tf), [0])
    found = find_augmenters(ds)
    assert len(found) == 1 and found[0] is tf.augment
    rec = {"image": encode_jpeg(synthetic_images(1, 3, 64, seed=3)[0][0])}

    def draw(i):
        reseed_augmenters(found, sample_seed(7, 0, i))
        return tf(rec)["image"]

    np.testing.assert_array_equal(draw(5), draw(5))
    assert not np.array_equal(draw(5), draw(6))


def test_global_generators_are_seeded_only_for_datasets_holding_user_code(tmp_path):
    from tests.helpers import write_flower_tfrecords
    from torch2flax.loaders import RecordTransform, TFRecordDataset, train_transform
    from torch2flax.loaders.transforms import holds_user_code

    files = write_flower_tfrecords(tmp_path, num_records=4, num_shards=1, size=16).files
    ours = TFRecordDataset(files, transform=RecordTransform(train_transform(8)))
    assert not holds_user_code(ours)  # only torch2flax + albumentations: their draws are reseeded
    assert holds_user_code(TFRecordDataset(files, transform=lambda d: d))
    assert holds_user_code(TFRecordDataset(files, transform=_user_record_transform(train_transform(8))))


def _user_record_transform(augment):
    from torch2flax.loaders import RecordTransform

    class Jittered(RecordTransform):  # a user's subclass may draw from np.random
        def __call__(self, record):
            import numpy as np

            out = super().__call__(record)
            out["image"] = out["image"] + np.random.randint(2)
            return out

    return Jittered(augment)
