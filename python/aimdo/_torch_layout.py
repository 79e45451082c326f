"""How an offloaded module's weights are laid out (design.md §7): each distinct weight
tensor once, in the block of the first module that holds it; one block (one VBAR
allocation) per module with weights of its own; and per module, the binding that puts
views of its blocks into its ``_parameters`` and ``_buffers`` while it runs.

Needs PyTorch; imported by aimdo.torch only.
"""

from __future__ import annotations

import torch

from . import _core
from ._schedule import Block

# Every tensor of a block starts at a multiple of this offset inside the block's allocation,
# as PyTorch's caching allocator aligns the tensors it hands out, so that kernels see the
# alignment they would see on the plain module. It is PyTorch's alignment, not the VBAR's
# (which places whole allocations): the offsets give aligned addresses only because every
# allocation starts at least as aligned, which the assertion checks.
TENSOR_ALIGNMENT_BYTES = 512
assert _core.ALLOCATION_ALIGNMENT_BYTES % TENSOR_ALIGNMENT_BYTES == 0


def dense_stride(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The tensor's strides if its elements fill exactly numel() consecutive slots (any
    dense layout: contiguous, transposed, channels-last); None if they do not (a broadcast
    or a slice), which is then stored contiguous."""
    expected = 1
    dims = zip(tensor.stride(), tensor.shape, strict=True)
    for stride, size in sorted((s, n) for s, n in dims if n != 1):
        if stride != expected:
            return None
        expected *= size
    return tuple(tensor.stride())


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= max(size, 1)
    return tuple(reversed(stride))


class Weight:
    """One distinct weight (a tensor that several modules hold is one Weight): the
    module's own tensor object, and where its bytes lie in its block."""

    __slots__ = (
        "tensor",
        "name",
        "names",
        "offset",
        "nbytes",
        "shape",
        "stride",
        "dtype",
        "is_parameter",
        "source",
    )

    def __init__(self, tensor: torch.Tensor, name: str, offset: int):
        self.tensor = tensor
        self.name = name
        self.names = [name]  # every name the module holds it by (tied weights have several)
        # Where its bytes come from instead of `tensor`: a checkpoint's tensor
        # (aimdo._safetensors.Tensor), or None.
        self.source = None
        self.offset = offset
        self.nbytes = tensor.numel() * tensor.element_size()
        self.shape = tuple(tensor.shape)
        stride = dense_stride(tensor)
        self.stride = stride if stride is not None else contiguous_stride(self.shape)
        self.dtype = tensor.dtype
        self.is_parameter = isinstance(tensor, torch.nn.Parameter)

    def raw_view(self, storage: torch.Tensor, start: int = 0) -> torch.Tensor:
        """This weight, viewing the uint8 `storage` whose byte `start` is the block's first."""
        begin = start + self.offset
        flat = storage[begin : begin + self.nbytes].view(self.dtype)
        return flat.as_strided(self.shape, self.stride)

    def view_in(self, storage: torch.Tensor) -> torch.Tensor:
        """What a module holds while it runs: raw_view, as a Parameter (not requiring
        grad) where the weight is one."""
        view = self.raw_view(storage)
        return torch.nn.Parameter(view, requires_grad=False) if self.is_parameter else view


class TorchBlock(Block):
    """The weights of one module (its own, not its children's, unless it is offloaded
    whole), laid out in one allocation. Views of them, for the destination the schedule
    chose, are in `views` between the load and the let-go; `start`/`end` is that
    destination's address range (an output inside it aliases the weights)."""

    __slots__ = (
        "name",
        "weights",
        "views",
        "start",
        "end",
        "page_storage",
        "page_views",
        "runs",
        "file_runs",
        "stream",
        "peers",
    )

    def __init__(self, name: str):
        super().__init__(1)
        self.name = name
        self.weights: list[Weight] = []
        self.views = None
        self.start = self.end = 0
        self.page_storage = None  # the allocation's bytes: fixed addresses, kept once made
        self.page_views = None
        self.runs = []  # (offset in the block, uint8 host tensor): the copies that fill it
        # Or, a block left in its checkpoint files: (offset in the block, the checkpoint's
        # tensor) for each weight, read at every copy through `stream` (a FileStream).
        self.file_runs = []
        self.stream = None
        # The same block on the other devices of an offload group, nearest first: a copy
        # reads one of them when its pages hold the weights (design.md §7).
        self.peers: tuple[TorchBlock, ...] = ()

    def add(self, tensor: torch.Tensor, name: str) -> tuple[int, Weight]:
        align = TENSOR_ALIGNMENT_BYTES
        end = self.weights[-1].offset + self.weights[-1].nbytes if self.weights else 0
        weight = Weight(tensor, name, (end + align - 1) // align * align)
        self.weights.append(weight)
        self.nbytes = max(weight.offset + weight.nbytes, 1)
        return len(self.weights) - 1, weight

    def make_views(self, storage: torch.Tensor) -> list[torch.Tensor]:
        return [weight.view_in(storage) for weight in self.weights]

    def unbind(self) -> None:
        self.views = None
        self.start = self.end = 0


class Binding:
    """One module's weights while offloaded: the blocks it needs while it runs, and the
    entries of its (and, offloaded whole, its submodules') ``_parameters``/``_buffers``:
    `assign` (dict, name, block, index into block.views) while it runs, `restore` (dict,
    name, placeholder) outside, `originals` (dict, name, the module's own tensor)."""

    def __init__(self):
        self.blocks: list[TorchBlock] = []
        self.assign: list[tuple] = []
        self.restore: list[tuple] = []
        self.originals: list[tuple] = []
        self.own: TorchBlock | None = None  # the block of the weights it holds first


def _slots(module: torch.nn.Module, prefix: str, whole: bool):
    """(dict, key, tensor, name) of every weight the module holds (with its submodules'
    when offloaded whole)."""
    members = module.named_modules(prefix=prefix) if whole else [(prefix, module)]
    for name, member in members:
        for entries in (member._parameters, member._buffers):
            for key, tensor in entries.items():
                if tensor is not None:
                    yield entries, key, tensor, f"{name}.{key}" if name else key


def _check(tensor, name: str, meta: bool) -> None:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(
            f"weight {name} is a {type(tensor).__name__}: offload moves plain tensors and "
            "parameters only"
        )
    places = ("cpu", "meta") if meta else ("cpu",)
    if tensor.layout != torch.strided or tensor.device.type not in places:
        raise ValueError(
            f"weight {name} is a {tensor.layout} tensor on {tensor.device}: offload takes "
            "a module whose weights are dense tensors on the host (cpu)"
            + (", or on the meta device" if meta else " (or on the meta device, with a checkpoint)")
        )


class Placeholders:
    """What a module holds outside its forward, per weight: a tensor of the weight's
    shape, dtype and device (the compute device, which is what model.device reports),
    viewing one element per dtype (NaN where the dtype has one, so that a weight read
    outside its module's forward shows in the output instead of passing for data)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.elements: dict[torch.dtype, torch.Tensor] = {}

    def __call__(self, weight: Weight) -> torch.Tensor:
        element = self.elements.get(weight.dtype)
        if element is None:
            fill = float("nan") if weight.dtype.is_floating_point or weight.dtype.is_complex else 0
            element = torch.full((), fill, dtype=weight.dtype, device=self.device)
            self.elements[weight.dtype] = element
        placeholder = element.expand(weight.shape)
        if weight.is_parameter:
            return torch.nn.Parameter(placeholder, requires_grad=False)
        return placeholder


def lay_out(root: torch.nn.Module, whole, device: torch.device, meta: bool = False):
    """The blocks of `root`'s weights in registration order, and the (module, Binding) of
    every module that holds weights. `whole`: module classes and modules whose submodules'
    weights are theirs too (bound for their whole forward). `meta`: weights may be on the
    meta device (a checkpoint gives their bytes). Errors: TypeError and ValueError for
    weights offload cannot move, naming the first."""
    blocks, bindings, seen, inside = [], [], {}, set()
    placeholder = Placeholders(device)
    classes = tuple(w for w in whole if isinstance(w, type))
    chosen = {id(w) for w in whole if not isinstance(w, type)}
    for name, module in root.named_modules():
        if id(module) in inside:
            continue
        is_whole = id(module) in chosen or (classes and isinstance(module, classes))
        if is_whole:
            inside.update(id(m) for m in module.modules() if m is not module)
        binding = Binding()
        for entries, key, tensor, weight_name in _slots(module, name, is_whole):
            found = seen.get(id(tensor))
            if found is not None:
                block, index, _ = found
                if weight_name not in block.weights[index].names:
                    block.weights[index].names.append(weight_name)
            if found is None:
                _check(tensor, weight_name, meta)
                if binding.own is None:
                    binding.own = TorchBlock(name)
                    blocks.append(binding.own)
                index, weight = binding.own.add(tensor, weight_name)
                found = seen[id(tensor)] = (binding.own, index, placeholder(weight))
            block, index, held = found
            if block not in binding.blocks:
                binding.blocks.append(block)
            binding.assign.append((entries, key, block, index))
            binding.restore.append((entries, key, held))
            binding.originals.append((entries, key, tensor))
        if binding.assign:
            bindings.append((module, binding))
    return blocks, bindings
