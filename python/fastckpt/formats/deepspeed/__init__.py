"""DeepSpeed ZeRO 1/2/3 checkpoints (OpenRLHF ``_actor/global_stepN/``), read without torch.

A ZeRO tag folder holds, per data-parallel rank ``R`` (model parallel rank 00 only):

* ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt``: ``optimizer_state_dict`` with
  ``zero_stage``, ``partition_count`` and the rank's fp32 master weights as flat 1-D tensors, one
  per parameter group: ``single_partition_of_fp32_groups`` (ZeRO 1/2) or ``fp32_flat_groups``
  (ZeRO-3);
* ``mp_rank_00_model_states.pt`` (ZeRO 1/2) or ``zero_pp_rank_R_mp_rank_00_model_states.pt``
  (ZeRO-3): ``param_shapes`` (per group, name -> shape, in flat order), ``buffer_names``,
  ``frozen_param_shapes`` / ``frozen_param_fragments``, ``shared_params`` {alias: canonical} and
  ``module`` (the state dict: full 16-bit weights under ZeRO 1/2, empty placeholders under ZeRO-3,
  real buffers).

fp32 weights are rebuilt as ``deepspeed.utils.zero_to_fp32`` does (``formats/torch-pickles.md``
§6), but as chunks, never materialised:

* **ZeRO 1/2.** Group ``g`` is the concatenation over ranks of ``partition[g]``; parameters lie
  back to back in ``param_shapes[g]`` order, each followed by its ``param_alignment_paddings``
  entry; the group tail is padded to a multiple of ``2 * W`` (checked as DeepSpeed checks it).
* **ZeRO-3.** Each parameter takes ``ceil(numel / W)`` elements of every rank's flat space (the
  groups of one rank concatenated), the last rank's share zero-padded; rank ``r`` holds elements
  ``[r * part, (r + 1) * part)`` of the flattened parameter.
* **Frozen parameters**: ZeRO-2 keeps them whole in ``frozen_param_fragments`` of the model file
  (16-bit); ZeRO-3 keeps a ``part``-sized fragment per rank. ZeRO-1 does not save them in either
  form: they are read from ``module`` (16-bit), which is where they live (``zero_to_fp32`` drops
  them).
* **Buffers** come from ``module`` of rank 0's model file in their stored dtype (``zero_to_fp32``
  casts floating ones to fp32); **aliases** in ``shared_params`` get their canonical tensor's
  chunks.

A contiguous range of a flat partition becomes a handful of boxes of the output tensor (a partial
row, whole rows, a partial row, recursively), each a strided view of the partition's storage, so
the Rust core copies it like any other chunk. Pickles are read by the stubbing restricted
unpickler: DeepSpeed classes (``LossScaler``, ``ZeroStageEnum``, ``fragment_address``) become
inert stubs; nothing is imported or executed.

Modules: :mod:`.files` (file names, loading one file, small checked readers), :mod:`.layout` (the
rank files of a tag folder, stage, world size, flat groups, ``param_shapes``), :mod:`.placement`
(flat ranges -> boxes; the ZeRO 1/2 and ZeRO-3 layouts), :mod:`.model` (the weights catalogue,
:class:`ZeroReader`), :mod:`.optimizer` (``--with-optimizer`` state).
"""

from __future__ import annotations

from pathlib import Path

from fastckpt.catalog import Catalogue
from fastckpt.formats import Format
from fastckpt.formats.deepspeed.files import (
    MODEL_FILE,
    OPTIM_FILE,
    ZERO3_MODEL_FILE,
    is_zero_dir,
    is_zero_name,
)
from fastckpt.formats.deepspeed.model import ZeroReader, read_zero_dir
from fastckpt.formats.deepspeed.optimizer import ZeroOptimizer, read_zero_optimizer
from fastckpt.formats.deepspeed.placement import range_boxes

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "OPTIM_FILE",
    "ZERO3_MODEL_FILE",
    "ZeroOptimizer",
    "ZeroReader",
    "is_zero_dir",
    "is_zero_name",
    "range_boxes",
    "read_zero_dir",
    "read_zero_optimizer",
]


def _sniff(path: Path) -> bool:
    if path.is_file():  # one file of a ZeRO tag folder: the whole folder is read
        return is_zero_name(path.name) or bool(
            MODEL_FILE.match(path.name) and is_zero_dir(path.parent)
        )
    return is_zero_dir(path)


def _open(path: Path) -> Catalogue:
    return read_zero_dir(path.parent if path.is_file() else path)


FORMAT = Format("deepspeed", sniff=_sniff, open=_open, what="ZeRO *_optim_states.pt files")
