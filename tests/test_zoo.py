"""Models people bring: timm backbones and ultralytics YOLO, built from config (no downloads).

For each: the pruned model computes exactly what the dense model computes with the removed
channels zeroed (compensate=False), the cut is real (>= 20% of the parameters at ratio 0.4), and at
least 90% of the output channels of the convs a BN normalises are prunable outside the output
heads. Then the pruned model must keep working in its own library.
"""

import copy

import numpy as np
import pytest
import torch
from helpers import flat_outputs, randomize_batchnorms, zero_removed

import slimcore

timm = pytest.importorskip("timm")

SIZE = 64
# (architecture, criterion): ConvNeXt has no BN (layer norms), so its MLPs go by l1_filter.
TIMM = [
    ("resnet18d", "bn_scale"), ("resnet26t", "bn_scale"), ("resnet50d", "bn_scale"),
    ("seresnext26d_32x4d", "bn_scale"), ("legacy_seresnet18", "bn_scale"),
    ("efficientnet_b0", "bn_scale"), ("efficientnet_lite0", "bn_scale"), ("tf_efficientnet_b0", "bn_scale"),
    ("efficientnetv2_rw_t", "bn_scale"), ("tinynet_a", "bn_scale"), ("mixnet_s", "l1_filter"),
    ("mobilenetv2_100", "bn_scale"), ("mobilenetv3_large_100", "bn_scale"), ("hardcorenas_a", "bn_scale"),
    ("fbnetc_100", "bn_scale"), ("mnasnet_100", "bn_scale"), ("spnasnet_100", "bn_scale"),
    ("regnetx_002", "bn_scale"), ("regnety_002", "bn_scale"), ("regnety_008", "bn_scale"),
    ("cspdarknet53", "bn_scale"), ("cspresnet50", "bn_scale"), ("cspresnext50", "bn_scale"),
    ("cs3darknet_s", "bn_scale"), ("darknet53", "bn_scale"),
    ("ghostnet_100", "bn_scale"), ("ghostnetv2_100", "bn_scale"), ("rexnet_100", "bn_scale"),
    ("dla34", "bn_scale"), ("dla46_c", "bn_scale"), ("dpn68", "bn_scale"), ("hrnet_w18_small", "bn_scale"),
    ("res2net50_14w_8s", "bn_scale"), ("selecsls42b", "bn_scale"), ("gernet_s", "bn_scale"),
    ("repvgg_a0", "bn_scale"), ("xception41", "bn_scale"), ("densenet121", "bn_scale"),
    ("convnext_atto", "l1_filter"),
    # global-context attention (x @ softmax(conv(x)) over the pixels) and lambda layers (sizes the
    # pruned copy fails on between ops, reshape(B, C, H, W) with C of the block's input)
    ("gcresnet33ts", "bn_scale"), ("gc_efficientnetv2_rw_t", "bn_scale"), ("lambda_resnet26t", "bn_scale"),
]
YOLO = ["yolov8n", "yolo11n", "yolov8n-seg", "yolo11n-seg", "yolov8n-pose", "yolo11n-pose", "yolov8n-cls",
        "yolo11n-cls"]


def check_zoo_model(model, head, criterion="bn_scale", min_cut=0.2, min_share=0.9, keep_outputs=True):
    torch.manual_seed(0)
    model = randomize_batchnorms(model).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, x, ratio=0.4, criterion=criterion, compensate=False, keep_outputs=keep_outputs)
    zero_removed(dense, report.removed)
    with torch.no_grad():
        got, want = flat_outputs(model(x)), flat_outputs(dense(x))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        if g.shape != w.shape:  # an output freed by keep_outputs: the dense one's surviving channels
            assert keep_outputs is not True and g.shape[1] < w.shape[1]
            w = w[:, w.transpose(0, 1).flatten(1).abs().amax(1) > 0]
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    cut = 1 - report.params_after / report.params_before
    assert cut >= min_cut, f"only {cut:.1%} of the parameters cut\n{report}"
    assert report.params_after == sum(p.numel() for p in model.parameters())
    normalised = [(p, t) for name, (p, t, bn) in report.prunable.items()
                  if bn and not (name == head or name.startswith(head + "."))]
    if criterion == "bn_scale":
        share = sum(p for p, _ in normalised) / sum(t for _, t in normalised)
        assert share >= min_share, f"{share:.1%} of the BN-normalised channels prunable\n" + "\n".join(report.notes)
    return model, report


@pytest.mark.parametrize("name,criterion", TIMM, ids=[n for n, _ in TIMM])
def test_timm_models_prune_exactly(name, criterion):
    check_zoo_model(timm.create_model(name, pretrained=False), head="head", criterion=criterion)


def _yolo_model(name):
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    kind = name.split("-")[1] if "-" in name else "det"
    cls = {"det": tasks.DetectionModel, "seg": tasks.SegmentationModel, "pose": tasks.PoseModel,
           "cls": tasks.ClassificationModel}[kind]
    return cls(f"{name}.yaml", verbose=False)


@pytest.mark.parametrize("name", YOLO)
def test_yolo_models_prune_exactly(name):
    model = _yolo_model(name)
    head = f"model.{len(model.model) - 1}"  # Detect / Segment / Pose / Classify
    # In eval, ultralytics' heads return (predictions, raw outputs incl. "feats", the neck's features):
    # only the predictions keep their channels. YOLO11's C2PSA attention (view into heads, q^T k,
    # view back with the block input's width) prunes whole channels of every head together.
    _, report = check_zoo_model(model, head=head, keep_outputs=["0"])
    assert 1 - report.params_after / report.params_before >= 0.4


def test_yolo_prunes_after_it_has_run():
    """ultralytics' Detect caches its anchors by the shape of its input features; with those features
    pruned, the pruned model remakes them, running ops the dense capture did not see. The size check
    lines the two captures up per module (difflib), so the extra ops do not shift its comparison."""
    model = randomize_batchnorms(_yolo_model("yolov8n")).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model(x)  # anchors cached for the dense feature shapes
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, x, ratio=0.4, compensate=False, keep_outputs="0")
    zero_removed(dense, report.removed)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], dense(x)[0], rtol=1e-4, atol=1e-4)
    assert report.params_after < 0.6 * report.params_before


def test_keep_outputs_names_outputs_that_exist():
    model = _yolo_model("yolov8n").eval()
    with pytest.raises(ValueError, match=r"keep_outputs names 'preds'.*'1\.feats\.0'"):
        slimcore.prune(model, torch.randn(1, 3, SIZE, SIZE), ratio=0.4, keep_outputs=["preds"])
    with pytest.raises(TypeError, match="keep_outputs"):
        slimcore.prune(model, torch.randn(1, 3, SIZE, SIZE), ratio=0.4, keep_outputs=[0])


def test_pruned_yolo_runs_in_ultralytics(tmp_path, monkeypatch):
    """Predict on an image array, export to ONNX with ultralytics' exporter (which runs C2f's
    forward_split, sized by C2f.c: the attribute follows the pruned width), fuse."""
    ultralytics = pytest.importorskip("ultralytics")
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.chdir(tmp_path)  # the exporter writes next to the model's name
    yolo = ultralytics.YOLO("yolov8n.yaml")
    randomize_batchnorms(yolo.model)
    x = torch.randn(1, 3, 64, 64)
    report = slimcore.prune(yolo.model, x, ratio=0.5)
    assert report.params_after < 0.6 * report.params_before
    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    results = yolo.predict(image, imgsz=64, verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    yolo.model.eval()
    with torch.no_grad():
        before = yolo.model(x)[0]
    session = onnxruntime.InferenceSession(yolo.export(format="onnx", imgsz=64, simplify=False))
    exported = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(exported, before.numpy(), rtol=1e-3, atol=1e-3 * float(before.abs().max()))
    with torch.no_grad():
        yolo.model.fuse(verbose=False)
        after = yolo.model(x)[0]
    torch.testing.assert_close(after, before, rtol=1e-3, atol=1e-3 * float(before.abs().max()))


def test_pruned_timm_model_keeps_its_api(tmp_path):
    model = randomize_batchnorms(timm.create_model("efficientnet_b0", pretrained=False)).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    slimcore.prune(model, x, ratio=0.4)
    with torch.no_grad():
        whole = model(x)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), whole)
    path = tmp_path / "effb0.pt"
    slimcore.save_pruned(model, path)
    loaded = slimcore.load_pruned(path, build_fn=lambda: timm.create_model("efficientnet_b0", pretrained=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), whole)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)


def test_size_attributes_are_updated_where_the_code_splits_by_them():
    """CSP stages split by ``self.expand_chs // 2``: the pruner updates the attribute (and says so)."""
    model, report = check_zoo_model(timm.create_model("cspdarknet53", pretrained=False), head="head")
    fixed = [n for n in report.notes if ".expand_chs = " in n]
    assert fixed, report.notes
    for stage in model.stages:
        if hasattr(stage, "expand_chs"):
            assert stage.expand_chs == stage.conv_exp.conv.out_channels


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "torchvision:vit_b_16"])
def test_transformer_mlps_prune_exactly(name):
    """Linear -> GELU -> Linear blocks lose hidden width by l1_filter; the attention (a view of
    qkv into three pieces and heads, fused scaled-dot-product attention) and the layer-normed
    residual stream stay, so about a quarter of the parameters go at ratio 0.4."""
    if name.startswith("torchvision:"):
        import torchvision

        model = torchvision.models.vit_b_16(image_size=SIZE)
        mlps = [layer.mlp[0] for layer in model.encoder.layers]
    else:
        model = timm.create_model(name, pretrained=False, img_size=SIZE)
        mlps = [block.mlp.fc1 for block in model.blocks]
    hidden = [m.out_features for m in mlps]
    _, report = check_zoo_model(model, head="head", criterion="l1_filter")
    assert all(m.out_features < h for m, h in zip(mlps, hidden))


@pytest.mark.parametrize("name", ["nest_tiny", "hiera_tiny_224", "convit_tiny", "tnt_s_legacy_patch16_224"])
def test_layers_reading_untracked_layouts_still_prune_their_outputs(name):
    """Transformers whose tokens pass through layouts the channel rules do not follow (NesT's and
    Hiera's blocked [B, T, N, C], ConViT's gated attention, TNT's pixel tokens): the MLP's fc1
    reads an untracked tensor, so its input features stay, but its outputs are its own channels
    and go by l1_filter. They were frozen with the input, and nothing was cut."""
    model = timm.create_model(name, pretrained=False, img_size=SIZE)
    check_zoo_model(model, head="head", criterion="l1_filter")


def test_relative_position_tables_survive_the_size_check():
    """lambda_resnet26rpt_256 indexes its relative position table with an integer buffer. The size
    check runs the pruned copy on uninitialised CPU memory when the meta device cannot (here:
    values read by the model's Python); index buffers keep their values there, else the copy
    indexed out of bounds and prune raised."""
    check_zoo_model(timm.create_model("lambda_resnet26rpt_256", pretrained=False, img_size=SIZE), head="head")


def test_batchnorm_over_flattened_tokens_is_coupled_to_its_linear():
    """LeViT's Linear + BatchNorm1d: ``bn(linear(x).flatten(0, 1)).reshape_as(x)``. The BN
    normalises the linear's channels one to one, so it is coupled to it (as after a conv) and the
    MLP's hidden width goes by bn_scale; taken as a selection BN, the reshape back to the linear's
    width failed and froze nearly everything. The attention's q/k/v widths stay (view by heads,
    split by key_dim), hence the lower share of prunable channels."""
    model = timm.create_model("levit_128s", pretrained=False, img_size=SIZE)
    hidden = {n: m.out_features for n, m in model.named_modules() if n.endswith("mlp.ln1.linear")}
    model, report = check_zoo_model(model, head="head", min_share=0.7)
    assert all(model.get_submodule(n).out_features < h for n, h in hidden.items())


def test_whole_torchvision_detector_prunes_exactly():
    """A detector with its post-processing (score threshold, top-k, NMS): sizes after those depend
    on the data, so the pruned copy's size check follows only the channel sizes there. The
    detections themselves turn on float ties of random-init scores; the dense layers (backbone,
    head) must match the dense model with the removed channels zeroed."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomize_batchnorms(torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None)).eval()
    images = [torch.randn(3, SIZE, SIZE), torch.randn(3, SIZE, SIZE)]
    dense = copy.deepcopy(model)
    report = slimcore.prune(model, (images,), ratio=0.4, compensate=False)
    zero_removed(dense, report.removed)
    x = torch.randn(2, 3, 320, 320)
    with torch.no_grad():
        got = model.head(list(model.backbone(x).values()))
        want = dense.head(list(dense.backbone(x).values()))
        detections = model(images)
    for key in ("cls_logits", "bbox_regression"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4 * float(want[key].abs().max()))
    assert len(detections) == 2 and detections[0]["boxes"].shape[1] == 4
    assert report.params_after < 0.8 * report.params_before
