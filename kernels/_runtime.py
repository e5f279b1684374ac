"""Shared plumbing for the kernel launchers: interpreter detection, input validation, dtypes,
limits, the autocast rule and the refusal of double backward.

Nothing here launches a kernel. Every public op validates its inputs with these helpers so that
errors read the same everywhere: ``<op>: <what was given>; <what was expected>``.
"""

import contextlib
import functools
import math
import numbers
import operator
import os
import threading

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2 (batch, heads)
# Token and pixel indices are int32 in the kernels; a block's indices past the last one must not wrap.
MAX_INDEX = 2**31 - 2**16
# [True] while kernels/compile_report.py compiles the ops' launches for a GPU target without running
# them: then CPU tensors are accepted without the interpreter (nothing is computed).
COMPILE_ONLY = [False]
# [True] while benchmarks/host.py binds launches for a GPU target and does not run them (host cost):
# CPU tensors are accepted, and launch plans are recorded and replayed as on a GPU.
BIND_ONLY = [False]
# Bumped whenever launch settings change (a tuner override, a tuned table loaded): recorded launch
# plans carry the version they were made under and are not replayed under another.
SETTINGS_VERSION = [0]


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_tensor(op: str, name: str, t) -> None:
    """``t`` must be a floating-point tensor of a dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{op}: {name} has layout {t.layout}; expected a dense (torch.strided) tensor")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64"
        )


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(
            f"{op}: {name} has {t.dim()} dims, shape {tuple(t.shape)}; expected {rank} dims {layout}"
        )


def check_same(op: str, tensors: dict) -> torch.Tensor:
    """All tensors share dtype and device; returns the first one. ``tensors`` maps name -> tensor."""
    names = list(tensors)
    first = tensors[names[0]]
    for n in names[1:]:
        t = tensors[n]
        if t.dtype != first.dtype:
            raise TypeError(
                f"{op}: {names[0]} is {first.dtype} but {n} is {t.dtype}; all inputs must share one dtype"
            )
        if t.device != first.device:
            raise ValueError(
                f"{op}: {names[0]} is on {first.device} but {n} is on {t.device}; "
                "all inputs must be on one device"
            )
    return first


def check_runnable(op: str, device: torch.device) -> None:
    """Triton kernels need a GPU, or CPU tensors with the interpreter switched on."""
    if device.type == "cpu" and not BIND_ONLY[0] and not COMPILE_ONLY[0] and not interpreting():
        raise RuntimeError(
            f"{op}: got CPU tensors but Triton kernels need a GPU. Set TRITON_INTERPRET=1 before "
            "importing triton to run them on CPU with Triton's interpreter (slow, for testing), or use "
            "backend='torch' in the attnsr layers."
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(
            f"{op}: tensors on {device} are not supported; expected CUDA (or CPU with TRITON_INTERPRET=1)"
        )


def check_no_forward_ad(op: str, *tensors) -> None:
    """The kernels have no forward-mode derivative: refuse dual tensors instead of dropping tangents."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"{op}: forward-mode AD (torch.func.jvp, forward_ad dual tensors) is not supported; "
                "use reverse mode (backward), or the attnsr layers' backend='torch'"
            )


def positive_int(op: str, name: str, value) -> int:
    """``value`` as an int >= 1 (Python or NumPy integers): TypeError for another type, ValueError
    for an int below 1 (as PyTorch's own argument checks)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return value


def _autocast_dtype(device_type: str):
    """The dtype of the enclosing ``torch.autocast`` region for ``device_type``, or None outside one."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(value, device_type: str, dtype: torch.dtype):
    """``value`` with its floating-point tensors on ``device_type`` (float64 excepted) cast to ``dtype``;
    lists and tuples are walked, anything else is returned as is."""
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def autocast_inputs(*args):
    """The autocast rule of every attnsr op, on every backend: inside ``torch.autocast``, floating-point
    tensors other than float64 are cast to the autocast dtype (as autocast does for matmuls and
    convolutions), so the op computes in and returns the autocast dtype. Outside autocast, and for
    float64 tensors, None and non-tensors, the arguments come back unchanged. Lists and tuples of
    tensors (layer_fusion's maps) are cast element by element.
    """
    first = next((t for t in _tensors(args)), None)
    dtype = None if first is None else _autocast_dtype(first.device.type)
    return args if dtype is None else tuple(_cast(a, first.device.type, dtype) for a in args)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


_AUTOCAST_LIBRARY = torch.library.Library("attnsr", "FRAGMENT")


def register_autocast(op, name: str, cast_first: int | None = None) -> None:
    """Give the custom op ``attnsr::<name>`` (``op``) the autocast rule of :func:`autocast_inputs`, so
    that a direct ``torch.ops.attnsr.<name>`` call inside ``torch.autocast`` follows it too.
    ``cast_first``: only the first that many arguments are cast (window attention's q, k, v; its
    bias table and mask keep their dtype, as the public function keeps them); None: all of them.

    ``torch.library.register_autocast`` casts to a dtype fixed at registration; this reads the
    region's dtype (float16 or bfloat16) at call time. The op itself then runs with autocast off.
    """
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def kernel(*args, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type)
            n = len(args) if cast_first is None else cast_first
            with torch.autocast(_device_type, enabled=False):
                return op(*(_cast(a, _device_type, dtype) if i < n else a for i, a in enumerate(args)))

        _AUTOCAST_LIBRARY.impl(name, kernel, key)


def channels_innermost(t: torch.Tensor) -> bool:
    """A (B, C, H, W) map whose channels are adjacent in memory (channels_last or a view of one)."""
    return t.shape[1] > 1 and t.stride(1) == 1


def empty_map_like(t: torch.Tensor) -> torch.Tensor:
    """A fresh (B, C, H, W) map shaped like ``t``: channels_last when ``t`` has channels innermost."""
    fmt = torch.channels_last if channels_innermost(t) else torch.contiguous_format
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt)


# How fp32 dot products run (``precision=`` of the attention functions; Triton's input_precision):
#   "tf32x3"  three tf32 products (hi·hi + hi·lo + lo·hi) on tensor cores: about fp32 accuracy,
#             the default (PyTorch's CUTLASS memory-efficient SDPA runs fp32 the same way);
#   "tf32"    one tf32 product (10-bit mantissa operands), the default where PyTorch allows tf32;
#   "ieee"    exact fp32 on the FMA units, no tensor cores: only when asked for.
FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")


def torch_allows_tf32() -> bool:
    """True when PyTorch allows tf32 for CUDA matmuls.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` where it exists (torch >= 2.9; set by
    ``allow_tf32 = True`` and ``set_float32_matmul_precision("high")`` too), else ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    if _HAS_FP32_PRECISION:
        precision = matmul.fp32_precision
        if precision == "none":  # inherits the global setting
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"
    return bool(matmul.allow_tf32)


_HAS_FP32_PRECISION = hasattr(torch.backends.cuda.matmul, "fp32_precision")


def check_precision(op: str, precision) -> None:
    if precision is not None and precision not in FP32_PRECISIONS:
        raise ValueError(f"{op}: precision = {precision!r}; expected None (follow PyTorch), "
                         + ", ".join(repr(p) for p in FP32_PRECISIONS))


def dot_precision(dtype: torch.dtype, precision=None) -> str:
    """``tl.dot`` input precision: for fp32, ``precision`` when given, else "tf32" where PyTorch
    allows tf32 and "tf32x3" otherwise; "ieee" for the other dtypes (where Triton ignores it).

    The interpreter's dot products are exact whatever this says."""
    if dtype is not torch.float32:
        return "ieee"
    if precision is not None and precision != "auto":  # "auto": the custom ops' None, resolved at run time
        return precision
    return "tf32" if torch_allows_tf32() else "tf32x3"


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of ``tl.dot``: the input's, except bf16 under the interpreter, whose bf16 dot
    is wrong (measured): there the operands are widened to fp32 (loads, stores and the probabilities'
    rounding to bf16 stay as on a GPU)."""
    import triton.language as tl

    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


def acc_dtype(dtype: torch.dtype):
    """Triton arithmetic dtype of the accumulators and statistics for inputs of ``dtype``: fp32, or
    fp64 for float64 inputs."""
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Torch dtype of saved statistics (LSE, Δ, pooled maps, gates): float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def absent_output(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """An empty (0,) tensor: what a custom op returns in place of an absent output (a gradient that
    was not asked for, the gradient of a bias that is None, the max statistics of pool="avg")."""
    return t.new_empty((0,), dtype=t.dtype if dtype is None else dtype)


def refuse_double_backward(backward_op, name: str) -> None:
    """Register an autograd formula on ``backward_op`` that says the op ``name`` has no double backward."""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"{name} does not support double backward (a gradient of its gradient); "
            "use the attnsr layers' backend='torch' for higher-order derivatives"
        )

    def setup_context(ctx, inputs, output):
        pass

    backward_op.register_autograd(backward, setup_context=setup_context)


COMPILE_SMS = 132  # SMs of the GPUs the compile gate targets (H100 SXM, H200): grids sized off a GPU
_SMS = {}  # CUDA device index -> streaming multiprocessors, read once


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (read once per device); COMPILE_SMS elsewhere (the
    compile report sizes the grids it compiles as an H100/H200 would)."""
    if device.type != "cuda":
        return COMPILE_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def on_tensor_device(fn):
    """Run ``fn`` with the current CUDA device set to that of its first tensor argument.

    Triton launches on the current device: without this, tensors on cuda:1 while cuda:0 is current
    would be read from the wrong device.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:  # a list of maps (layer_fusion)
            first = next((a[0] for a in args if isinstance(a, (list, tuple)) and a), None)
        guard = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
        with guard:
            return fn(*args, **kwargs)

    return wrapper


def check_scale(op: str, scale, head_dim: int) -> float:
    """The softmax scale: (head dim)^−½ by default, else a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a finite real number or None, got {scale!r}")
    # abs(scale) < inf rather than math.isfinite: it also takes torch.compile(dynamic=True)'s symbolic floats
    if not abs(scale) < math.inf:
        raise ValueError(f"{op}: scale must be a finite real number or None, got {scale!r}")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# Launch plans: the launches of a call bound once, replayed on later calls with new tensors
# ----------------------------------------------------------------------------------------------
#
# Triton's JIT does, per launch: bind the arguments to the signature, compute each argument's
# specialisation (dtype, 16-byte alignment, ints equal to 1 or divisible by 16), hash them into a
# cache key, look the compiled kernel up and build its launch metadata; on small maps that costs
# as much as the kernel. A plan records, on the first call of a key, what the JIT handed to each
# compiled kernel's launcher (grid and bound arguments), and replays it for later calls with the
# same key: the tensors in their roles swapped in, the stream and launch hooks read again. The key
# must determine every non-tensor argument (shapes, strides, scalars, launch settings); the plan
# adds the tensors' 16-byte alignment, which tensors are the same object, the device and the launch
# settings' version. Nothing is recorded under the interpreter or the compile report (which never
# reach a launcher), so those always take the JIT's path.

# The records open now, as (list, thread id or None): a launch on any thread is appended to every
# record opened by that thread or for all threads. A CUDA backward runs on autograd's device
# thread, not the caller's: a record that must see it (``recorded_launches``) takes all threads;
# a launch plan takes only its own thread's launches (another thread may launch meanwhile).
_RECORDS = []
_RECORD_LOCK = threading.Lock()  # held only to open or close a record, never across one
_PATCH = [None, 0]  # CompiledKernel.run as Triton defines it, and how many records are open


def _recording_run_property(original):
    """``CompiledKernel.run``, recording each launch into the open records that want it."""

    def getter(self):
        launcher = original.__get__(self)
        if not _RECORDS:
            return launcher

        def run(*args):
            me = threading.get_ident()
            for record, thread in list(_RECORDS):
                if thread is None or thread == me:
                    record.append((self, args[:3], args[9:]))
            return launcher(*args)

        return run

    return property(getter)


@contextlib.contextmanager
def _recording(record: list, all_threads: bool = False):
    """Inside the block, each kernel launch that reaches a compiled kernel's launcher (of this
    thread, or of any with ``all_threads``) is appended to ``record`` as (compiled kernel, grid,
    bound arguments). Blocks nest and may be open on several threads at once."""
    from triton.compiler.compiler import CompiledKernel

    entry = (record, None if all_threads else threading.get_ident())
    with _RECORD_LOCK:
        if _PATCH[1] == 0:
            _PATCH[0] = CompiledKernel.__dict__["run"]
            CompiledKernel.run = _recording_run_property(_PATCH[0])
        _PATCH[1] += 1
        _RECORDS.append(entry)
    try:
        yield
    finally:
        with _RECORD_LOCK:
            # by identity: two open records may hold equal launches, and list.remove compares values
            del _RECORDS[next(i for i, e in enumerate(_RECORDS) if e is entry)]
            _PATCH[1] -= 1
            if _PATCH[1] == 0:
                CompiledKernel.run = _PATCH[0]


def recorded_launches():
    """Context manager yielding a list that collects the compiled kernels launched inside the
    block on any thread (a CUDA backward runs on autograd's device thread), as (kernel, grid,
    arguments): what ``attnsr tune`` reads spills from."""
    record = []

    @contextlib.contextmanager
    def block():
        with _recording(record, all_threads=True):
            yield record

    return block()


# [True] while ``attnsr tune`` checks a launch candidate: fresh outputs start as NaN, so an element
# a kernel skips shows up instead of reading what the allocator's last tensor left there.
POISON = [False]


def poison(t: torch.Tensor) -> torch.Tensor:
    """``t``, filled with NaN while ``POISON`` is on (a fresh output buffer)."""
    if POISON[0] and t.is_floating_point():
        t.fill_(float("nan"))
    return t


class _Plan:
    __slots__ = ("device", "launches", "stream")

    def __init__(self, launches, device, stream):
        self.launches = launches  # [(compiled kernel, grid, bound args, ((arg index, tensor index), ...))]
        self.device, self.stream = device, stream  # the driver's current-device and stream getters


class LaunchPlans:
    """Recorded launches of one op, by call key (see the section note above). Past ``maxsize``
    keys the oldest plan is dropped. ``launch(..., store=d)`` keeps the plans in the dict ``d``
    instead (a call record's own, so that its key need not repeat the call's shapes)."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self.plans = {}

    def launch(self, key, tensors: tuple, launch, store: dict | None = None, given: int | None = None) -> None:
        """Run ``launch()`` (which launches kernels on ``tensors`` and on arguments ``key``
        determines, nothing else), or replay its recorded launches on ``tensors``. ``given``: the
        first that many tensors come from the caller; the rest were allocated fresh by the op
        (aligned, distinct from all others), so only the given ones' alignment and aliasing are
        looked at (None: all)."""
        if COMPILE_ONLY[0]:
            launch()
            return
        plans = self.plans if store is None else store
        given = tensors[:given]
        ids = [id(t) for t in given]
        aliases = None if len(set(ids)) == len(ids) else tuple(ids.index(i) for i in ids)
        full = (key, SETTINGS_VERSION[0], tuple([t.data_ptr() & 15 for t in given]), aliases)
        plan = plans.get(full)
        if plan is not None:  # never recorded under the interpreter
            _replay(plan, tensors)
            return
        if interpreting():
            launch()
            return
        record = []
        with _recording(record):
            launch()
        if not record:  # nothing reached a launcher (an empty call): nothing to replay
            return
        where = {i: n for n, i in reversed(list(enumerate(id(t) for t in tensors)))}
        launches = []
        for kernel, grid, args in record:
            slots = []
            for pos, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    if id(a) not in where:  # a tensor the key does not account for: never replay
                        return
                    slots.append((pos, where[id(a)]))
            args = [None if isinstance(a, torch.Tensor) else a for a in args]  # swapped in at replay: keep none alive
            launches.append((kernel, grid, args, tuple(slots)))
        if len(plans) >= self.maxsize:
            plans.pop(next(iter(plans)))
        from triton.runtime import driver

        active = driver.active
        plans[full] = _Plan(launches, active.get_current_device, active.get_current_stream)


def _replay(plan: "_Plan", tensors: tuple) -> None:
    from triton import knobs

    stream = plan.stream(plan.device())
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if enter is not None and not getattr(enter, "calls", True):  # an empty HookChain: nothing to call
        enter = None
    if leave is not None and not getattr(leave, "calls", True):
        leave = None
    for kernel, grid, args, slots in plan.launches:
        args = args.copy()
        for pos, n in slots:
            args[pos] = tensors[n]
        meta = kernel.launch_metadata(grid, stream, *args) if enter is not None else None
        kernel.run(*grid, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *args)


# ----------------------------------------------------------------------------------------------
# Eager autograd helpers: one gradient buffer for a packed qkv projection, refusing double backward
# ----------------------------------------------------------------------------------------------


def _dense_strides(sizes, strides) -> bool:
    """True when the (size, stride) pairs lay their elements densely, none twice (any order)."""
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(sizes, strides) if sz > 1):
        if stride != expect:
            return False
        expect *= size
    return True


def packed_base(qkv: torch.Tensor):
    """``qkv`` when the packed ops (``image_attention_qkv``, ``window_attention_qkv``) can write
    the gradients of its q, k and v parts into one buffer laid out like it and hand that to
    autograd whole (no ``cat`` of three gradients): a gradient is wanted and its elements lie
    densely, none twice. Else None (the parts then take the plain path, as three views)."""
    if not (torch.is_grad_enabled() and qkv.requires_grad) or not _dense_strides(qkv.shape, qkv.stride()):
        return None
    return qkv


def grad_layout(base: torch.Tensor, views) -> tuple:
    """Where ``views`` lie in ``base`` (``packed_base``), as plain ints taken at forward time: a
    saved-tensor hook (``save_on_cpu``) may hand the backward copies with other strides."""
    origin = base.storage_offset()
    return (tuple(base.shape), base.stride(), base.dtype, base.device,
            tuple((tuple(t.shape), t.stride(), t.storage_offset() - origin) for t in views))


def grad_views(layout: tuple) -> tuple:
    """A fresh gradient buffer laid out as ``grad_layout`` recorded, and in it the views' places."""
    shape, stride, dtype, device, views = layout
    grad = poison(torch.empty_strided(shape, stride, dtype=dtype, device=device))
    return grad, tuple(grad.as_strided(*v) for v in views)


class _RefuseGrad(torch.autograd.Function):
    """Passes gradients through; differentiating them raises (what a backward with
    ``create_graph=True`` returns from an op without double backward)."""

    @staticmethod
    def forward(ctx, name, anchor, *grads):
        ctx.name = name
        return tuple(g.view_as(g) if g is not None else None for g in grads)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.name} does not support double backward (a gradient of its gradient); "
            "use the attnsr layers' backend='torch' for higher-order derivatives"
        )


def refuse_twice(name: str, inputs: tuple, grads: tuple) -> tuple:
    """``grads`` as they are, or, inside a backward that builds a graph (``create_graph=True``),
    tied to the first of ``inputs`` that requires grad through a node that raises if differentiated
    (so a second-order term is never silently dropped, whichever input needs it)."""
    if not torch.is_grad_enabled():
        return grads
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    return grads if anchor is None else _RefuseGrad.apply(name, anchor, *grads)


def device_guard(t: torch.Tensor):
    """The CUDA device of ``t`` made current where it is not (Triton launches on the current device)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class ValidCalls:
    """Signatures of calls that passed an op's checks, each with what the checks derived (the
    geometry, defaults resolved), so a repeated call skips them. A signature holds every shape,
    stride, dtype and device and the non-tensor arguments with their types, all that the checks
    read (the ops look calls up after autocast's cast, so the cast dtype is what counts); calls
    inside a forward-AD level or a torch.compile trace are always checked in full."""

    def __init__(self, maxsize: int = 4096):
        self.maxsize = maxsize
        self.seen = {}

    def lookup(self, tensors: tuple, args: tuple):
        """(signature, derived) of a call: derived is None when the call was not seen (signature
        None: a call that must always be checked in full, as under a torch.compile trace, where a
        lookup by shape would become a guard on every size)."""
        if torch.autograd.forward_ad._current_level >= 0 or torch.compiler.is_compiling():
            return None, None
        try:
            sig = (*(t.shape for t in tensors), *(t.stride() for t in tensors), *(t.dtype for t in tensors),
                   *(t.device for t in tensors), *args, *map(type, args))  # True == 1 == 1.0: the types too
            return sig, self.seen.get(sig)
        except Exception:  # not tensors, tensors without strides, unhashable arguments: checked in full
            return None, None

    def remember(self, sig, derived) -> None:
        if sig is None:
            return
        if len(self.seen) >= self.maxsize:
            self.seen.pop(next(iter(self.seen)))
        self.seen[sig] = derived


# ----------------------------------------------------------------------------------------------
# Launch settings set by the tuner and the tests (``_launch_override`` of the attention ops)
# ----------------------------------------------------------------------------------------------


def check_launch_settings(where: str, kernel: str, cfg: dict, kernels, keys) -> None:
    """The checks every op's launch settings share: a known kernel and setting names, ints,
    tiles of a power of two ≥ 16, a head-dim chunk of 0 or such a power, 1-16 warps, ≥ 1 stage.
    ``where`` starts the error message; SPLIT is left to the op (it means something there)."""
    if kernel not in kernels:
        raise ValueError(f"{where}: kernel {kernel!r}; expected one of {', '.join(kernels)}")
    for key, value in cfg.items():
        if key not in keys:
            raise ValueError(f"{where}: setting {key!r}; expected some of {', '.join(keys)}")
        if key == "SPLIT":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {key} = {value!r}; expected an int")
        if key in ("BLOCK_M", "BLOCK_N") and (value < 16 or value & (value - 1)):
            raise ValueError(f"{where}: {key} = {value}; expected a power of two >= 16")
        if key == "BLOCK_DC" and value and (value < 16 or value & (value - 1)):
            raise ValueError(f"{where}: BLOCK_DC = {value}; expected 0 (no chunks) or a power of two >= 16")
        if key == "num_warps" and value not in (1, 2, 4, 8, 16):
            raise ValueError(f"{where}: num_warps = {value}; expected 1, 2, 4, 8 or 16")
        if key == "num_stages" and value < 1:
            raise ValueError(f"{where}: num_stages = {value}; expected at least 1")


@contextlib.contextmanager
def overriding(overrides: dict, kernel: str, cfg: dict):
    """``overrides[kernel]`` updated with ``cfg`` inside the block (nests); recorded launch plans
    are not replayed across the change (``SETTINGS_VERSION``)."""
    previous = overrides.get(kernel)
    overrides[kernel] = {**(previous or {}), **cfg}
    SETTINGS_VERSION[0] += 1
    try:
        yield
    finally:
        if previous is None:
            overrides.pop(kernel, None)
        else:
            overrides[kernel] = previous
        SETTINGS_VERSION[0] += 1
