"""slimcore.build_info() and the import-time fallback (slimcore/_ext.py) when the compiled extension
is missing or was built against another torch: one clear warning naming the fix, then the
reference ops — never a crash."""

import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import slimcore


def test_build_info_reports_the_compiled_kernels():
    info = slimcore.build_info()
    assert info["extension_loaded"] and info["load_error"] is None
    assert info["cpu_kernels"] is True
    assert info["built_with_torch"] == info["running_torch"] == torch.__version__
    if info["cuda_version"] is not None:
        # CUDA sources were compiled: every op must have a CUDA kernel in the dispatcher.
        assert info["cuda_kernels"] is True
        assert info["cuda_version"] == torch.version.cuda
        assert "8.0" in info["cuda_arch_list"] and "9.0" in info["cuda_arch_list"]
    else:
        assert info["cuda_kernels"] is False
    for op in ("penalty_subgradient_", "penalty_prox_", "penalty_value"):
        assert hasattr(torch.ops.slimcore, op)


PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import slimcore
        import slimcore  # a second import must not warn again
    import torch
    from torch import nn
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.02, 0.0, 1.0]))
    model[1].weight.grad = torch.zeros(4)
    slimcore.sparse_bn_step(model, lam=0.1)
    slimcore.sparse_bn_step(model, lam=0.1, mode="proximal", lr=0.5)
    print(json.dumps(dict(
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
        info=slimcore.build_info(),
        c_loaded="slimcore._C" in sys.modules,
        grad=model[1].weight.grad.tolist(),
        weight=model[1].weight.detach().tolist(),
    )))
    """
)


def run_probe(package_dir):
    env = dict(os.environ, PYTHONPATH=str(package_dir.parent))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, cwd=package_dir.parent)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def package_copy(tmp_path):
    src = os.path.dirname(slimcore.__file__)
    dst = tmp_path / "slimcore"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def expect_fallback(result, reason):
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert message.startswith("RuntimeWarning: ") and reason in message
    assert "pip install --no-build-isolation ." in message
    assert result["info"]["extension_loaded"] is False and reason in result["info"]["load_error"]
    assert result["info"]["cpu_kernels"] is False and result["info"]["cuda_kernels"] is False
    # The reference ops did the work: L1 subgradient, then the prox with mu = 0.05.
    assert result["grad"] == pytest.approx([0.1, -0.1, 0.0, 0.1])
    assert result["weight"] == pytest.approx([0.45, 0.0, 0.0, 0.95])


def test_fallback_when_built_against_another_torch(package_copy):
    config = package_copy / "_build_config.py"
    text = config.read_text().replace(repr(torch.__version__), repr("1.0.0+other"))
    config.write_text(text)
    result = run_probe(package_copy)
    expect_fallback(result, f"built against torch 1.0.0+other but torch {torch.__version__} is installed")
    assert result["c_loaded"] is False, "a binary built for another torch must not even be imported"


def test_fallback_when_the_binary_is_missing(package_copy):
    for so in glob.glob(str(package_copy / "_C*")):
        os.remove(so)
    expect_fallback(run_probe(package_copy), "slimcore._C could not be loaded")


def test_fallback_when_the_binary_lacks_an_op(package_copy):
    # sources newer than the binary: their op list names an op the compiled library never registered
    ext = package_copy / "_ext.py"
    ext.write_text(ext.read_text().replace('"channel_affine",\n)', '"channel_affine", "op_from_newer_sources",\n)'))
    result = run_probe(package_copy)
    expect_fallback(result, "slimcore._C lacks the ops op_from_newer_sources (it was built from older sources)")


def test_fallback_when_never_built(package_copy):
    os.remove(package_copy / "_build_config.py")
    expect_fallback(run_probe(package_copy), "never built")


def test_loaded_extension_does_not_warn(package_copy):
    result = run_probe(package_copy)
    assert result["warnings"] == [] and result["info"]["extension_loaded"] and result["c_loaded"]
    assert result["grad"] == pytest.approx([0.1, -0.1, 0.0, 0.1])
