"""Start from a pretrained detector: neoray checkpoints, the reference RT-DETR's ``.pth`` files and
Hugging Face ``transformers`` RT-DETR models.

``load_pretrained(model, path, class_names)`` is the one loader every caller uses (``train.init_from``,
``neoray eval`` / ``neoray predict`` through ``build_pretrained``). It accepts:

* **neoray**: a checkpoint directory holding ``checkpoint.pt``, or the file; a dict with ``"format":
  "neoray-checkpoint"``, ``"model"``, ``"ema"`` (used when present), ``"model_name"``, ``"num_classes"``,
  ``"categories"`` and ``"config"``. Tensors load by their exact names.
* **reference** (lyuwenyu/RT-DETR, ``rtdetr_pytorch``): a ``.pth`` holding ``{"model": state_dict}`` or
  ``{"ema": {"module": state_dict}}`` (the EMA weights are used when present, as the reference evaluates
  with them). Its PResNet backbone keys are neoray's ``rtdetr_r*vd`` backbone keys; the encoder and decoder
  follow the explicit table ``reference_key_map``.
* **huggingface**: a directory with ``model.safetensors`` and ``config.json`` (as published for
  ``PekingU/rtdetr_r50vd`` and siblings), or the ``.safetensors`` file with ``config.json`` beside it;
  read with the ``safetensors`` package. Names follow ``huggingface_key_map``: the reference names renamed
  as transformers' ``convert_rt_detr_original_pytorch_checkpoint_to_hf.py`` renames them, with each
  ``nn.MultiheadAttention.in_proj_*`` split into ``q_proj``/``k_proj``/``v_proj`` (rows in that order).

Nothing is matched by suffix or by shape: a tensor whose name is not in the table is reported. Every
model tensor that is not loaded is listed with the reason ("not in the checkpoint", "shape (a) vs (b)
(checkpoint vs model)", "no counterpart in the ... layout") and so is every checkpoint tensor the model
has no place for ("not in the model").

**Conventions travel with the format.** The reference and Hugging Face models were trained on pixels
scaled to [0, 1] without ImageNet mean/std (``input_normalization="unit"``), with the AIFI position
embedding's halves in the order rows-then-columns (``position_order="yx"``, see
neoray.models.position). ``describe_pretrained(path).options`` carries them, so the engine builds the
model with them (and the run's config records them); ``load_pretrained`` sets them on a model built
otherwise, and says so. A neoray checkpoint carries the options of its own config.

**Classes.** A checkpoint's classes are known by name: COCO's 80 for the reference format (label i is the
i-th COCO category sorted by id), ``id2label`` for Hugging Face, ``categories`` for neoray. When the
user's ``class_names`` differ, the class-dependent tensors (the score heads, the encoder's score head,
the denoising label embedding) keep their fresh initialisation except the rows of classes whose name
equals a checkpoint class name (case-insensitive), which are copied: those classes start trained.

Every file is read weights-only (``neoray.checkpoints.files.read_torch_file``): a pickle that would need to
run code is refused. Reading bytes into objects and neoray's own checkpoint format live one layer down, in
``neoray.checkpoints``; this package is the layer above the model registry.

The package, in the order a file flows through it:

* ``coco``        COCO's 80 categories (the reference checkpoints' classes)
* ``keymaps``     neoray name -> the reference / Hugging Face name, one explicit table per format
* ``formats``     each format read into a ``PretrainedInfo`` (preset, options, classes) and its tensors
* ``load``        ``load_pretrained``: tensors into a built model, class rows by name, conventions
* ``build``       ``build_pretrained``: a model rebuilt from a file alone (eval, predict, export)

``neoray.models`` re-exports the public names. The whole package sits above the model registry (the import
contracts in pyproject.toml hold it there); a backbone reads its own weights file through
``neoray.models.weights`` and ``neoray.checkpoints``, below the registry.
"""
