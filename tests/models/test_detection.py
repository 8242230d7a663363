"""Detection backbones: an FPN over the four stages feeding torchvision detectors, trained one step."""

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import dilateformer  # noqa: F401  (registers the models)
from dilateformer.models import save_weights
from dilateformer.models.detection import (
    dilateformer_fpn_backbone,
    fasterrcnn_dilateformer_fpn,
    maskrcnn_dilateformer_fpn,
    retinanet_dilateformer_fpn,
)

SMALL_IMAGES = dict(min_size=64, max_size=96)
# Few proposals and detections keep the R-CNN heads (the mask head above all) fast on 2 CPU cores.
FEW_BOXES = dict(
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=50,
    rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=20,
    box_batch_size_per_image=32,
    box_detections_per_img=10,
)


def synthetic_batch(with_masks=False):
    torch.manual_seed(0)
    images = [torch.rand(3, 64, 96), torch.rand(3, 72, 80)]
    targets = []
    for image in images:
        h, w = image.shape[1:]
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, w - 2.0, h - 3.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if with_masks:
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
                m[y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def test_fpn_backbone_levels_and_strides():
    backbone = dilateformer_fpn_backbone("dilateformer_nano").eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3", "pool"]
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert all(f.shape[1] == backbone.out_channels == 256 for f in feats.values())
    assert not hasattr(backbone.body.head, "weight")  # classifier pruned


@pytest.mark.parametrize(
    ("builder", "masks"),
    [(fasterrcnn_dilateformer_fpn, False), (retinanet_dilateformer_fpn, False), (maskrcnn_dilateformer_fpn, True)],
    ids=["faster_rcnn", "retinanet", "mask_rcnn"],
)
def test_detector_forward_backward_and_inference(builder, masks):
    extra = dict(detections_per_img=10) if builder is retinanet_dilateformer_fpn else FEW_BOXES
    model = builder("dilateformer_nano", num_classes=3, **SMALL_IMAGES, **extra)
    images, targets = synthetic_batch(with_masks=masks)
    model.train()
    losses = model(images, targets)
    expected = (
        {"loss_classifier", "loss_box_reg"}
        if builder is not retinanet_dilateformer_fpn
        else {
            "classification",
            "bbox_regression",
        }
    )
    assert expected <= set(losses) and (not masks or "loss_mask" in losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    stem_grad = model.backbone.body.stem[0].weight.grad
    assert stem_grad is not None and stem_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "scores", "labels"} <= set(detections[0])


def test_backbone_weights_and_frozen_batchnorm(tmp_path):
    torch.manual_seed(0)
    classifier = dilateformer.models.create_dilateformer("dilateformer_nano")
    path = save_weights(classifier, tmp_path / "nano.safetensors")
    backbone = dilateformer_fpn_backbone("dilateformer_nano", weights=path, freeze_batchnorm=True)
    torch.testing.assert_close(backbone.body.stem[0].weight, classifier.stem[0].weight)
    assert isinstance(backbone.body.stem[1], FrozenBatchNorm2d)
    torch.testing.assert_close(
        backbone.body.stages[1].downsample.norm.running_var, classifier.stages[1].downsample.norm.running_var
    )
    with pytest.raises(ValueError, match="returned_stages"):
        dilateformer_fpn_backbone("dilateformer_nano", returned_stages=(1, 4))
