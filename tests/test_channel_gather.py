"""slimcore::channel_gather and slimcore::channel_gather_ (csrc/cpu/channel_gather.cpp,
csrc/cuda/channel_gather.cu) against reference.channel_gather(_) and against the plain
index_select chain they replace (independent of both)."""

import pytest
import torch
from helpers import devices
from torch.library import opcheck

from slimcore import ops, reference

# Every dtype family: the kernels move elements by size (1, 2, 4, 8, 16 bytes).
GATHER_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
]

# 1-D (bias, BatchNorm), 2-D (Linear), 3-5-D (conv); sizes 1 and channel counts not multiples of 8.
SHAPES = [
    (1,), (7,), (1000,),
    (1, 1), (13, 1), (1, 13), (10, 17), (37, 300),
    (6, 5, 1), (33, 9, 4),
    (1, 1, 1, 1), (9, 5, 1, 1), (20, 12, 3, 3), (3, 70, 5, 5),
    (5, 7, 2, 3, 3),
]


def shape_id(shape):
    return "x".join(map(str, shape))


def random_tensor(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.5
    elif dtype == torch.uint8:
        t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    elif dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, generator=g, dtype=torch.complex128 if dtype.is_complex else torch.float64).to(dtype)
    else:
        t = torch.randint(-(2**62) if dtype == torch.int64 else -100, 100, shape, generator=g).to(dtype)
    return t.to(device)


def chain(weight, out_index, in_index):
    """What channel_gather replaces: two index_selects, an intermediate tensor in between."""
    out = weight
    if out_index is not None:
        out = out.index_select(0, out_index)
    if in_index is not None:
        out = out.index_select(1, in_index)
    return out


def any_order_indices(size, g, device):
    """Index tensors for the out-of-place op: empty, single, a permutation, repeats, more than size."""
    sets = [
        torch.empty(0, dtype=torch.long),
        torch.tensor([size - 1]),
        torch.randperm(size, generator=g),
        torch.randint(0, size, (max(1, size // 2),), generator=g),
        torch.randint(0, size, (size + 3,), generator=g),
    ]
    return [s.to(device) for s in sets]


def sorted_indices(size, g, device, random_sets=6):
    """Strictly increasing index tensors for the in-place op."""
    sets = [
        torch.arange(size),  # keep all
        torch.empty(0, dtype=torch.long),  # keep none
        torch.arange(1, size),  # remove only the first
        torch.arange(size - 1),  # remove only the last
        torch.arange(0, size, 2),  # every other
        torch.arange(1, size, 2),
        torch.tensor([size - 1]),
        torch.tensor([0]),
    ]
    for p in torch.linspace(0.1, 0.95, random_sets).tolist():
        sets.append(torch.nonzero(torch.rand(size, generator=g) < p).flatten())
    return [s.to(device) for s in sets]


def index_combos(shape, sets_for, g, device):
    """(out_index, in_index) pairs: None combinations, each set on each dimension."""
    outs = [None] + sets_for(shape[0], g, device)
    if len(shape) == 1:
        return [(o, None) for o in outs]
    ins = [None] + sets_for(shape[1], g, device)
    combos = [(o, None) for o in outs] + [(None, i) for i in ins[1:]]
    combos += [(o, i) for o, i in zip(outs[1:], reversed(ins[1:]))]  # both, mixed kinds
    combos += [(outs[-1], ins[-1]), (outs[1], ins[1])]
    return combos


# ------------------------------------------------------------------------------------ out of place


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gather_matches_index_select_chain(shape, dtype, device):
    w = random_tensor(shape, dtype, device, seed=len(shape))
    before = w.clone()
    g = torch.Generator().manual_seed(sum(shape))
    for o, i in index_combos(shape, any_order_indices, g, device):
        got = ops.channel_gather(w, o, i)
        want = chain(w, o, i)
        assert got.dtype == dtype and got.device == w.device and got.is_contiguous()
        assert got.shape == want.shape, (o, i)
        assert torch.equal(got, want), (o, i)
        assert torch.equal(reference.channel_gather(w, o, i), want)
        if got.numel():
            assert got.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()  # a new tensor
    assert torch.equal(w, before)  # the input is untouched


@pytest.mark.parametrize("device", devices())
def test_gather_large_rows_split_across_threads(device):
    # Output ranges of 32768 elements that start and end inside rows; short runs (element-wise
    # gather), long runs (contiguous channel slices) and inner > 1.
    g = torch.Generator().manual_seed(5)
    cases = [
        (torch.randn(3, 100_000, generator=g), None, torch.randint(0, 100_000, (60_000,), generator=g)),
        (torch.randn(3, 100_000, generator=g), torch.tensor([2, 0]), torch.arange(10, 90_000)),
        (torch.randn(700, 300, generator=g), torch.randperm(700, generator=g)[:500], torch.arange(299, -1, -3)),
        (torch.randn(64, 130, 3, 3, generator=g), torch.arange(0, 64, 3), torch.randperm(130, generator=g)[:77]),
        (torch.randn(300_000, generator=g), torch.randint(0, 300_000, (250_000,), generator=g), None),
    ]
    for w, o, i in cases:
        w, o, i = (None if t is None else t.to(device) for t in (w, o, i))
        assert torch.equal(ops.channel_gather(w, o, i), chain(w, o, i))


def test_gather_accepts_views():
    w = torch.randn(10, 6)
    idx = torch.arange(10)[::3]  # a non-contiguous 1-D index is fine (indices are small)
    assert torch.equal(ops.channel_gather(w, idx, None), w[idx])
    # A contiguous view with a storage offset: both ops work relative to it; the in-place op
    # leaves the storage before the view alone.
    base = torch.randn(13, 6, 3)
    head = base[:3].clone()
    view = base[3:]
    assert torch.equal(ops.channel_gather(view, idx, torch.tensor([5, 0])), view[idx][:, [5, 0]])
    check_in_place(view, idx, torch.tensor([0, 5]))
    assert torch.equal(base[:3], head)
    z = torch.randn(5, 4, dtype=torch.complex64)
    # The conjugate bit is resolved by the dispatcher before the kernel sees the tensor.
    assert torch.equal(ops.channel_gather(z.conj(), torch.tensor([4, 1]), torch.tensor([0, 3])),
                       z.conj()[[4, 1]][:, [0, 3]])


@pytest.mark.parametrize("device", devices())
def test_gather_is_differentiable(device):
    # The backward is a scatter-add: duplicate indices accumulate, dropped channels get zero.
    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, 5, 3, generator=g, dtype=torch.float64).to(device)
    o = torch.tensor([5, 0, 5, 2], device=device)
    i = torch.tensor([1, 1, 4], device=device)
    for out_index, in_index in [(o, i), (o, None), (None, i), (None, None)]:
        shape = reference.gathered_shape(w, out_index, in_index)
        grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
        a = w.clone().requires_grad_()
        b = w.clone().requires_grad_()
        ops.channel_gather(a, out_index, in_index).backward(grad_out)
        chain(b, out_index, in_index).backward(grad_out)
        torch.testing.assert_close(a.grad, b.grad)


# ------------------------------------------------------------------------------------------ in place


def check_in_place(w, o, i):
    """Runs channel_gather_ on w and checks it against the chain on a copy: same object, same
    storage, the gathered values, contiguous."""
    want = chain(w.clone(), o, i)
    ptr = w.data_ptr()
    storage = w.untyped_storage().data_ptr()
    storage_bytes = w.untyped_storage().nbytes()
    got = ops.channel_gather_(w, o, i)
    assert got is w
    assert w.untyped_storage().data_ptr() == storage and w.untyped_storage().nbytes() == storage_bytes
    if want.numel():
        assert w.data_ptr() == ptr
    assert w.shape == want.shape and w.is_contiguous()
    assert torch.equal(w, want), (o, i)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_gather_in_place_matches_chain_and_reference(shape, dtype, device):
    g = torch.Generator().manual_seed(sum(shape) + 1)
    original = random_tensor(shape, dtype, device, seed=len(shape) + 1)
    for o, i in index_combos(shape, sorted_indices, g, device):
        check_in_place(original.clone(), o, i)
        ref = original.clone()
        ptr = ref.untyped_storage().data_ptr()
        assert reference.channel_gather_(ref, o, i) is ref and ref.untyped_storage().data_ptr() == ptr
        assert torch.equal(ref, chain(original, o, i))


@pytest.mark.parametrize("device", devices())
def test_gather_in_place_many_random_index_sets(device):
    g = torch.Generator().manual_seed(11)
    for trial in range(60):
        ndim = int(torch.randint(1, 5, (1,), generator=g))
        dims = [int(torch.randint(1, 12, (1,), generator=g)) for _ in range(ndim)]
        w = torch.randn(dims, generator=g).to(device)
        p_out, p_in = torch.rand(2, generator=g).tolist()
        o = torch.nonzero(torch.rand(dims[0], generator=g) < p_out).flatten().to(device)
        i = None
        if len(dims) > 1 and trial % 3:
            i = torch.nonzero(torch.rand(dims[1], generator=g) < p_in).flatten().to(device)
        check_in_place(w, o if trial % 4 else None, i)


@pytest.mark.parametrize("device", devices())
def test_gather_in_place_large_weight_in_parallel_waves(device):
    """A 512x512x3x3 conv weight (2.36M elements) and a 2048x4096 Linear weight on 2 threads.

    The CPU kernel moves elements front to back on one thread while gap(p) (how far an element
    moves) is below 65,536 elements, then in parallel waves of gap(p) elements. Dropping output
    channels 0-15 makes the gap 16 x 4608 = 73,728 everywhere: ~31 parallel waves. The random and
    every-other sets start sequential and cross over to growing waves; dropping only the last input
    channel (gap 9r in row r) stays sequential. The Linear sets use the element-wise path (short
    runs, inner = 1). On CUDA the small-gap sets take staged chunks, the large-gap ones direct waves.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(2)
        conv = torch.randn(512, 512, 3, 3, generator=g).to(device)
        ar = torch.arange(512, device=device)
        keep90 = lambda n: torch.nonzero(torch.rand(n, generator=g) < 0.9).flatten().to(device)  # noqa: E731
        for o, i in [
            (ar[16:], None),
            (keep90(512), keep90(512)),
            (ar[::2], ar[1::2]),
            (None, ar[:-1]),
            (ar[1:], ar[1:]),
            (ar[:-1], None),
        ]:
            w = conv.clone()
            check_in_place(w, o, i)
            assert torch.equal(w, reference.channel_gather(conv, o, i))
        linear = torch.randn(2048, 4096, generator=g).to(device)
        for o, i in [(keep90(2048), keep90(4096)), (None, torch.arange(1, 4096, 2, device=device))]:
            w = linear.clone()
            check_in_place(w, o, i)
            assert torch.equal(w, reference.channel_gather(linear, o, i))
        bias = torch.randn(300_000, generator=g).to(device)  # gap 1 everywhere: the worst case for waves
        check_in_place(bias.clone(), torch.arange(1, 300_000, device=device), None)
    finally:
        torch.set_num_threads(threads)


def test_gather_in_place_on_param_data_then_assign():
    # How the pruner uses it: gather param.data in place, then point the parameter at the result.
    conv = torch.nn.Conv2d(6, 8, 3)
    want_w = conv.weight.detach()[[1, 4, 7]][:, [0, 5]].clone()
    want_b = conv.bias.detach()[[1, 4, 7]].clone()
    o, i = torch.tensor([1, 4, 7]), torch.tensor([0, 5])
    conv.weight.data = ops.channel_gather_(conv.weight.data, o, i)
    conv.bias.data = ops.channel_gather_(conv.bias.data, o, None)
    assert conv.weight.shape == (3, 2, 3, 3) and conv.bias.shape == (3,)
    assert torch.equal(conv.weight, want_w) and torch.equal(conv.bias, want_b)
    assert conv.weight.requires_grad and isinstance(conv.weight, torch.nn.Parameter)
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    assert conv.weight.grad.shape == (3, 2, 3, 3)


# ----------------------------------------------------------------------------------------- errors

IMPLS = [pytest.param(ops, id="kernel"), pytest.param(reference, id="reference")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["channel_gather", "channel_gather_"])
def test_gather_rejects_bad_arguments(op, impl):
    fn = getattr(impl, op)
    w = torch.randn(5, 4, 3, 3)
    long = torch.tensor
    out_of_range = r"is out of range for dimension"
    cases = [
        ((w, long([0, 5]), None), IndexError, rf"out_index\[1\] = 5 {out_of_range} 0 of weight \(size 5\)"),
        ((w, long([-1]), None), IndexError, rf"out_index\[0\] = -1 {out_of_range} 0 of weight \(size 5\)"),
        ((w, None, long([1, 2, 4])), IndexError, rf"in_index\[2\] = 4 {out_of_range} 1 of weight \(size 4\)"),
        ((w, torch.tensor([0, 1], dtype=torch.int32), None), TypeError,
         r"out_index must be an int64 \(torch.long\) tensor"),
        ((w, None, torch.tensor([0.0])), TypeError, r"in_index must be an int64 \(torch.long\) tensor"),
        ((w, long([[0, 1], [2, 3]]), None), ValueError, r"out_index must be 1-D, got shape \[2, 2\]"),
        ((w, long(1), None), ValueError, r"out_index must be 1-D, got shape \[\]"),
        ((torch.randn(5), None, long([0])), ValueError, r"in_index must be None for a 1-D weight"),
        ((torch.tensor(1.0), None, None), ValueError, r"weight must have at least 1 dimension"),
        ((torch.randn(4, 5).t(), long([0]), None), ValueError,
         r"weight must be contiguous \(got sizes \[5, 4\], strides \[1, 5\]\)"),
        ((torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last), long([0]), None), ValueError,
         r"weight must be contiguous .*channels_last"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            fn(*args)
        assert str(info.value).startswith(f"slimcore: {op}: ")


@pytest.mark.parametrize("impl", IMPLS)
def test_gather_in_place_needs_strictly_increasing_indices(impl):
    w = torch.randn(6, 5, 3)
    before = w.clone()
    cases = [
        ((torch.tensor([0, 3, 2]), None),
         r"out_index must be strictly increasing \(sorted, no duplicates\) for the in-place gather, "
         r"but out_index\[2\] = 2 follows out_index\[1\] = 3"),
        ((None, torch.tensor([1, 1])), r"in_index\[1\] = 1 follows in_index\[0\] = 1"),
        ((torch.tensor([0, 1]), torch.tensor([4, 0])), r"in_index must be strictly increasing"),
    ]
    for (o, i), pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            impl.channel_gather_(w, o, i)
        assert str(info.value).startswith("slimcore: channel_gather_: ")
        assert w.shape == before.shape and torch.equal(w, before)  # checked before anything moves
    # A parameter itself cannot be resized (param.data can): refused before anything moves.
    p = torch.nn.Parameter(w.clone())
    with pytest.raises(ValueError, match=r"weight requires grad and cannot be resized in place; gather param.data"):
        impl.channel_gather_(p, torch.tensor([0, 2]), None)
    assert torch.equal(p.detach(), before)
    # The out-of-place op accepts the same indices.
    assert torch.equal(impl.channel_gather(w, torch.tensor([0, 3, 2]), torch.tensor([1, 1])), w[[0, 3, 2]][:, [1, 1]])


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["channel_gather", "channel_gather_"])
def test_gather_rejects_mixed_devices(op):
    fn = getattr(ops, op)
    w_cuda = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match=f"slimcore: {op}: out_index is on cpu but weight is on cuda:0"):
        fn(w_cuda, torch.tensor([0, 1]), None)
    with pytest.raises(ValueError, match=f"slimcore: {op}: in_index is on cuda:0 but weight is on cpu"):
        fn(torch.randn(4, 3), None, torch.tensor([0, 1], device="cuda"))


# ----------------------------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device", devices())
def test_gather_opcheck(device):
    op = torch.ops.slimcore.channel_gather.default
    w = torch.randn(6, 5, 3, 3, device=device)
    o = torch.tensor([4, 0, 4], device=device)
    i = torch.tensor([1, 3], device=device)
    samples = [
        (w, o, i), (w, None, i), (w, o, None), (w, None, None),
        (w.clone().requires_grad_(), o, i),
        (torch.randn(7, 9, device=device, dtype=torch.float64, requires_grad=True), torch.tensor([6, 1], device=device),
         None),
        (torch.randn(8, device=device, dtype=torch.bfloat16), torch.tensor([7, 2, 2], device=device), None),
        (torch.arange(12, device=device).reshape(4, 3), None, torch.tensor([2], device=device)),
        (w, torch.empty(0, dtype=torch.long, device=device), None),
    ]
    for args in samples:
        opcheck(op, args)


@pytest.mark.parametrize("device", devices())
def test_gather_in_place_opcheck_schema(device):
    # Only the schema check applies: channel_gather_ resizes its input, which no functionalization
    # can express, so it is eager-only (its fake kernel raises) and test_faketensor /
    # test_aot_dispatch_* cannot run it. test_schema runs the real kernel and checks that it
    # mutates only `weight` and returns it as the schema's Tensor(a!) says.
    op = torch.ops.slimcore.channel_gather_.default
    for args in [
        (torch.randn(6, 5, 3, 3, device=device), torch.tensor([0, 4], device=device),
         torch.tensor([1, 2], device=device)),
        (torch.randn(9, device=device), torch.tensor([1, 5, 8], device=device), None),
        (torch.randn(4, 4, device=device), None, None),
    ]:
        opcheck(op, args, test_utils=("test_schema",))


def test_gather_in_place_is_eager_only_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        w = torch.empty(4, 3)
        with pytest.raises(NotImplementedError, match="eager-only op"):
            torch.ops.slimcore.channel_gather_.default(w, torch.tensor([0, 1]), None)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_gather_works_under_torch_compile(backend):
    def prune_and_use(w, x, o, i):
        return (ops.channel_gather(w, o, i) * x).sum()

    w = torch.randn(8, 6, 3, requires_grad=True)
    x = torch.randn(3, 2, 3)
    o, i = torch.tensor([7, 1, 3]), torch.tensor([0, 5])
    want = prune_and_use(w, x, o, i)
    (want_grad,) = torch.autograd.grad(want, w)
    got = torch.compile(prune_and_use, fullgraph=True, backend=backend)(w, x, o, i)
    (got_grad,) = torch.autograd.grad(got, w)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
