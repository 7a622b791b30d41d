"""`transfgu predict` on files, folders and globs."""
import numpy as np
import pytest
import torch
from PIL import Image

from transfgu.cli import main
from transfgu.data.images import collect_images
from tiny_project import predict_files
from transfgu.models.decoder import build_decoder


@pytest.fixture
def setup_dir(tmp_path):
    predict_files(tmp_path)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(imgs / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 20), dtype=np.uint8)).save(imgs / "sub" / "b.png")  # grayscale
    Image.fromarray(rng.integers(0, 255, (24, 24, 4), dtype=np.uint8)).save(imgs / "c.png")      # RGBA
    (imgs / "notes.txt").write_text("not an image")
    return tmp_path


def test_collect_images_from_folder_glob_and_file(setup_dir):
    imgs = setup_dir / "imgs"
    assert [p.name for p in collect_images([str(imgs)])] == ["a.jpg", "c.png", "b.png"]
    assert [p.name for p in collect_images([str(imgs / "*.png"), str(imgs / "c.png")])] == ["c.png"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        collect_images([str(imgs / "missing.jpg")])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        collect_images([str(imgs / "*.gif")])


def test_predict_writes_label_color_overlay_at_image_size(setup_dir):
    out = setup_dir / "out"
    main(["predict", str(setup_dir / "imgs"), "--decoder", str(setup_dir / "decoder.pt"),
          "--params", str(setup_dir / "params.yaml"), "--out", str(out), "--batch-size", "2"])
    for stem, (h, w) in {"a": (40, 56), "b": (33, 20), "c": (24, 24)}.items():
        label = np.asarray(Image.open(out / f"{stem}_label.png"))
        assert label.shape == (h, w) and label.max() < 6
        color = Image.open(out / f"{stem}_color.png")
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert color.size == overlay.size == (w, h) and color.mode == overlay.mode == "RGB"
    # no outputs/cluster_classes.json next to this decoder: the outputs are clusters, not classes
    assert (out / "classes.txt").read_text().splitlines()[1].startswith("0\tcluster 0\t-\t-\t#")


def test_predict_label_equals_library_prediction(setup_dir):
    """The label PNG is the argmax of the decoder logits upsampled to the image size."""
    from transfgu.data.images import load_rgb
    from transfgu.models.vit import build_backbone
    import torch.nn.functional as F
    out = setup_dir / "out"
    main(["predict", str(setup_dir / "imgs" / "a.jpg"), "--decoder", str(setup_dir / "decoder.pt"),
          "--params", str(setup_dir / "params.yaml"), "--out", str(out)])
    bb = build_backbone("vit_mini", 8, None, seed=0)
    dec = build_decoder(6, 192)
    dec.load_state_dict(torch.load(setup_dir / "decoder.pt", weights_only=True))
    dec.eval()
    x = load_rgb(setup_dir / "imgs" / "a.jpg", 32)[None].float() / 255
    with torch.no_grad():
        logits, _ = dec(bb(bb.normalize(x))[:, 1:], (4, 4))
    expected = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a_label.png")), expected)


def test_predict_rejects_a_decoder_of_the_wrong_width(setup_dir, capsys):
    torch.save(build_decoder(6, 384).state_dict(), setup_dir / "wide.pt")
    with pytest.raises(SystemExit):
        main(["predict", str(setup_dir / "imgs"), "--decoder", str(setup_dir / "wide.pt"),
              "--params", str(setup_dir / "params.yaml"), "--out", str(setup_dir / "o")])
    assert ("wide.pt was trained on a backbone of width 384 (vit_small, vit_small_patch14_dinov2, "
            "vit_small_patch14_reg4_dinov2, vit_small_patch16_dinov3, vit_small_patch16_dinov3_qkvb), but the backbone "
            "is vit_mini") in capsys.readouterr().err
