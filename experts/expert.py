"""The on-disk expert format: one folder per expert, written atomically.

Layout of ``<store>/<expert>/`` (the manifest model: experts.manifest)::

    manifest.json          ExpertManifest (below), sorted keys
    tensors.safetensors    the task vector: one entry per part, key "<param>::<part>"
                           (e.g. "layers.0.q_proj.weight::mask"), parts as the codec defines
    carried.safetensors    task-specific parameters stored whole (separate heads);
                           present only when the manifest lists some

Writing is experts.save (``save_expert``); this module reads.
``load_expert`` reads only headers (cheap); tensors are read lazily, one
parameter at a time. ``Expert.verify()`` does the full, data-reading check.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import cast

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from torch import Tensor

from deltaserve.experts.codecs import Codec, FactorCodec, SparseEntriesCodec, get_codec
from deltaserve.experts.manifest import (_TORCH_DTYPES, CARRIED_FILE, MANIFEST_FILE, PART_SEPARATOR, TENSORS_FILE,
                                         BaseMismatchError, ExpertFormatError, ExpertManifest, TensorSpec, sha256_file)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_LISTED_PROBLEMS = 10


# --------------------------------------------------------------------------- load


class Expert:
    """A loaded expert; tensors are read lazily from ``tensors.safetensors``."""

    def __init__(self, directory: Path, manifest: ExpertManifest) -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.codec = get_codec(manifest.codec)
        self._checked: dict[str, tuple[int, int, int]] = {}   # file -> (size, mtime_ns, inode) when its digest held

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.tensors)

    def _spec(self, name: str) -> TensorSpec:
        try:
            return self.manifest.tensors[name]
        except KeyError:
            raise KeyError(f"expert {self.manifest.name!r} has no parameter {name!r}") from None

    def parts(self, name: str) -> dict[str, Tensor]:
        self._spec(name)
        if self._checked:
            self.check_digests()   # once checked, every read re-checks cheaply (a stat) that nothing changed
        path = self.directory / TENSORS_FILE
        with _open_safetensors(path) as fh:
            try:
                return {p: fh.get_tensor(f"{name}{PART_SEPARATOR}{p}") for p in self.codec.part_names}
            except SafetensorError as err:
                raise ExpertFormatError(f"{path}: cannot read parameter {name!r}: {err}") from err

    def factors(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(A [r, in], B [out, r])`` of a low-rank expert's parameter (``delta = B @ A``)."""
        spec = self._spec(name)
        if not self.codec.lowrank:
            raise ExpertFormatError(f"expert {self.manifest.name!r} is not low-rank (codec {self.manifest.codec})")
        with self._format_errors(name):
            return cast(FactorCodec, self.codec).factors(self.parts(name), spec.shape, dtype)

    def decode(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The dense delta of ``name`` (in the base dtype unless ``dtype`` is given)."""
        spec = self._spec(name)
        with self._format_errors(name):
            return self.codec.decode(self.parts(name), spec.shape, dtype or _TORCH_DTYPES[spec.dtype])

    def add_into(self, name: str, target: Tensor, weight: float) -> None:
        """In place ``target += weight * delta(name)``; ``target`` must have the base shape."""
        spec = self._spec(name)
        if tuple(target.shape) != spec.shape:
            raise ValueError(f"target for {name!r} has shape {list(target.shape)}, expected {list(spec.shape)}")
        with self._format_errors(name):
            self.codec.add_into(target, self.parts(name), weight)

    def entries(self, name: str) -> tuple[Tensor, Tensor]:
        """``(flat indices, values as stored)`` of a sparse expert's kept entries of ``name``: ``add_into``
        is ``experts.bitpack.add_entries(target.view(-1), index, values, weight)`` of exactly these."""
        spec = self._spec(name)
        if not self.codec.sparse_entries:
            raise ExpertFormatError(f"expert {self.manifest.name!r} is not sparse (codec {self.manifest.codec})")
        with self._format_errors(name):
            return cast(SparseEntriesCodec, self.codec).entries(self.parts(name), math.prod(spec.shape))

    def iter_deltas(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
        for name in self.param_names:
            yield name, self.decode(name, dtype)

    @cached_property
    def carried(self) -> dict[str, Tensor]:
        """Task-specific parameters stored whole (read on first access)."""
        if not self.manifest.carried:
            return {}
        path = self.directory / CARRIED_FILE
        with _open_safetensors(path) as fh:
            return {k: fh.get_tensor(k) for k in self.manifest.carried}

    def check_base(self, fingerprint: str, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        """Refuse a base whose fingerprint differs or which lacks/reshapes a covered parameter."""
        if fingerprint != self.manifest.base_fingerprint:
            raise BaseMismatchError(f"expert {self.manifest.name!r} was made for base "
                                    f"{self.manifest.base_fingerprint!r}, not {fingerprint!r}")
        problems = []
        if shapes is not None:
            for name, spec in self.manifest.tensors.items():
                if name not in shapes:
                    problems.append(f"base has no parameter {name!r}")
                elif tuple(shapes[name]) != spec.shape:
                    problems.append(f"{name!r} is {list(shapes[name])} in the base, {list(spec.shape)} in the expert")
        if problems:
            raise BaseMismatchError(f"expert {self.manifest.name!r}: " + _join(problems))

    def check_digests(self) -> None:
        """Every file's sha256 equals the manifest's. A file is hashed again only when its size,
        mtime or inode changed since it last matched, so calling this before every read is cheap."""
        for file_name, expected in self.manifest.sha256.items():
            path = self.directory / file_name
            try:
                st = path.stat()
            except FileNotFoundError:
                raise ExpertFormatError(f"expert {self.manifest.name!r}: {file_name} is missing") from None
            state = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._checked.get(file_name) == state:
                continue
            if sha256_file(path) != expected:
                self._checked.pop(file_name, None)
                raise ExpertFormatError(f"expert {self.manifest.name!r}: {file_name} does not match its sha256 "
                                        "digest (corrupted or changed on disk)")
            self._checked[file_name] = state

    def verify(self) -> None:
        """Full check: file digests, every parameter decodes to finite values, density as recorded. The tensors
        file is opened once; a low-rank parameter is checked on its factors when their product cannot overflow
        (finite A and B with r·max|A|·max|B| within float32), without forming the dense delta."""
        self.check_digests()
        kept = []
        path = self.directory / TENSORS_FILE
        with _open_safetensors(path) as fh:
            for name in self.param_names:
                try:
                    parts = {p: fh.get_tensor(f"{name}{PART_SEPARATOR}{p}") for p in self.codec.part_names}
                except SafetensorError as err:
                    raise ExpertFormatError(f"{path}: cannot read parameter {name!r}: {err}") from err
                kept.append(self.codec.kept_count(parts))
                if not self._finite(name, parts):
                    raise ExpertFormatError(f"{path}: parameter {name!r} holds NaN or Inf")
        density = None if None in kept else sum(k for k in kept if k is not None) / self.manifest.base_params
        if density != self.manifest.density and not (
                density is not None and self.manifest.density is not None
                and math.isclose(density, self.manifest.density, rel_tol=1e-9)):
            raise ExpertFormatError(f"{self.directory / MANIFEST_FILE}: density {self.manifest.density} "
                                    f"but the mask keeps {density}")

    def _finite(self, name: str, parts: dict[str, Tensor]) -> bool:
        if self.codec.lowrank and all(t.is_floating_point() for t in parts.values()):
            if not all(bool(torch.isfinite(t).all()) for t in parts.values()):
                return False
            bound = math.prod(float(t.abs().max()) if t.numel() else 0.0 for t in parts.values())
            if bound * min(parts["A"].shape[0], parts["B"].shape[-1]) < torch.finfo(torch.float32).max:
                return True
        spec = self._spec(name)
        with self._format_errors(name):
            return bool(torch.isfinite(self.codec.decode(parts, spec.shape, torch.float32)).all())

    def _format_errors(self, name: str):
        return _reraise_as_format_error(f"{self.directory / TENSORS_FILE}: parameter {name!r}")


def load_expert(directory: Path, *, verify: bool = False) -> Expert:
    """Read and check an expert folder's manifest and headers; ``verify`` also reads all data."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExpertFormatError(f"{directory}: not an expert directory")
    manifest = _read_manifest(directory / MANIFEST_FILE)
    codec = get_codec(manifest.codec)
    problems = _layout_problems(manifest, codec, _part_meta(directory / TENSORS_FILE))
    if manifest.carried:
        carried_keys = set(_part_meta(directory / CARRIED_FILE))
        if carried_keys != set(manifest.carried):
            problems.append(f"{CARRIED_FILE} holds {sorted(carried_keys)}, manifest lists {manifest.carried}")
    if problems:
        raise ExpertFormatError(f"{directory}: " + _join(problems))
    expert = Expert(directory, manifest)
    if verify:
        expert.verify()
    return expert


def load_pinned(fd: int, check: Callable[[Expert], object] = lambda expert: None, *,
                verify: bool = False) -> Expert:
    """The expert in the folder open as ``fd`` (an ``os.open`` of it), read through that handle
    (``/proc/self/fd``) so that a replacement swapped in at its path, or its retirement, does not change
    what it reads; checked by ``check(expert)``. The handle is closed when the expert is collected, or at
    once if loading or ``check`` raises."""
    try:
        expert = load_expert(Path(f"/proc/self/fd/{fd}"), verify=verify)
        check(expert)
    except BaseException:
        os.close(fd)
        raise
    weakref.finalize(expert, os.close, fd)
    return expert


def _read_manifest(path: Path) -> ExpertManifest:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ExpertFormatError(f"{path}: manifest is missing") from None
    except ValueError as err:
        raise ExpertFormatError(f"{path}: not valid JSON ({err})") from err
    try:
        return ExpertManifest.model_validate(raw)
    except ValidationError as err:
        found = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors()]
        raise ExpertFormatError(f"{path}: invalid manifest: " + _join(found)) from err


@contextlib.contextmanager
def _reraise_as_format_error(where: str) -> Iterator[None]:
    """A codec's ValueError becomes an ExpertFormatError that says where it happened."""
    try:
        yield
    except ExpertFormatError:
        raise
    except ValueError as err:
        raise ExpertFormatError(f"{where}: {err}") from err


def _open_safetensors(path: Path):
    if not path.is_file():
        raise ExpertFormatError(f"{path}: file is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ExpertFormatError(f"{path}: unreadable or corrupted safetensors file ({err})") from err


def _part_meta(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """key -> (shape, dtype) from the header only; unknown dtypes are kept as their name."""
    with _open_safetensors(path) as fh:
        meta = {}
        for key in fh.keys():
            info = fh.get_slice(key)
            meta[key] = (tuple(info.get_shape()), SAFETENSORS_DTYPES.get(info.get_dtype(), info.get_dtype()))
        return meta


def _layout_problems(manifest: ExpertManifest, codec: Codec, meta: Mapping[str, tuple]) -> list[str]:
    grouped: dict[str, dict[str, tuple]] = {}
    for key, value in meta.items():
        param, sep, part = key.rpartition(PART_SEPARATOR)
        grouped.setdefault(param if sep else key, {})[part] = value
    problems = [f"{TENSORS_FILE} holds tensors for unlisted parameter {p!r}"
                for p in sorted(set(grouped) - set(manifest.tensors))]
    for param, spec in manifest.tensors.items():
        problems += [f"parameter {param!r}: {p}" for p in codec.check_parts(grouped.get(param, {}), spec.shape)]
    if not problems:
        stored = sum(math.prod(shape) * dtype.itemsize for shape, dtype in meta.values())
        if stored != manifest.bytes:
            problems.append(f"{TENSORS_FILE} stores {stored} bytes, manifest says {manifest.bytes}")
    return problems


def _join(problems: Sequence[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    return shown + (f"; ... and {more} more" if more > 0 else "")
