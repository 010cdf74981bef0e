"""slimcore/_shapes.py: shapes inferred from closed-form rules must equal the shapes of a real run,
and a graph with an op it has no rule for must fall back (and still prune correctly)."""

import pytest
import torch
import torchvision
from torch import nn

import slimcore
import slimcore.models as seed_models
from slimcore import graph
from slimcore._shapes import infer_shapes

CASES = [(n, lambda n=n: getattr(torchvision.models, n)(), (2, 3, 64, 64)) for n in
         ("resnet18", "resnet50", "vgg16_bn", "densenet121", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "regnet_y_400mf", "resnext50_32x4d", "googlenet", "squeezenet1_1", "shufflenet_v2_x0_5")]
CASES += [(n, lambda n=n: seed_models.build(n, num_classes=10, in_channels=3), (2, 3, 32, 32)) for n in
          ("vgg11", "vgg19", "preresnet56", "preresnet164", "densenet40")]
CASES += [(n, lambda n=n: seed_models.build(n, in_channels=1, input_size=28), (2, 1, 28, 28)) for n in ("lenet5", "mlp")]


def real_shapes(root, g, x):
    with torch.no_grad():
        graph._ShapeRecorder(root, g).run(x)
    return {n.name: n.meta.get(graph._SHAPE_KEY) for n in g.nodes}


@pytest.mark.parametrize("name,build,shape", CASES, ids=[c[0] for c in CASES])
def test_inferred_shapes_equal_a_real_run(name, build, shape):
    model = build().eval()
    x = torch.randn(shape)
    tracer = graph._Tracer()
    g = tracer.trace(model)
    inferred = infer_shapes(tracer.root, g, (x,), "inferred")
    want = real_shapes(tracer.root, g, x)
    if not inferred:  # allowed for exotic models (here: googlenet's/shufflenet's ops), never wrong
        assert name in ("googlenet", "shufflenet_v2_x0_5"), f"{name}: expected closed-form shapes"
        assert all("inferred" not in n.meta for n in g.nodes), "a failed inference must leave no partial shapes"
        return
    for n in g.nodes:
        assert n.meta.get("inferred") == want[n.name], (n.name, n.meta.get("inferred"), want[n.name])


def test_ceil_mode_and_padding_rules_match_torch():
    for k, s, p, ceil in [(3, 2, 1, True), (3, 2, 0, True), (2, 2, 0, True), (3, 3, 1, True), (3, 2, 1, False)]:
        for size in range(5, 14):
            pool = nn.MaxPool2d(k, s, p, ceil_mode=ceil)
            model = nn.Sequential(pool)
            x = torch.randn(1, 2, size, size + 1)
            tracer = graph._Tracer()
            g = tracer.trace(model)
            assert infer_shapes(tracer.root, g, (x,), "inferred")
            out = [n for n in g.nodes if n.op == "call_module"][0]
            assert out.meta["inferred"] == tuple(pool(x).shape), (k, s, p, ceil, size)


def test_unknown_op_falls_back_to_a_real_run():
    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = torch.roll(self.bn(self.conv(x)), 1, dims=3)  # no shape rule for roll
            return self.fc(y.mean((2, 3)))

    model = Rolled().eval()
    x = torch.randn(2, 3, 12, 12)
    tracer = graph._Tracer()
    g = tracer.trace(model)
    assert not infer_shapes(tracer.root, g, (x,), "inferred")
    report = slimcore.prune(model, x, ratio=0.5)  # shapes from the real run
    assert (report.flops_before, report.params_before) == (slimcore.profile(Rolled().eval(), x)[0], report.params_before)
    assert any("roll" in note for note in report.notes)  # no channel rule: its channels stay
