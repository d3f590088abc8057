"""Ahead-of-time compilation of the Triton kernels for a GPU that need not be present, and what the
compiled code says: registers, local memory, shared memory, and the SASS of the main loops.

Triton compiles for any target it supports without a GPU (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``): it runs its own ``ptxas`` (the one it picks for the
architecture, e.g. ``ptxas-blackwell`` where the installed Triton does so) and returns the cubin.
Everything here reads that cubin with the ``cuobjdump`` and ``nvdisasm`` shipped in Triton's wheel,
so the figures describe exactly the binary Triton would launch. Used by `compile_report`,
``benchmarks/static_report.py`` (``dar bench static``) and the static-target tests.

Needs ``TRITON_INTERPRET`` unset when the kernel module is imported (the interpreter replaces
``@triton.jit`` functions by Python ones).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import subprocess
import tempfile
from collections import Counter
from typing import Any, Iterable

import triton
import triton.language as tl

# Opcodes of the tensor-core instructions: a loop containing one of these is a main (MMA) loop.
_MMA = re.compile(r"^(HGMMA|HMMA|QGMMA|IMMA|UTC\w*MMA)\b")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _tool(name: str) -> str:
    """Path of a CUDA tool as Triton itself resolves it (its knobs honour TRITON_<TOOL>_PATH)."""
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name.replace("-", "_")).path
    except (ImportError, AttributeError):  # older Triton: the binaries sit in the wheel's bin/
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def ptxas_path(arch: int) -> str:
    """The ptxas the installed Triton uses for compute capability ``arch`` (e.g. 90, 100)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # Triton < 3.4: the wheel's bin/ptxas
        return _tool("ptxas")
    # Triton 3.6 picks a ptxas per architecture (get_ptxas(arch)); 3.4 and 3.5 have one (get_ptxas()).
    takes_arch = bool(inspect.signature(get_ptxas).parameters)
    return (get_ptxas(arch) if takes_arch else get_ptxas()).path


def tools_available() -> str | None:
    """None when ptxas, cuobjdump and nvdisasm are all present, else why not."""
    for name in ("ptxas", "cuobjdump", "nvdisasm"):
        path = ptxas_path(90) if name == "ptxas" else _tool(name)
        if not path or not os.path.exists(path):
            return f"{name} not found (looked at {path})"
    return None


def arch_name(arch: int) -> str:
    """``sm_90a`` style name, as Triton's NVIDIA backend names it."""
    try:
        from triton.backends.nvidia.compiler import sm_arch_from_capability

        return sm_arch_from_capability(arch)
    except ImportError:
        return f"sm_{arch}" + ("a" if arch >= 90 else "")


def signature(fn, constexprs: dict[str, Any], types: dict[str, str], *, default: str = "i32",
              divisible: Iterable[str] = ()) -> tuple[dict, dict]:
    """Triton signature and attributes for ``fn``: ``constexprs`` by name, ``types`` by name
    (``"*bf16"``, ``"fp32"``, ``"tensordesc<...>"``), every other argument ``default``.

    Pointer arguments and the integer arguments named in ``divisible`` get ``tt.divisibility=16``,
    the specialisation Triton's launcher gives 16-byte aligned pointers and 16-divisible integers.
    """
    divisible = set(divisible)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, default)
        if sig[name].startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64", "int32": "i32",
           "int64": "i64", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def dtype_name(dtype) -> str:
    """Triton's short name of a torch dtype (``torch.bfloat16`` -> ``"bf16"``)."""
    return _DTYPES[str(dtype).replace("torch.", "")]


def specialise(fn, args: dict[str, Any], constexprs: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as Triton's launcher would derive them from a real call.

    ``args`` maps ``fn``'s runtime arguments to example values: tensors (``meta`` tensors will do:
    their dtype matters, and a data pointer of 0 counts as 16-byte aligned), host tensor descriptors,
    Python ints and floats. As at launch, an int equal to 1 becomes the constant 1 and one divisible
    by 16 gets ``tt.divisibility=16``; pointers and descriptors get their element type.
    """
    sig, attrs, const = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if hasattr(v, "block_shape") and hasattr(v, "base"):  # host-side TensorDescriptor
            sig[name] = f"tensordesc<{dtype_name(v.base.dtype)}{list(v.block_shape)}>"
        elif hasattr(v, "data_ptr"):
            sig[name] = "*" + dtype_name(v.dtype)
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or v is None:
            sig[name], const[name] = "constexpr", v
        elif isinstance(v, int):
            if v == 1:
                sig[name], const[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot specialise a {type(v).__name__}")
    return sig, const, attrs


def compile_for(fn, arch: int, constexprs: dict[str, Any], sig: dict, attrs: dict, *, num_warps: int,
                num_stages: int, **options):
    """``triton.compile`` for compute capability ``arch`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if getattr(fn, "__module__", "") == "triton.runtime.interpreter" or not hasattr(fn, "arg_names"):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    try:  # Triton 3.2: attributes as an AttrsDescriptor object, constexprs left out of the signature
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:
        pass
    else:
        sig = {name: ty for name, ty in sig.items() if ty != "constexpr"}
        attrs = AttrsDescriptor.from_hints({i: 16 for (i,), props in attrs.items() if ["tt.divisibility", 16] in props})
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages, **options))


@triton.jit
def arch_probe(x, BLOCK: tl.constexpr):
    """A trivial kernel: compiling it tells whether the installed Triton supports a target. Defined at
    module level: Triton 3.2 resolves a kernel's names in its module's globals only."""
    tl.store(x + tl.arange(0, BLOCK), tl.load(x + tl.arange(0, BLOCK)) + 1.0)


@dataclasses.dataclass
class Loop:
    """One innermost loop of the SASS that contains a tensor-core instruction."""

    start: int  # byte address of the loop head
    end: int  # byte address of the back-edge branch
    ops: list[str]  # opcodes (with modifiers) of every instruction in [start, end], NOPs excluded

    @property
    def instructions(self) -> int:
        return len(self.ops)

    def count(self, prefix: str) -> int:
        """Instructions whose opcode starts with ``prefix`` (``"HGMMA"``, ``"FSEL"``, ``"LDG."``...)."""
        return sum(op.startswith(prefix) for op in self.ops)

    def late_loads(self) -> int:
        """Plain global loads (LDG) issued after the loop's first wait on its tensor-core work
        (``WARPGROUP.DEPBAR`` on sm_90a): loads issued before it overlap the first product (QK^T)."""
        wait = next((i for i, op in enumerate(self.ops) if op.startswith("WARPGROUP.DEPBAR")), len(self.ops))
        return sum(op.startswith("LDG.") for op in self.ops[wait:])

    def summary(self) -> dict:
        bases = Counter(op.split(".")[0] for op in self.ops)
        return {"instructions": self.instructions, "mma": sum(bool(_MMA.match(op)) for op in self.ops),
                "ldg_after_mma_wait": self.late_loads(),
                "hgmma": bases["HGMMA"], "utmaldg": bases["UTMALDG"], "ldgsts": bases["LDGSTS"],
                "ldg": bases["LDG"], "lds": bases["LDS"] + bases["LDSM"], "fsel": bases["FSEL"],
                "mufu": bases["MUFU"], "bar": bases["BAR"] + bases["SYNCS"], "opcodes": dict(bases.most_common())}


def parse_sass(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """``nvdisasm`` text -> ([(address, instruction)], {label: address})."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2)))
    return instrs, labels


def _opcode(instr: str) -> str:
    parts = instr.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def mma_loops(text: str) -> list[Loop]:
    """The innermost loops containing a tensor-core instruction, in address order.

    A loop is a backward branch (``BRA`` to an earlier label; not ``BRA.DIV``, whose target is an
    out-of-line slow path); its body is every instruction from the label to the branch. A span
    holding ``EXIT`` is not a loop: it is an out-of-line slow path (placed after the kernel's exit)
    jumping back into the loop it left.
    """
    instrs, labels = parse_sass(text)
    spans: dict[int, int] = {}
    for addr, ins in instrs:
        op = _opcode(ins)
        if not op.startswith("BRA") or op.startswith("BRA.DIV"):
            continue
        m = _BRANCH_TARGET.search(ins)
        if m and m.group(1) in labels and labels[m.group(1)] <= addr:
            head = labels[m.group(1)]
            spans[head] = max(spans.get(head, addr), addr)
    loops = []
    for head, end in sorted(spans.items()):
        ops = [_opcode(i) for a, i in instrs if head <= a <= end]
        ops = [o for o in ops if o != "NOP"]
        if any(_MMA.match(o) for o in ops) and "EXIT" not in ops:
            loops.append(Loop(head, end, ops))
    return [lp for lp in loops if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)]


def _run(tool: str, *args: str) -> str:
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def ptxas_notes(kernel) -> list[str]:
    """ptxas's performance notes on the kernel's PTX (e.g. C7515, wgmma serialised), from the ptxas
    Triton uses for its architecture. Triton discards this log; running ptxas again on the same
    PTX reproduces it (the cubin itself is Triton's)."""
    arch = kernel.metadata.target.arch
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        log = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={arch_name(arch)}", src, "-o",
                              os.path.join(tmp, "kernel.o")], capture_output=True, text=True, check=True).stderr
    return [line.split("info    : ", 1)[-1].strip() for line in log.splitlines() if "Performance" in line]


def analyse(kernel) -> dict:
    """Registers, local memory and shared memory of a compiled kernel, its MMA loops' SASS, and
    whether ptxas serialised its wgmma (C7515: every wgmma waited on at once)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = _run(_tool("cuobjdump"), "-res-usage", path)
        sass = _run(_tool("nvdisasm"), "-c", path)
    notes = ptxas_notes(kernel)
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    ops = [_opcode(i) for _, i in parse_sass(sass)[0]]
    return {
        "registers": int(fields.get("REG", -1)),
        "stack_bytes": int(fields.get("STACK", 0)),
        "local_bytes": int(fields.get("LOCAL", 0)),
        # Spilled registers go to local memory through STL/LDL; Triton kernels use no other local memory.
        "spill_stores": sum(o.startswith("STL") for o in ops),
        "spill_loads": sum(o.startswith("LDL") for o in ops),
        "shared_bytes": int(kernel.metadata.shared),
        "total_instructions": sum(o != "NOP" for o in ops),
        "wgmma_serialized": any("C7515" in n or "serialized" in n for n in notes),
        "ptxas_notes": notes,
        "loops": mma_loops(sass),
        "sass": sass,
    }


__all__ = ["Loop", "analyse", "arch_name", "compile_for", "dtype_name", "specialise", "mma_loops", "parse_sass", "ptxas_notes", "ptxas_path", "signature",
           "tools_available"]
