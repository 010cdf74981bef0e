"""Network slimming of a YOLO through ultralytics' own trainer (slimcore.integrations.ultralytics).

Everything runs on CPU at 64x64 on a synthetic set of 32 + 16 images, without network: ultralytics
is imported with YOLO_OFFLINE=1 (conftest.py), models are built from yaml, and every DNS lookup or
socket connection is refused and recorded (a test fails if any was tried). ultralytics checks
its plotting font on every data set check and fetches it when it can: that check is stubbed.

What is and is not covered for AMP: ultralytics builds its GradScaler for CUDA only (disabled on
CPU). The tests swap in an *enabled* CPU GradScaler with loss scale 2^10 right after ultralytics'
setup, so its real backward(scale(loss)) -> unscale_ -> clip -> scaler.step path runs, and a
scale of 2^127 makes every step overflow so GradScaler skips them all. fp16/bf16 autocast
itself, CUDA and fused optimizers (which step under GradScaler and skip inside their kernel) are
not run here.
"""

import copy
import csv
import os
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from helpers import randomize_batchnorms

import slimcore

os.environ.setdefault("YOLO_OFFLINE", "1")  # read when ultralytics is imported (conftest sets it first)
pytest.importorskip("ultralytics")
pytest.importorskip("PIL")
from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402
from ultralytics.nn.tasks import DetectionModel  # noqa: E402
from ultralytics.utils.torch_utils import unwrap_model  # noqa: E402

from slimcore.integrations import ultralytics as sy  # noqa: E402

IMGSZ = 64
COMMON = dict(imgsz=IMGSZ, batch=8, workers=0, device="cpu", plots=False, verbose=False, exist_ok=True, amp=False,
              seed=0)
NETWORK_ATTEMPTS = []
THREADS = torch.get_num_threads()  # ultralytics sets cores - 1 whenever it selects the CPU: restored after each test


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Refuse (and record) every network access while this module runs, module fixtures included."""

    def refuse(what):
        def call(*args, **kwargs):
            NETWORK_ATTEMPTS.append((what, repr(args[:2])))
            raise OSError(f"network access in a test: {what}{args[:2]}")
        return call

    import ultralytics.data.utils
    import ultralytics.utils.plotting

    fonts = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        mp.setattr(socket, "create_connection", refuse("create_connection"))
        mp.setattr(socket.socket, "connect", refuse("connect"))
        # ultralytics' check_font fetches Arial.ttf (a HEAD request first) when it is not installed
        mp.setattr(ultralytics.data.utils, "check_font", lambda *a, **k: fonts.append(a))
        mp.setattr(ultralytics.utils.plotting, "check_font", lambda *a, **k: fonts.append(a))
        yield
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def no_network_and_threads_restored(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository (ultralytics' default ./runs)
    before = len(NETWORK_ATTEMPTS)
    yield
    torch.set_num_threads(THREADS)
    assert NETWORK_ATTEMPTS[before:] == [], f"network accessed: {NETWORK_ATTEMPTS[before:]}"
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return sy.make_synthetic_detection(tmp_path_factory.mktemp("shapes"), n_train=32, n_val=16, imgsz=IMGSZ,
                                       classes=3, seed=0)


def _shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------- the penalty


def _gammas(trainer):
    return [w for _, w in slimcore.bn_weights(unwrap_model(trainer.model))]


def _train_recorded(data, project, name, lam, mode="subgradient", scale=None, steps=3, prepare=None, momentum=0.0):
    """One epoch of YOLOv8n through ultralytics' trainer, stopped after ``steps`` optimizer steps,
    recording at each step (optimizer step hooks, one registered before slimcore's and one after):
    gamma and its gradient as the optimizer's step() begins, before and after slimcore's hook, the
    lr/momentum the step uses, the scaler's scale, the total gradient norm, and gamma after the
    optimizer's update, before and after slimcore's post-step hook."""
    rec = []
    info = {}

    def setup(trainer):  # on_pretrain_routine_end: end of ultralytics' setup, before slimcore's hooks
        if scale is not None:
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)
        if prepare is not None:
            prepare(trainer)
        gam = _gammas(trainer)
        params = list(trainer.model.parameters())
        group = next(g for g in trainer.optimizer.param_groups if any(p is gam[0] for p in g["params"]))
        info.update(gammas=gam, start=[w.detach().clone() for w in gam], trainer=trainer)

        def pre_first(opt, args, kwargs):
            norms = torch.stack([p.grad.norm() for p in params if p.grad is not None])
            rec.append(dict(gamma=[w.detach().clone() for w in gam], grad=[w.grad.clone() for w in gam],
                            norm=float(torch.linalg.vector_norm(norms)), lr=group["lr"], momentum=group["momentum"],
                            nesterov=group["nesterov"], weight_decay=group["weight_decay"],
                            scale=trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None))

        def post_first(opt, args, kwargs):
            rec[-1]["stepped"] = [w.detach().clone() for w in gam]

        trainer.optimizer.register_step_pre_hook(pre_first)
        trainer.optimizer.register_step_post_hook(post_first)

    def after_slimcore(trainer):  # on_train_start: slimcore's hooks are registered by now
        gam = info["gammas"]
        trainer.optimizer.register_step_pre_hook(lambda o, a, k: rec[-1].update(grad_final=[w.grad.clone() for w in gam]))
        trainer.optimizer.register_step_post_hook(lambda o, a, k: rec[-1].update(final=[w.detach().clone() for w in gam]))

    def stop(trainer):
        trainer.stop = trainer.stop or len(rec) >= steps

    def vary_lr(trainer):  # a different lr at every step: the prox must use the one its step used
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.01 * (1 + 0.5 * len(rec))

    def end(trainer):
        info["end"] = [w.detach().clone() for w in _gammas(trainer)]
        info["scale_end"] = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None

    yolo = YOLO("yolov8n.yaml")
    for event, fn in (("on_pretrain_routine_end", setup), ("on_train_start", after_slimcore),
                      ("on_train_batch_end", stop), ("on_train_epoch_end", end), ("on_train_batch_start", vary_lr)):
        yolo.add_callback(event, fn)
    # nbs = batch: one optimizer step per batch (ultralytics accumulates nbs / batch batches otherwise)
    yolo.train(trainer=sy.slim_trainer(lam, mode=mode, momentum=momentum), data=data, epochs=1, nbs=8,
               optimizer="SGD", lr0=0.01, momentum=0.9, project=str(project), name=name, deterministic=True, **COMMON)
    return rec, info


def _sgd_reference(gamma, grads, rec, prox_lam=None):
    """torch.optim.SGD (nesterov, no weight decay) by hand, in float64, from ``gamma`` through the
    recorded steps, with the gradient of step i given by grads(i, gamma_i); with ``prox_lam``,
    each step is followed by the L1 prox (soft threshold at lr_i * prox_lam)."""
    g = [w.double() for w in gamma]
    buf = None
    for i, r in enumerate(rec):
        assert r["weight_decay"] == 0 and r["nesterov"]
        d = [x.double() for x in grads(i, g)]
        m = r["momentum"]
        buf = d if buf is None else [m * b + x for b, x in zip(buf, d)]
        g = [w - r["lr"] * (x + m * b) for w, x, b in zip(g, d, buf)]
        if prox_lam is not None:
            t = r["lr"] * prox_lam
            g = [torch.sign(w) * torch.clamp(w.abs() - t, min=0) for w in g]
    return g


def test_subgradient_is_lam_sign_gamma_per_step_after_unscale_and_clipping(data, tmp_path):
    lam = 0.05
    rec, info = _train_recorded(data, tmp_path, "l1", lam, scale=2.0**10)
    plain, _ = _train_recorded(data, tmp_path, "plain", 0.0)  # ultralytics' own (disabled) scaler, no penalty
    assert len(rec) == len(plain) == 3
    for r in rec:
        assert r["scale"] == 2.0**10  # the loss was scaled: unscale_ had work to do
        assert r["norm"] <= 10.0 * (1 + 1e-5)  # ultralytics clipped to 10 before the step began
        # slimcore's hook added exactly lam * sign(gamma), after unscale_ and clipping (neither touched it)
        for grad, final, gamma in zip(r["grad"], r["grad_final"], r["gamma"]):
            torch.testing.assert_close(final, grad + lam * torch.sign(gamma), rtol=0, atol=1e-7)
    assert max(r["norm"] for r in rec) > 9.99  # clipping was active, so "after clipping" was tested
    # The first step's loss gradient, before slimcore's hook, is bit-identical to a run without the
    # penalty and without loss scaling: the penalty entered nowhere else, and unscale_ came first.
    for a, b in zip(rec[0]["grad"], plain[0]["grad"]):
        assert torch.equal(a, b)
    # gamma after k steps: SGD by hand on (loss gradient + lam * sign(gamma)), once per step
    want = _sgd_reference(info["start"], lambda i, g: [a.double() + lam * torch.sign(x)
                                                       for a, x in zip(rec[i]["grad"], g)], rec)
    for w, got in zip(want, rec[-1]["final"]):
        torch.testing.assert_close(got.double(), w, rtol=0, atol=2e-6)
    # ... which is not what the loss alone gives (the penalty moved every gamma by ~3 * lr * lam * 1.9)
    without = _sgd_reference(info["start"], lambda i, g: rec[i]["grad"], rec)
    assert min(float((a - b.double()).abs().min()) for a, b in zip(without, rec[-1]["final"])) > 5e-4


def test_proximal_soft_thresholds_after_the_step_with_its_lr(data, tmp_path):
    lam = 0.5

    def small_gammas(trainer):  # half of the gammas near 0, so the prox zeroes some
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for w in _gammas(trainer):
                w[::2] = (torch.rand(w[::2].shape, generator=gen) - 0.5) * 0.008

    rec, info = _train_recorded(data, tmp_path, "prox", lam, mode="proximal", scale=2.0**10, prepare=small_gammas)
    assert len(rec) == 3 and [r["lr"] for r in rec] == [0.01, 0.015, 0.02]
    for r in rec:
        for grad, final in zip(r["grad"], r["grad_final"]):
            assert torch.equal(grad, final)  # nothing added to the gradient in proximal mode
        # after the optimizer's update: gamma <- soft-threshold(gamma, lr * lam), lr of that step
        for stepped, final in zip(r["stepped"], r["final"]):
            v = stepped.double()
            want = torch.sign(v) * torch.clamp(v.abs() - r["lr"] * lam, min=0)
            torch.testing.assert_close(final.double(), want, rtol=0, atol=1e-7)
    # gamma after k steps by hand: SGD on the loss gradient alone (the prox stays outside the
    # momentum buffer), then the prox, per step
    want = _sgd_reference(info["start"], lambda i, g: rec[i]["grad"], rec, prox_lam=lam)
    for w, got in zip(want, rec[-1]["final"]):
        torch.testing.assert_close(got.double(), w, rtol=0, atol=2e-6)
    zeros = sum(int((w == 0).sum()) for w in rec[-1]["final"])
    assert zeros > 1000  # exact zeros: the prox did run
    # results.csv logs the share of |gamma| < 0.01 and the penalty next to ultralytics' metrics
    trainer = info["trainer"]
    with open(trainer.csv) as f:
        row = list(csv.DictReader(f))[-1]
    g = torch.cat(info["end"]).double().abs()
    assert float(row["slim/gamma_small"]) == pytest.approx(float((g < 0.01).double().mean()), rel=1e-5)
    assert float(row["slim/gamma_small"]) > 0.3
    assert float(row["slim/penalty"]) == pytest.approx(lam * float(g.sum()), rel=1e-5)
    assert "metrics/mAP50-95(B)" in row


def test_proximal_step_skipped_when_gradscaler_skips(data, tmp_path):
    # loss * 2^127 overflows: GradScaler finds inf gradients and skips every optimizer step
    rec, info = _train_recorded(data, tmp_path, "skip", 0.5, mode="proximal", scale=2.0**127)
    assert rec == []  # optimizer.step() never ran
    assert info["scale_end"] < 2.0**127
    for a, b in zip(info["start"], info["end"]):
        assert torch.equal(a, b)  # and no prox step shrank gamma


# ------------------------------------------------------------------------------- pruned checkpoints


@pytest.fixture(scope="module")
def pruned(data, tmp_path_factory):
    """A 1-epoch sparsity-trained YOLOv8n (3 classes) with random BN gammas, pruned at 0.5."""
    out = tmp_path_factory.mktemp("pruned")
    YOLO("yolov8n.yaml").train(trainer=sy.slim_trainer(lam=1e-3), data=data, epochs=1, optimizer="SGD",
                               project=str(out), name="train", **COMMON)
    yolo = sy.load_yolo(out / "train" / "weights" / "last.pt")
    randomize_batchnorms(yolo.model)  # one epoch leaves every gamma at ~1: give |gamma| a ranking
    dense = sy.save_yolo(yolo, out / "dense.pt")
    dense_params = sum(p.numel() for p in yolo.model.parameters())
    yolo, report = sy.prune_yolo(dense, 0.5, imgsz=IMGSZ)
    x = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_eval = yolo.model.eval()(x)[0]
    path = sy.save_yolo(yolo, out / "pruned.pt")
    return types.SimpleNamespace(path=path, dense=dense, dense_params=dense_params, report=report, x=x,
                                 out=out_eval, shapes=_shapes(yolo.model), state=copy.deepcopy(yolo.model.state_dict()))


def test_pruned_checkpoint_loads_predicts_and_validates_in_ultralytics(pruned, data, tmp_path):
    yolo = YOLO(pruned.path)  # ultralytics' own loader
    assert type(yolo.model).__name__ == "SlimDetectionModel" and sy.is_pruned(yolo)
    assert _shapes(yolo.model) == pruned.shapes  # the pickled module as saved, not rebuilt
    assert sum(p.numel() for p in yolo.model.parameters()) < 0.6 * pruned.dense_params
    with torch.no_grad():
        torch.testing.assert_close(yolo.model.eval()(pruned.x)[0], pruned.out, rtol=1e-5, atol=1e-4)
    results = yolo.predict((np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8), imgsz=IMGSZ,
                           verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
    metrics = yolo.val(data=data, imgsz=IMGSZ, batch=8, device="cpu", plots=False, verbose=False,
                       project=str(tmp_path), name="val")
    assert 0.0 <= metrics.box.map <= metrics.box.map50 <= 1.0
    labels = os.path.join(os.path.dirname(data), "labels", "val")
    objects = sum(len(open(os.path.join(labels, f)).read().split()) // 5 for f in os.listdir(labels))
    assert int(metrics.nt_per_class.sum()) == objects  # every object of the synthetic val split was scored


def test_fuse_keeps_compensated_convs_exact(pruned):
    """ultralytics predicts and validates with fuse(): BN folded into the conv. A conv slimcore
    compensated for removed channels adds their constant before its BN, which ultralytics' fuse
    does not scale; the pruned model's class fixes that."""
    model = sy.load_yolo(pruned.path).model.eval()
    assert any(isinstance(m, slimcore.nn.CompensatedConv2d) for m in model.modules())
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    fused.fuse(verbose=False)
    DetectionModel.fuse(plain, verbose=False)  # ultralytics' fuse alone
    with torch.no_grad():
        want, got, wrong = model(pruned.x)[0], fused(pruned.x)[0], plain(pruned.x)[0]
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)
    # the case is real: with ultralytics' fuse alone the boxes move by a fraction of a pixel
    error, unfixed = float((got - want).abs().max()), float((wrong - want).abs().max())
    assert unfixed > 1e-4 * scale and unfixed > 100 * error


def test_default_trainer_rebuilds_a_pruned_model_ours_keeps_it(pruned, data, tmp_path):
    """The classic failure, in ultralytics' own code path (Model.train -> trainer.get_model(cfg=
    model.yaml, weights=model)): the stock trainer builds a dense model from the yaml and copies
    over only the tensors whose shapes match; slimcore's trainer trains the loaded module."""
    loaded = sy.load_yolo(pruned.path).model
    args = dict(model=pruned.path, data=data, project=str(tmp_path), name="t", exist_ok=True, device="cpu")
    stock = DetectionTrainer(overrides=args).get_model(cfg=loaded.yaml, weights=loaded, verbose=False)
    assert _shapes(stock) != pruned.shapes
    assert sum(p.numel() for p in stock.parameters()) > 0.9 * pruned.dense_params
    ours = sy.slim_trainer(lam=0)(overrides=args).get_model(cfg=loaded.yaml, weights=loaded, verbose=False)
    assert ours is loaded and _shapes(ours) == pruned.shapes


def test_pruned_checkpoint_finetunes_with_its_shapes(pruned, data, tmp_path):
    yolo = YOLO(pruned.path)
    seen = {}

    def start(trainer):
        seen["state"] = {k: v.clone() for k, v in unwrap_model(trainer.model).state_dict().items()}

    yolo.add_callback("on_train_start", start)
    yolo.train(trainer=sy.slim_trainer(lam=0), data=data, epochs=1, project=str(tmp_path), name="ft", **COMMON)
    # training started from the pruned weights themselves (not a rebuilt, re-initialised model) ...
    assert seen["state"].keys() == pruned.state.keys()
    for k, v in pruned.state.items():
        torch.testing.assert_close(seen["state"][k], v, rtol=0, atol=0, msg=k)
    # ... and ends with the same architecture, trained
    assert _shapes(yolo.model) == pruned.shapes and type(yolo.model).__name__ == "SlimDetectionModel"
    finetuned = torch.load(tmp_path / "ft" / "weights" / "last.pt", weights_only=False)["model"]
    assert _shapes(finetuned) == pruned.shapes
    assert any(not torch.equal(v.float(), pruned.state[k].float()) for k, v in finetuned.state_dict().items()
               if v.is_floating_point())
    with open(tmp_path / "ft" / "results.csv") as f:
        assert "slim/gamma_small" in next(csv.reader(f))


class Interrupt(Exception):
    pass


def test_interrupted_finetune_resumes_with_ultralytics_resume(pruned, data, tmp_path):
    def interrupt(trainer):  # after epoch 1's checkpoint is written
        raise Interrupt

    yolo = YOLO(pruned.path)
    yolo.add_callback("on_model_save", interrupt)
    with pytest.raises(Interrupt):
        yolo.train(trainer=sy.slim_trainer(lam=0), data=data, epochs=2, project=str(tmp_path), name="ft", **COMMON)
    last = tmp_path / "ft" / "weights" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["optimizer"] is not None and _shapes(ckpt["ema"]) == pruned.shapes

    with pytest.raises(ValueError, match="trained with slimcore settings"):  # resume with other penalty settings
        YOLO(last).train(resume=True, trainer=sy.slim_trainer(lam=1e-3))
    started = {}
    resumed = YOLO(last)
    resumed.add_callback("on_train_start", lambda t: started.update(epoch=t.start_epoch,
                                                                      shapes=_shapes(unwrap_model(t.model))))
    resumed.train(resume=True, trainer=sy.slim_trainer(lam=0))
    assert started == {"epoch": 1, "shapes": pruned.shapes}
    with open(tmp_path / "ft" / "results.csv") as f:
        assert [int(float(r["epoch"])) for r in csv.DictReader(f)] == [1, 2]
    assert _shapes(resumed.model) == pruned.shapes


@pytest.mark.parametrize("name", ["yolov8n", "yolo11n", "yolov8n-seg"])
def test_prune_yolo_cuts_40_percent_at_ratio_half(name):
    yolo = YOLO(f"{name}.yaml")
    randomize_batchnorms(yolo.model)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    yolo.model.eval()
    with torch.no_grad():
        dense_out = yolo.model(x)[0]
    def layer(name):  # a plain conv/linear, or an ultralytics Conv block (Segment's prototype conv)
        m = yolo.model.get_submodule(name)
        return getattr(m, "conv", m)

    outputs = {n: layer(n).weight.shape for n in sy.head_output_layers(yolo)}
    pruned, report = sy.prune_yolo(yolo, 0.5, imgsz=IMGSZ)
    assert pruned is yolo
    params = sum(p.numel() for p in yolo.model.parameters())
    assert report.params_after == params and params <= 0.6 * report.params_before
    assert {n: layer(n).weight.shape[0] for n in outputs} == {n: s[0] for n, s in outputs.items()}
    model = yolo.model.eval()
    fused = copy.deepcopy(model).fuse(verbose=False)
    with torch.no_grad():
        out, out_fused = model(x)[0], fused(x)[0]
    for a, b in zip(_tensors(out), _tensors(dense_out), strict=True):
        assert a.shape == b.shape  # the predictions (and Segment's mask prototypes) keep their channels
    for a, b in zip(_tensors(out), _tensors(out_fused), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


def _tensors(out):
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _tensors(o)]


# ------------------------------------------------------------------------------- bad input


def test_non_ultralytics_checkpoints_are_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    slimcore.save_pruned(slimcore.models.build("mlp"), tmp_path / "slim.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Conv2d(1, 1, 1), tmp_path / "module.pt")
    cases = {"state.pt": "not an ultralytics checkpoint.*only tensors", "slim.pt": "not an ultralytics checkpoint",
             "random.pt": "not a torch checkpoint", "empty.pt": "empty", "module.pt": "not an ultralytics checkpoint"}
    for name, message in cases.items():
        with pytest.raises(slimcore.CheckpointError, match=message):
            sy.prune_yolo(tmp_path / name, 0.5, imgsz=IMGSZ)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        sy.prune_yolo(tmp_path / "missing.pt", 0.5)
    with pytest.raises(TypeError, match="use slimcore.prune for other models"):
        sy.prune_yolo(torch.nn.Conv2d(1, 1, 1), 0.5)


def test_data_yaml_that_points_nowhere(tmp_path, data):
    with pytest.raises(FileNotFoundError, match="no such file"):
        sy.check_data_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"path: {os.path.dirname(data)}\ntrain: images/train\nval: images/nowhere\nnames: [a]\n")
    with pytest.raises(FileNotFoundError, match="'val: images/nowhere' points nowhere"):
        sy.check_data_yaml(bad)
    bad.write_text("train: x\nnames: [a]\n")
    with pytest.raises(ValueError, match="no 'val:'"):
        sy.check_data_yaml(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not a YOLO data.yaml"):
        sy.check_data_yaml(bad)
    assert sy.check_data_yaml(data) == str(data)


def test_ratio_that_empties_a_layer_is_refused_before_anything_changes():
    yolo = YOLO("yolov8n.yaml")  # untrained: every gamma is 1, so a global threshold empties whole layers
    before = copy.deepcopy(yolo.model.state_dict())
    with pytest.raises(ValueError, match=r"ratio 0.5 would empty \d+ layers \(model.0.conv"):
        sy.prune_yolo(yolo, 0.5, imgsz=IMGSZ)
    assert _shapes(yolo.model) == {k: tuple(v.shape) for k, v in before.items()}
    assert type(yolo.model) is DetectionModel
    with pytest.raises(ValueError, match="ratio must be a number in"):
        sy.prune_yolo(yolo, 1.0, imgsz=IMGSZ)
    _, report = sy.prune_yolo(yolo, 0.5, imgsz=IMGSZ, max_layer_ratio=0.9)  # a cap keeps every layer alive
    assert all(after >= 0.1 * before for before, after in report.channels.values())


def test_pruned_model_refuses_other_classes_and_pretrained_false(pruned, tmp_path):
    other = sy.make_synthetic_detection(tmp_path / "two", n_train=8, n_val=8, imgsz=IMGSZ, classes=2)
    with pytest.raises(ValueError, match="pruned model has 3 classes and the data set .* has 2"):
        YOLO(pruned.path).train(trainer=sy.slim_trainer(lam=0), data=other, epochs=1, project=str(tmp_path),
                                name="x", **COMMON)
    with pytest.raises(ValueError, match="pretrained=False"):
        YOLO(pruned.path).train(trainer=sy.slim_trainer(lam=0), data=other, epochs=1, pretrained=False,
                                project=str(tmp_path), name="y", **COMMON)


def test_slim_trainer_checks_its_settings():
    with pytest.raises(ValueError, match="lam must be a finite number"):
        sy.slim_trainer(lam=-1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        sy.slim_trainer(mode="adam")
    with pytest.raises(ValueError, match="no proximal operator"):
        sy.slim_trainer(penalty=slimcore.LpNorm(0.5), mode="proximal")
    with pytest.raises(ValueError, match="task must be one of"):
        sy.slim_trainer(task="track")
    assert sy.SlimDetectionTrainer.slim_config() == {"lam": 1e-4, "penalty": "l1", "mode": "subgradient",
                                                     "momentum": 0.0}
    assert issubclass(sy.SlimDetectionTrainer, DetectionTrainer)


def test_save_yolo_is_atomic(pruned, tmp_path, monkeypatch):
    path = sy.save_yolo(sy.load_yolo(pruned.path), tmp_path / "a.pt")
    good = open(path, "rb").read()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sy.save_yolo(sy.load_yolo(pruned.path), path)
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["a.pt"]
    with pytest.raises(ValueError, match="ends in .pt"):
        sy.save_yolo(sy.load_yolo(pruned.path), tmp_path / "a.pth")


# ------------------------------------------------------------------------------- synthetic data


def test_synthetic_set_is_deterministic_and_labelled(tmp_path):
    a = sy.make_synthetic_detection(tmp_path / "a", n_train=6, n_val=2, imgsz=IMGSZ, classes=3, seed=5)
    b = sy.make_synthetic_detection(tmp_path / "b", n_train=9, n_val=2, imgsz=IMGSZ, classes=3, seed=5)
    c = sy.make_synthetic_detection(tmp_path / "c", n_train=6, n_val=2, imgsz=IMGSZ, classes=3, seed=6)
    root_a, root_b, root_c = (os.path.dirname(p) for p in (a, b, c))
    for i in range(6):
        name = f"images/train/{i:05d}.png"
        assert open(f"{root_a}/{name}", "rb").read() == open(f"{root_b}/{name}", "rb").read()
    assert open(f"{root_a}/images/train/00000.png", "rb").read() != open(f"{root_c}/images/train/00000.png", "rb").read()
    assert len(os.listdir(f"{root_b}/images/train")) == len(os.listdir(f"{root_b}/labels/train")) == 9
    # every label box holds its shape: the box's centre differs from the background around the boxes
    from PIL import Image

    from ultralytics.data.utils import check_det_dataset

    for i in range(6):
        image = np.asarray(Image.open(f"{root_a}/images/train/{i:05d}.png")).astype(float)
        lines = open(f"{root_a}/labels/train/{i:05d}.txt").read().split("\n")
        boxes = [list(map(float, line.split())) for line in lines if line]
        assert boxes
        free = np.ones(image.shape[:2], bool)
        for _, cx, cy, w, h in boxes:
            assert 0 <= cx - w / 2 and cx + w / 2 <= 1 and 0 <= cy - h / 2 and cy + h / 2 <= 1
            free[int((cy - h / 2) * IMGSZ):int(np.ceil((cy + h / 2) * IMGSZ)),
                 int((cx - w / 2) * IMGSZ):int(np.ceil((cx + w / 2) * IMGSZ))] = False
        background = np.median(image[free], axis=0)
        for cls, cx, cy, w, h in boxes:
            assert cls in (0, 1, 2)
            centre = image[int(cy * IMGSZ) - 1:int(cy * IMGSZ) + 2, int(cx * IMGSZ) - 1:int(cx * IMGSZ) + 2]
            assert np.abs(centre.reshape(-1, 3).mean(0) - background).sum() > 60
    info = check_det_dataset(a)  # ultralytics reads it
    assert info["nc"] == 3 and info["names"] == {0: "circle", 1: "square", 2: "triangle"}
    with pytest.raises(ValueError, match="not empty and not a synthetic data set"):
        sy.make_synthetic_detection(tmp_path, n_train=1, n_val=1)
    with pytest.raises(ValueError, match="classes must be in"):
        sy.make_synthetic_detection(tmp_path / "d", classes=9)
    with pytest.raises(ValueError, match="imgsz must be an integer >= 32"):
        sy.make_synthetic_detection(tmp_path / "d", imgsz=16)


# ------------------------------------------------------------------------------- the CLI


def test_cli_yolo_end_to_end(tmp_path, capsys):
    from slimcore.pipeline import cli

    out = tmp_path / "run"
    rc = cli.main(["yolo", "--model", "yolov8n.yaml", "--data", "synthetic", "--synthetic-train", "16",
                   "--synthetic-val", "8", "--epochs", "1", "--imgsz", str(IMGSZ), "--batch", "8", "--workers", "0",
                   "--device", "cpu", "--lam", "1e-3", "--ratio", "0.5", "--max-layer-ratio", "0.9",
                   "--latency-rounds", "2", "--out", str(out)])
    assert rc == 0
    for name in ("trained.pt", "pruned.pt", "finetuned.pt", "report.json", "report.md", "gamma_hist.png",
                 "data/data.yaml"):
        assert (out / name).exists(), name
    assert sorted(os.listdir(out / "ultralytics")) == ["finetune", "train", "val-finetuned", "val-pruned", "val-trained"]
    import json

    report = json.loads((out / "report.json").read_text())
    s = report["stages"]
    assert s["pruned"]["params"] == s["finetuned"]["params"] < 0.8 * s["trained"]["params"]
    assert s["pruned"]["flops"] < s["trained"]["flops"]
    assert s["trained"]["params"] == sum(p.numel() for p in YOLO(str(out / "trained.pt")).model.parameters())
    assert _shapes(YOLO(str(out / "finetuned.pt")).model) == _shapes(YOLO(str(out / "pruned.pt")).model)
    for stage in s.values():
        assert 0 <= stage["map50_95"] <= stage["map50"] <= 1 and stage["latency_ms"]["median_ms"] > 0
    assert [len(report["epochs_log"][k]) for k in ("train", "finetune")] == [1, 1]
    assert "slim/gamma_small" in report["epochs_log"]["train"][0]
    assert "| pruned + fine-tuned |" in capsys.readouterr().out


def test_cli_yolo_errors_are_one_line(tmp_path, data, capsys):
    from slimcore.pipeline import cli

    def run(*argv):
        rc = cli.main(["yolo", *map(str, argv)])
        return rc, capsys.readouterr().err.strip().splitlines()

    base = ["--model", "yolov8n.yaml", "--out", tmp_path / "o"]
    rc, err = run(*base, "--data", data, "--ratio", "1.0")
    assert rc == 2 and err == ["slimcore yolo: error: argument --ratio: must be a number in [0, 1), got '1.0' "
                               "(see slimcore yolo --help)"]
    rc, err = run(*base, "--data", data, "--imgsz", "16")
    assert rc == 2 and len(err) == 1 and "--imgsz: must be an integer >= 32" in err[0]
    (tmp_path / "file").write_text("x")
    rc, err = run("--model", "yolov8n.yaml", "--data", data, "--out", tmp_path / "file")
    assert rc == 2 and len(err) == 1 and err[0].startswith("slimcore yolo: error: --out") and "existing file" in err[0]
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    rc, err = run("--model", tmp_path / "w.pt", "--data", data, "--out", tmp_path / "o")
    assert rc == 2 and err[-1].startswith("slimcore yolo: error:") and "not an ultralytics checkpoint" in err[-1]
    rc, err = run("--model", "yolov8n.yaml", "--data", data, "--epochs", "0", "--finetune-epochs", "1", "--out",
                  tmp_path / "o")
    assert rc == 2 and "the model must be a trained .pt checkpoint" in err[-1]
    # and as a process: one line on stderr, exit code 2
    p = subprocess.run([sys.executable, "-m", "slimcore", "yolo", *map(str, base), "--data", tmp_path / "missing.yaml"],
                       capture_output=True, text=True, cwd=tmp_path)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("slimcore yolo: error: data"), p.stderr
    assert "no such file" in err[0]
    assert not (tmp_path / "runs").exists()
