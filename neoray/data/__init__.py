"""Data, in two halves that meet only at the shard format.

Offline, once per dataset (``neoray synth``, ``neoray prepare``, ``neoray check``):

* ``synth``        the synthetic COCO datasets (shapes, dense small objects; ``synth_photo``: photo-like
                   aerial scenes)
* ``sources``      COCO and YOLO sources read and validated record by record
* ``image_files``  safe image reading: regular files only, bounded size and pixels, EXIF orientation
* ``prepare``      letterboxed 16:9 Parquet shards, the manifest and the problem report
* ``check``        shards verified against their manifest
* ``demo``         the embedded default dataset, made on first use

Shared: ``shards`` (the format: manifest reading, the commit point) and ``geometry`` (letterbox arithmetic).

Online, every epoch on every worker (the stream Ray Data feeds):

* ``stream``          the plan, the shuffle buffer, train and evaluation batches, which work runs where
* ``decode``          the Ray Data tasks' reading and JPEG decoding (no torch)
* ``draws``           a batch's random draws (mosaic, mixup and zoom layouts too) and the boxes that follow
                      them (numpy only)
* ``augment``         the CPU path's pixels (albumentations) and its Ray task
* ``tensor_augment``  the device path's pixels (tensor ops; nvJPEG on CUDA)

One package rather than two: the halves share the shard format and the geometry, and fourteen modules read
well with this map. The import contracts in pyproject.toml keep the halves apart (the stream never imports
the prepare path, nor the reverse).
"""
