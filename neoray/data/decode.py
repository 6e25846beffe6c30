"""Reading and decoding shard rows: the work of the Ray Data tasks that feed every stream.

A task gets one chunk of the plan (``{"path", "start", "stop"}``) and reads exactly those rows of the
Parquet file (local, a shared mount or object storage, through ``neoray.storage``). ``read_chunk``
also decodes their JPEGs with cv2 (evaluation with ``data.decode: cpu``); ``read_encoded_chunk`` hands
the rows on as they are stored, JPEG bytes included (training on both paths, evaluation with
``data.decode: gpu``): the JPEGs are then decoded where each batch is formed. Ray's tasks import this
module to find these functions, so it imports neither torch nor albumentations (seconds of imports per
fresh worker, paid in the time to the first batch).
"""

from __future__ import annotations

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neoray import storage

# Columns the stream needs from a shard (file_name and ann_ids stay in storage).
READ_COLUMNS = ["image_id", "image", "width", "height", "orig_width", "orig_height", "scale", "pad_x", "pad_y",
                "boxes", "labels", "iscrowd", "areas"]


def read_rows(path: str, start: int, stop: int, columns: list[str] = READ_COLUMNS):
    """Rows ``[start, stop)`` of one Parquet file as a pyarrow Table, reading only the row groups that
    hold them (prepare writes groups of 64 rows)."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as handle:
        parquet = pq.ParquetFile(handle)
        groups, first_row, offset = [], None, 0
        for index in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(index).num_rows
            if offset < stop and offset + rows > start:
                groups.append(index)
                first_row = offset if first_row is None else first_row
            offset += rows
        if stop > offset:
            raise ValueError(f"{path}: rows {start}..{stop} requested but the file holds {offset}; its manifest "
                             "entry is stale (re-run `neoray prepare`, or `neoray check` the directory)")
        table = parquet.read_row_groups(groups, columns=columns)
    return table.slice(start - first_row, stop - start)


def decode_jpeg(data: bytes, shape: tuple[int, int], where: str) -> np.ndarray:
    """One shard JPEG -> uint8 HWC RGB, checked against the row's ``shape`` = (width, height); errors name
    ``where`` (shard file and image id) and the field."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise ValueError(f"{where}: field 'image': not a decodable JPEG ({len(data)} bytes)")
    width, height = shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"{where}: field 'image': decoded {image.shape[1]}x{image.shape[0]} but the row says "
                         f"width x height = {width}x{height}")
    return image


def check_targets(columns: dict, i: int, where: str) -> np.ndarray:
    """Row ``i``'s boxes as float32 (N, 4), after checking that labels, iscrowd and areas have N entries."""
    row_boxes = np.asarray(columns["boxes"][i], dtype=np.float32).reshape(-1, 4)
    for name in ("labels", "iscrowd", "areas"):
        if len(columns[name][i]) != len(row_boxes):
            raise ValueError(f"{where}: field '{name}': {len(columns[name][i])} entries for {len(row_boxes)} boxes")
    return row_boxes


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array of per-row arrays (np.array would try to stack equal-length rows into 3-D)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def decode_rows(table, path: str) -> dict[str, np.ndarray]:
    """JPEG bytes -> uint8 HWC RGB "pixels"; ragged columns -> per-row numpy arrays.

    Boxes become (N, 4) float32 arrays, which Ray stores as Arrow tensors, so 0, 1 or many boxes per image
    all survive. Bad records raise one line naming the shard file, the image id and the field.
    """
    columns = table.to_pydict()
    pixels, boxes, labels, iscrowd, areas = [], [], [], [], []
    for i, data in enumerate(columns["image"]):
        where = f"{path}: image_id {columns['image_id'][i]}"
        width, height = columns["width"][i], columns["height"][i]
        image = decode_jpeg(data, (width, height), where)
        if pixels and image.shape != pixels[0].shape:
            raise ValueError(f"{where}: field 'image': {width}x{height} differs from "
                             f"{pixels[0].shape[1]}x{pixels[0].shape[0]} in the same shard; a shard directory "
                             "holds one size")
        row_boxes = check_targets(columns, i, where)
        pixels.append(image)
        boxes.append(row_boxes)
        labels.append(np.asarray(columns["labels"][i], dtype=np.int64))
        iscrowd.append(np.asarray(columns["iscrowd"][i], dtype=bool))
        areas.append(np.asarray(columns["areas"][i], dtype=np.float32))
    out = {
        key: np.asarray(columns[key]) for key in ("image_id", "orig_width", "orig_height", "scale", "pad_x", "pad_y")
    }
    out["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 0, 0, 3), np.uint8)
    out["boxes"], out["labels"] = _object_array(boxes), _object_array(labels)
    out["iscrowd"], out["areas"] = _object_array(iscrowd), _object_array(areas)
    return out


def read_chunk(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``map_batches`` step over plan rows (one per call): read the chunk's rows and decode them."""
    path, start, stop = str(batch["path"][0]), int(batch["start"][0]), int(batch["stop"][0])
    return decode_rows(read_rows(path, start, stop), path)


def read_encoded_chunk(batch: dict[str, np.ndarray]):
    """``map_batches`` step over plan rows (one per call): the chunk's rows as a pyarrow Table, JPEGs still
    encoded (a tenth or less of the decoded bytes through the object store), with a ``path`` column
    naming the shard file in errors."""
    path, start, stop = str(batch["path"][0]), int(batch["start"][0]), int(batch["stop"][0])
    table = read_rows(path, start, stop)
    return table.append_column("path", pa.array([path] * table.num_rows, pa.string()))


__all__ = ["READ_COLUMNS", "check_targets", "decode_jpeg", "decode_rows", "read_chunk", "read_encoded_chunk",
           "read_rows"]
