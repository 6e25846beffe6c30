"""neoray's own checkpoints and the weight-file readers every layer needs, below everything that trains,
evaluates or loads a model (the engine saves its state here; a backbone reads its weights file here).

* ``files``   reading bytes into objects safely: torch files weights-only, safetensors, Hugging Face folders
* ``format``  the neoray checkpoint format, defined once: ``save_checkpoint`` (atomic), ``read_checkpoint_file``
* ``locate``  what a user names -> a checkpoint (run directories, ``checkpoints.json`` pointers), ``load_checkpoint``

Reading a *foreign* detector (the reference RT-DETR, Hugging Face) into a model is ``neoray.models.pretrained``'s
work, one layer up: it needs the model registry.
"""

from neoray.checkpoints.files import PretrainedError, read_torch_file
from neoray.checkpoints.format import (
    FILE_NAME,
    CheckpointError,
    is_neoray_checkpoint,
    read_checkpoint_file,
    save_checkpoint,
)
from neoray.checkpoints.locate import (
    POINTERS_NAME,
    checkpoint_file,
    load_checkpoint,
    read_pointers,
    resolve_checkpoint,
    write_pointers,
)

__all__ = [
    "FILE_NAME", "POINTERS_NAME", "CheckpointError", "PretrainedError", "checkpoint_file", "is_neoray_checkpoint",
    "load_checkpoint", "read_checkpoint_file", "read_pointers", "read_torch_file", "resolve_checkpoint",
    "save_checkpoint", "write_pointers",
]
